"""Issue 13: ``benchmarks/serving.py --quick`` measures every figure and resumes from its JSON."""

from __future__ import annotations

import json

import pytest


def test_quick_serving_benchmark_measures_and_resumes(tmp_path, capsys):
    serving = pytest.importorskip("benchmarks.serving")
    results, out = tmp_path / "serving.json", tmp_path / "exports"
    first = serving.main(["--quick", "--json", str(results), "--out", str(out), "--variants", "dense", "compact"])
    rows = {r["variant"]: r for r in first["rows"]}
    assert sorted(rows) == ["compact", "dense"]
    for row in rows.values():
        assert row["bytes"] > 0 and row["load_s"] > 0 and row["cpu_per_request_b64"] > 0
        assert row["p50_b1_ms"] > 0 and row["p50_b64_ms"] >= row["p50_b1_ms"] * 0.5
        assert row["peak_above_base"] > 0 and row["loaded_above_base"] > 0 and row["sizes"] == [2000, 3000, 32]
        # a process already serving a model adds less for one more than a fresh process does for its first
        assert 0 < row["peak_added_warm"] < row["peak_above_base"]
    assert rows["dense"]["bytes_ratio"] == 1.0 and 0 < rows["compact"]["bytes_ratio"] < 0.6
    saved = json.loads(results.read_text())
    assert [r["variant"] for r in saved["rows"]] == [r["variant"] for r in first["rows"]]
    # resume: only the missing variant is measured, the others are kept as they were
    second = serving.main(["--quick", "--json", str(results), "--out", str(out),
                           "--variants", "dense", "compact", "compact-sparse"])
    assert [r["variant"] for r in second["rows"]][:2] == [r["variant"] for r in first["rows"]]
    assert second["rows"][0]["p50_b1_ms"] == first["rows"][0]["p50_b1_ms"]
    assert [r["variant"] for r in second["rows"]][2:] == ["compact-sparse"]
    printed = capsys.readouterr().out
    assert "compact-sparse" in printed and "/dense" in printed

"""EpochTimer: where an epoch's wall time goes (issue 15)."""

import dsl_tf  # noqa: F401  (must precede tf.keras)
import pytest

from trainers import train


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Iterations:
    def numpy(self):
        return 0


class _Model:
    class optimizer:  # noqa: N801
        iterations = _Iterations()


def test_epoch_records_steps_the_largest_gap_and_the_time_after_its_last_step(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(train.time, "perf_counter", clock)
    timer = train.EpochTimer()
    timer.set_model(_Model())
    timer.on_epoch_begin(0)
    clock.now = 0.5  # 0.5 s before the first step
    for batch, (step, gap) in enumerate([(1.0, 0.1), (1.0, 3.0), (1.0, 0.2)]):
        timer.on_train_batch_begin(batch)
        clock.now += step
        timer.on_train_batch_end(batch)
        clock.now += gap
    timer.on_train_end()
    [epoch] = timer.epochs
    assert epoch["steps"] == 3 and epoch["step_seconds"] == pytest.approx(3.0)
    assert epoch["largest_gap_seconds"] == pytest.approx(3.0) and epoch["largest_gap_before_batch"] == 2
    assert epoch["after_last_step_seconds"] == pytest.approx(0.2)
    assert epoch["wall_seconds"] == pytest.approx(0.5 + 3.0 + 3.3)
    row = train.time_breakdown(timer.epochs, [])["epochs"][0]
    assert row["other_seconds"] == pytest.approx(3.8)


def test_breakdown_separates_evaluations_and_explorations_from_the_rest():
    epochs = [{"epoch": 0, "first_step": 0, "steps": 10, "step_seconds": 5.0, "wall_seconds": 9.0},
              {"epoch": 1, "first_step": 10, "steps": 10, "step_seconds": 5.0, "wall_seconds": 6.5}]
    explorations = [{"dsl_step": 10, "dsl_seconds": 1.0}, {"dsl_step": 15, "dsl_seconds": 0.5}]
    timing = train.time_breakdown(epochs, explorations, {0: 2.5})
    first, second = timing["epochs"]
    assert (first["exploration_seconds"], first["evaluation_seconds"]) == (1.0, 2.5)
    assert first["other_seconds"] == pytest.approx(0.5)
    assert (second["exploration_seconds"], second["evaluation_seconds"]) == (0.5, 0.0)
    assert second["other_seconds"] == pytest.approx(1.0)
    # (wall - evaluations) / (steps + explorations) = (15.5 - 2.5) / (10 + 1.5)
    assert timing["total"]["wall_over_steps"] == pytest.approx(13.0 / 11.5)

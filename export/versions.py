"""The TF Serving folder layout ``OUT/NAME/<version>/`` and writing it without ever losing a version.

* A version is written into a hidden scratch folder inside ``OUT/NAME`` (named with the
  writer's pid and host, ignored by TF Serving), checked, and renamed to its integer name
  under an exclusive lock of ``OUT/NAME`` (:func:`claim`): the version number is chosen
  (or re-checked) at that moment, so two concurrent exports never both claim version N,
  and an existing version is replaced only with ``overwrite``.
* Scratch folders of dead processes on this host are removed when the next export starts.
* ``OUT/models.config`` is rewritten under a lock of ``OUT`` and atomically replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Callable, Iterator

from export.builder import ExportError
from trainers.runs import remove_stale, replace_dir, scratch_dir

def folder_bytes(path: str | Path) -> int:
    """Total bytes of the regular files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def versions(model_dir: Path) -> list[int]:
    """The integer version folders of ``model_dir``, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` itself (no lock file), released on exit or
    when the process dies."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def plan_version(out: Path, name: str, version: int | None, overwrite: bool) -> int:
    """The version an export would get now (fail fast on a bad name or an existing version);
    :func:`claim` re-checks at the end."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ExportError(f"invalid model name {name!r} (letters, digits, '-', '_', '.')")
    if version is not None and int(version) < 0:
        raise ExportError(f"version must be a non-negative integer, got {version}")
    existing = versions(Path(out) / name)
    version = int(version) if version is not None else (existing[-1] + 1 if existing else 1)
    final = Path(out) / name / str(version)
    if final.exists() and not overwrite:
        raise ExportError(f"{final} already exists; pass --overwrite (or another --version)")
    return version


def claim(scratch: Path, model_dir: Path, version: int | None, overwrite: bool,
          finalize: Callable[[int], None]) -> tuple[int, Path]:
    """Rename the complete ``scratch`` folder to ``model_dir/<version>`` under the lock.

    ``version=None``: the next free integer at this moment. An existing version raises
    :class:`ExportError` unless ``overwrite`` (then it is swapped out, and deleted only
    after the new one is in place). ``finalize(version)`` runs first, under the lock (it
    records the version in the scratch folder's metadata).
    """
    with locked(model_dir):
        existing = versions(model_dir)
        number = int(version) if version is not None else (existing[-1] + 1 if existing else 1)
        final = model_dir / str(number)
        if final.exists() and not overwrite:
            raise ExportError(f"{final} already exists (written by another export meanwhile?); "
                              "pass --overwrite (or another --version)")
        finalize(number)
        replace_dir(scratch, final)
    return number, final


def write_models_config(serving_dir: str | Path) -> Path:
    """Write ``serving_dir/models.config``: a ModelServerConfig listing every model folder
    (a folder with at least one integer version) under ``serving_dir``."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    serving_dir = Path(serving_dir).resolve()
    with locked(serving_dir):
        config = model_server_config_pb2.ModelServerConfig()
        for model_dir in sorted(p for p in serving_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if versions(model_dir):
                entry = config.model_config_list.config.add()
                entry.name = model_dir.name
                entry.base_path = str(model_dir)
                entry.model_platform = "tensorflow"
        path = serving_dir / "models.config"
        tmp = serving_dir / f".models.config.{os.getpid()}.tmp"
        tmp.write_text(text_format.MessageToString(config))
        read_models_config(tmp)  # must parse back
        os.replace(tmp, path)
    return path


def read_models_config(path: str | Path):
    """Parse a ModelServerConfig text proto."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(Path(path).read_text(), model_server_config_pb2.ModelServerConfig())

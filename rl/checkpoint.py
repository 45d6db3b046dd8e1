"""Atomic checkpoints: a step is written into a temporary folder and renamed into place only when complete.

Layout: <output_dir>/checkpoints/step-000010/{model/ (HF folder), deepspeed/, trainer_state.json}, plus a
`latest` file naming the newest complete checkpoint (replaced atomically). A crash or kill -9 mid-write leaves a
`.tmp-*` folder that is ignored and cleaned on the next save; the previous checkpoint stays loadable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"


def _root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def begin(output_dir: str | Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (stale temporaries are removed)."""
    root = _root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:06d}"
    tmp.mkdir()
    return tmp


def _write_json_atomic(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, step: int, state: dict, keep: int) -> Path:
    """Write the trainer state last, rename the folder into place, point `latest` at it, prune old ones."""
    _write_json_atomic(tmp / STATE_FILE, dict(state, step=step))
    final = tmp.parent / f"step-{step:06d}"
    if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    _write_json_atomic(final.parent / "latest", {"step": step, "path": final.name})
    complete = sorted(p for p in final.parent.glob("step-*") if (p / STATE_FILE).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    root = _root(output_dir)
    pointer = root / "latest"
    if pointer.is_file():
        try:
            path = root / json.loads(pointer.read_text())["path"]
            if (path / STATE_FILE).is_file():
                return path
        except (ValueError, KeyError):
            pass  # a damaged pointer falls back to scanning
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def load_state(path: str | Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def link_final(output_dir: str | Path, checkpoint: Path) -> Path:
    """`<output_dir>/checkpoint-final` -> the HF model folder of the last checkpoint."""
    link = Path(output_dir) / "checkpoint-final"
    tmp = link.with_name(link.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(checkpoint / "model", link.parent), tmp)
    os.replace(tmp, link)
    return link

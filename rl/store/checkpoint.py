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

from rl.store.atomic import fsync_dir, write_atomic

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


def commit(tmp: Path, step: int, state: dict, keep: int) -> Path:
    """Write the trainer state last, rename the folder into place, point `latest` at it, prune old ones."""
    write_atomic(tmp / STATE_FILE, json.dumps(dict(state, step=step), indent=1))
    final = tmp.parent / f"step-{step:06d}"
    if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    write_atomic(final.parent / "latest", json.dumps({"step": step, "path": final.name}))
    # Only checkpoints older than this one are pruned (never a newer one, whatever left it there).
    older = sorted(p for p in final.parent.glob("step-*") if (p / STATE_FILE).is_file() and p.name < final.name)
    for old in older[:max(0, len(older) - (keep - 1))]:
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

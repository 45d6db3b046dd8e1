"""Every random seed a run derives from `trainer.seed`, in one place.

A seed is a function of (trainer.seed, what it is for, where in the run), never of a counter that lives in some
process: a resumed run derives the same seeds as an uninterrupted one and samples the same tokens (tested in
tests/test_e2e.py). The constants are large odd numbers so streams of different steps, rounds and workers do not
meet for any realistic run length; they are the values the project has always used, so runs reproduce bit for bit.
"""
from __future__ import annotations

import numpy as np

_STEP = 100_003  # rollout seeds: trainer.seed * _STEP + step
_ROUND = 1_000_003  # an extra draw round of the same step (dynamic sampling)
_HELD_OUT = 7_919  # held-out evaluation after `step`
_WORKER = 1_000  # one rollout worker's share of a generate call
# numpy streams (numpy_rng): the key that names the purpose, after the seed and any position keys.
GDRO_KEY = 0x6D647230  # Prompt-GDRO's sampler
PAIRS_KEY = 5  # online preference pairs of a step


def derive_seed(seed: int, purpose: str, step: int = 0, index: int = 0) -> int:
    """The seed for `purpose` at `step` (and `index`: the draw round, the worker, the split):

    - `rollout`: a training step's rollout (index: dynamic sampling's extra draw round, 0 for the first); also the
      preference-pair builder's (step: 0 for the train split, 1 for the eval split);
    - `held_out`: the held-out evaluation after `step`;
    - `worker`: rollout worker `index`'s part of a generate call whose seed is `seed`.
    """
    if purpose == "rollout":
        return seed * _STEP + step + _ROUND * index
    if purpose == "held_out":
        return seed + _HELD_OUT * (step + 1)
    if purpose == "worker":
        return seed * _WORKER + index
    raise ValueError(f"unknown seed purpose {purpose!r} (known: rollout, held_out, worker)")


__all__ = ["derive_seed"]


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator for `seed` and integer keys (what it is for, where in the run). numpy wants non-negative
    seeds: a negative one becomes its 64-bit two's complement, the identity for every seed >= 0."""
    return np.random.default_rng([int(seed) & (2**64 - 1), *map(int, keys)])

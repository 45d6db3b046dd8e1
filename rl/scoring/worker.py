"""Reward worker: scores completions with the configured reward functions.

The functions run in the main thread of a child process owned by this actor (rewards.isolation): math-verify's
signal.alarm timeouts work there, and a call that raises, hangs past the per-call limit, returns a non-finite
value or kills its process scores the affected samples 0 and is counted, while the run goes on.
"""
from __future__ import annotations

import dataclasses
import os


class RewardWorker:
    def __init__(self, functions: list[dict], timeout: float | None):
        from rewards.isolation import IsolatedRewards

        self.rewards = IsolatedRewards([(f["fn"], f.get("kwargs") or {}) for f in functions], timeout)
        # Resolve the specs now: a missing function fails while the run starts, not in the middle of step 1, and
        # the child is tied to this actor's main thread for its whole life.
        self.rewards.start()

    def ping(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> dict:
        """Per-function scores plus failure counts for this chunk of samples."""
        return dataclasses.asdict(self.rewards.score(prompts, completions, columns))

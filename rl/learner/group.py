"""The driver's handle on the learner ranks (one Ray actor per DeepSpeed rank, rl/learner/rank.py)."""
from __future__ import annotations

from functools import partial

import ray

from rl.cluster.placement import Placement
from rl.cluster.session import own_placement, role_threads, shutdown
from rl.cluster.watchdog import call_all
from rl.config.schema import Config
from rl.contracts import PreferencePair, TrainSequence
from rl.learner import updates
from rl.learner.engine import LearnerSetup
from rl.learner.rank import LearnerRank


class LearnerGroup:
    def __init__(self, cfg: Config, model_path: str, placement: Placement | None = None):
        n = cfg.learner.num_ranks
        placement = own_placement(self, cfg, "learner", placement)
        # A dead rank is never recreated: its DeepSpeed group is gone. The run stops; --resume continues it.
        actor, setup = ray.remote(LearnerRank), LearnerSetup.of(cfg)
        self.ranks = [actor.options(**placement.options("learner", r), max_restarts=0).remote(
            r, n, model_path, setup, role_threads(n, cfg)) for r in range(n)]
        self.watchdog = cfg.trainer.watchdog_seconds
        try:
            # All ranks on one node: their group's rendezvous listens on loopback only.
            nodes = {r["node"] for r in ray.get([rank.ping.remote() for rank in self.ranks])}
            addr, port = ray.get(self.ranks[0].address.remote(loopback=len(nodes) == 1))
            # Start-up may JIT-build DeepSpeed ops and load the model: it gets at least DeepSpeed's own 30 min.
            startup = None if self.watchdog is None else max(self.watchdog, 1800.0)
            call_all("learner", "setup", [(r, (addr, port)) for r in self.ranks], startup)
        except Exception:
            shutdown(self)  # the caller never gets a handle to clean up
            raise
        self.micro_batch_size = cfg.learner.micro_batch_size

    def update(self, name: str, items: list, plan_fn, reduce_fn=None):
        """Run the rl.learner.updates update `name` on `items` over all ranks, the generic path of every algorithm.

        plan_fn(items, num_ranks, micro_batch_size) -> (one shard per rank, plan); every rank gets its shard and
        the same plan. reduce_fn(per-rank results) -> the return value (default: the list of results)."""
        return self._dispatch("update", name, items, plan_fn, reduce_fn)

    def query(self, name: str, items: list, plan_fn, reduce_fn=None):
        """As `update`, for the no-grad rl.learner.updates query `name`."""
        return self._dispatch("query", name, items, plan_fn, reduce_fn)

    def _dispatch(self, method: str, name: str, items: list, plan_fn, reduce_fn):
        shards, plan = plan_fn(items, len(self.ranks), self.micro_batch_size)
        if len(shards) != len(self.ranks):  # a rank left out would hang the others in their ZeRO collectives
            raise ValueError(f"{name}: plan gave {len(shards)} shards for {len(self.ranks)} learner ranks")
        results = call_all("learner", method, [(r, (name, s, plan)) for r, s in zip(self.ranks, shards)],
                           self.watchdog)
        return results if reduce_fn is None else reduce_fn(results)

    def train(self, sequences: list[TrainSequence], mini_batches: int, max_len: int, on_policy: bool = True) -> dict:
        """Shard a step's sequences over ranks and run the policy-gradient update; returns summed statistics.

        on_policy: the sequences were sampled from the current weights (their old log-probs are then recomputed
        exactly by the learner's own forward when there is one pass and one mini-batch)."""
        plan = partial(updates.plan_policy, mini_batches=mini_batches, max_len=max_len, on_policy=on_policy)
        return self.update("policy", sequences, plan, updates.reduce_policy)

    def weights(self, wire_dtype: str | None = None):
        """ObjectRef of rank 0's numpy state dict (all ranks take part: ZeRO-3 gathers are collective); wire_dtype:
        rl.learner.engine.Engine.get_weights."""
        refs = [r.get_weights.remote(wire_dtype) for r in self.ranks]
        ray.get(refs[1:])  # raises if another rank failed; they return None
        return refs[0]

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Policy log-probs of given responses; every rank runs the forward (ZeRO-3 gathers), rank 0 answers."""
        return self.query("logprobs", list(zip(prompt_ids, response_ids)), updates.replicate, updates.first)

    def train_preference(self, pairs: list[PreferencePair]) -> dict:
        """One optimizer step on TODO/DPO pairs; returns batch means (loss, margin, rewards, train accuracies)."""
        return self.update("preference", pairs, updates.plan_pairs, updates.reduce_preference)

    def preference_logps(self, pairs: list[PreferencePair]) -> list[list[float]]:
        """[policy_chosen, policy_rejected, ref_chosen, ref_rejected] per pair, in order, computed over all ranks."""
        return self.query("preference_logps", pairs, updates.plan_pairs, updates.concat)

    def save(self, path: str) -> None:
        call_all("learner", "save_checkpoint", [(r, (path,)) for r in self.ranks], self.watchdog)

    def load(self, path: str) -> None:
        call_all("learner", "load_checkpoint", [(r, (path,)) for r in self.ranks], self.watchdog)

    def nodes(self) -> list[dict]:
        return ray.get([r.ping.remote() for r in self.ranks])

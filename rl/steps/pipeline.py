"""Each step's prompts and their rollout, on-policy or one step ahead.

trainer.max_staleness 0: drawn and generated when the step starts, from the current weights.
trainer.max_staleness 1 (one step off-policy): step k+1's prompts are drawn and generated (in a driver thread that
waits on the rollout actors) while the learner trains on step k, so they come from the weights before step k's
update. The learner then takes its PPO ratio against the rollout's own log-probs, which is the importance weight
pi_theta / pi_behaviour; at staleness 0 that ratio is 1 and the loss is the on-policy one (tested).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from rl.contracts import RolloutBatch
from rl.data.prompts import sampling_params
from rl.seeds import derive_seed


class RolloutPipeline:
    def __init__(self, run, per_step: int):
        self.run, self.cfg, self.per_step = run, run.cfg, per_step
        self.ahead: dict[int, tuple[list[dict], dict, Future | None]] = {}  # step -> (rows, sampler state, rollout)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead") if self.cfg.trainer.max_staleness \
            else None

    def prompts(self, step: int) -> tuple[list[dict], dict]:
        """The step's prompts and the sampler state right after drawing them (what its checkpoint stores)."""
        if step not in self.ahead:
            rows = self.run.sampler.next_batch(self.per_step)
            self.ahead[step] = (rows, self.run.sampler.state_dict(), None)
        return self.ahead[step][:2]

    def rollout(self, step: int, rows: list[dict]) -> tuple[RolloutBatch, int]:
        """(rollout, staleness): the one started during the previous step, else one generated now."""
        _, _, future = self.ahead.pop(step, (None, None, None))
        if future is not None:
            return future.result(), 1
        return self._generate(step, rows), 0

    def start_next(self, step: int) -> None:
        if self.pool is None or step > self.cfg.trainer.max_steps:
            return
        rows, state = self.prompts(step)
        self.ahead[step] = (rows, state, self.pool.submit(self._generate, step, rows))

    def settle(self) -> None:
        """Wait for a rollout in flight (its result stays for `rollout`): it must finish on the weights it
        started with before they are replaced."""
        for _, _, future in self.ahead.values():
            if future is not None:
                future.result()

    def close(self, wait: bool = True) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=not wait)

    def _generate(self, step: int, rows: list[dict]) -> RolloutBatch:
        params = sampling_params(self.cfg, n=self.cfg.rollout.group_size)
        return self.run.generate([r["prompt"] for r in rows], params,
                                 seed=derive_seed(self.cfg.trainer.seed, "rollout", step))

"""One record per sample: everything a step learns about one response, from generation to the learner.

A rollout worker returns a `RolloutBatch` (parallel lists pickle cheaply, so it stays the worker -> driver
format). Right after generation the driver turns it into a `StepSamples`, one `Sample` per response, and every
later stage writes into those records instead of carrying a parallel list of its own:

    generation  -> StepSamples.build(rows, sizes, batch)   prompt, response, rollout log-probs, entropy, text
    scoring     -> add_scores(scored)                      per-function rewards, total, verdict
    group filters (rl/steps/filters.py)                    keep=False on every sample of a dropped group
    advantages  -> rl/steps/policy.py `advantages`         one advantage per sample, grouped by `group`
    sample filters (rl/steps/filters.py)                   keep=False on a sample that leaves only the loss
    learner     -> a TrainSequence per sample with keep

A step's groups are its prompt rows: `rows[g]`'s samples carry `group == g` and sit contiguous, in row order
(the layout reward workers and advantage estimators rely on); a group's size is how many samples it has, so a
fixed group size and Rollout-GDRO's per-prompt sizes are the same thing here.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from rewards.isolation import RewardResult, merge_results
from rl.algo.groups import check_sizes
from rl.contracts import RolloutBatch
from rl.scoring.score import ScoredBatch


@dataclass
class Sample:
    group: int  # its prompt row in the step's `rows`, which is also its group (a prompt's samples are one group)
    prompt_id: str | None  # that row's `id`
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # each sampled token's log-prob under the sampling policy, as the rollout measured it
    entropy_sum: float  # summed full-vocabulary entropy over the response (0.0 where not measured)
    finish_reason: str  # "stop" (EOS) or "length" (truncated)
    text: str
    speculation: dict  # speculative decoding counts ({} for a plainly decoded sample; rl.contracts.RolloutBatch)
    rewards: dict[str, float] = field(default_factory=dict)  # per reward function, filled by scoring
    total: float = 0.0  # the weighted sum of `rewards`
    correct: float = 0.0  # the verifier's verdict: 1.0 where `reward.accuracy` scored > 0.5
    advantage: float | None = None  # filled by the advantage estimator
    keep: bool = True  # False: a filter took it out of the loss (and, for a dropped group, out of the step)

    @property
    def tokens(self) -> int:
        return len(self.response_ids)


@dataclass
class StepSamples:
    """One step's groups: its prompt rows and their samples, in order."""
    rows: list[dict]
    samples: list[Sample]
    # What the reward workers reported beside the scores: failure / timeout / None counts, seconds, first errors.
    # They describe the step's scoring calls, not single samples, so `take` keeps them whole.
    reward_log: RewardResult = field(default_factory=RewardResult)

    @classmethod
    def build(cls, rows: list[dict], sizes: list[int], batch: RolloutBatch) -> "StepSamples":
        """The records of a freshly generated batch: sizes[g] samples of rows[g], contiguous, in row order."""
        sizes = check_sizes(sizes, len(batch))
        if len(sizes) != len(rows):
            raise ValueError(f"{len(sizes)} group sizes for {len(rows)} prompt rows")
        groups = [g for g, n in enumerate(sizes) for _ in range(n)]
        speculation = batch.speculation or [{} for _ in groups]  # a hand-built batch may leave the column out
        samples = [Sample(g, rows[g].get("id"), *fields) for g, *fields in
                   zip(groups, batch.prompt_ids, batch.response_ids, batch.logprobs, batch.entropy_sum,
                       batch.finish_reason, batch.text, speculation, strict=True)]
        return cls(list(rows), samples)

    def __len__(self) -> int:
        return len(self.samples)

    # ------------------------------------------------------------------------------------------- layout
    def group_index(self) -> list[int]:
        """The group of every sample, in order (what the advantage estimators group by)."""
        return [s.group for s in self.samples]

    def sizes(self) -> list[int]:
        """Samples per group, in row order."""
        counts = [0] * len(self.rows)
        for s in self.samples:
            counts[s.group] += 1
        return counts

    def groups(self) -> list[list[Sample]]:
        """Each group's samples, in row order."""
        out: list[list[Sample]] = [[] for _ in self.rows]
        for s in self.samples:
            out[s.group].append(s)
        return out

    def kept_groups(self) -> list[int]:
        """Groups with at least one sample left in (a group filter drops a group by clearing all of its keeps)."""
        return [g for g, members in enumerate(self.groups()) if any(s.keep for s in members)]

    def take(self, groups: list[int]) -> "StepSamples":
        """The given groups, in the given order, renumbered 0, 1, ...; copies of their records, so what a later
        stage writes into them (advantage, keep) does not reach this container's."""
        members = self.groups()
        samples = [dataclasses.replace(s, group=new) for new, g in enumerate(groups) for s in members[g]]
        return StepSamples([self.rows[g] for g in groups], samples, self.reward_log)

    @classmethod
    def concat(cls, parts: list["StepSamples"]) -> "StepSamples":
        """Several containers as one, in order (e.g. the rounds of a dynamic-sampling draw); groups renumbered."""
        offsets = itertools.accumulate([len(p.rows) for p in parts], initial=0)
        samples = [dataclasses.replace(s, group=s.group + off) for p, off in zip(parts, offsets) for s in p.samples]
        return cls([r for p in parts for r in p.rows], samples, merge_results([p.reward_log for p in parts]))

    # ---------------------------------------------------------------------------------------- scoring
    def add_scores(self, scored: ScoredBatch) -> None:
        """Write a ScoredBatch of these samples (same order) into the records."""
        if len(scored.total) != len(self.samples):
            raise ValueError(f"{len(scored.total)} scores for {len(self.samples)} samples")
        res = scored.result
        for i, s in enumerate(self.samples):
            s.total, s.correct = scored.total[i], scored.correct[i]
            s.rewards = {name: vals[i] for name, vals in res.scores.items()}
        self.reward_log = RewardResult({}, dict(res.failures), dict(res.timeouts), dict(res.nones), dict(res.seconds),
                                       list(res.errors))

    def reward_names(self) -> list[str]:
        return list(self.samples[0].rewards) if self.samples else []

    # ----------------------------------------------------------------------------------------- columns
    def totals(self) -> list[float]:
        return [s.total for s in self.samples]

    def verdicts(self) -> list[float]:
        return [s.correct for s in self.samples]

    def tokens(self) -> list[int]:
        return [s.tokens for s in self.samples]

    def batch(self) -> RolloutBatch:
        """The samples as a RolloutBatch again (the functions written against the wire format read it)."""
        out = RolloutBatch()
        for s in self.samples:
            out.append(s.prompt_ids, s.response_ids, s.logprobs, s.entropy_sum, s.finish_reason, s.text,
                       s.speculation)
        return out


__all__ = ["Sample", "StepSamples"]

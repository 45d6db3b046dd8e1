"""Scoring a rollout batch: the one place that builds reward columns and calls the reward workers, for training
steps, online preference pairs and the eval alike (so the eval cannot disagree with the training signal)."""
from __future__ import annotations

from dataclasses import dataclass

from rewards.isolation import RewardResult, weighted_total
from rl.contracts import RolloutBatch


@dataclass
class ScoredBatch:
    total: list[float]  # weighted sum of the reward functions, per sample
    correct: list[float]  # 1.0 where the accuracy function scored > 0.5 (the verifier's verdict), else 0.0
    result: RewardResult  # per-function scores, failure and timeout counts, first error messages


def reward_columns(rows: list[dict], batch: RolloutBatch, sizes: list[int], answer_key: str = "answer") \
        -> dict[str, list]:
    """Dataset columns repeated per sample (TRL's reward contract), plus the sampled token ids and counts.

    The answer arrives as `answer` and also under the dataset's own column name, so a reward written for TRL
    against that dataset finds the column it expects. sizes[g]: the samples of rows[g] (contiguous, in row order).
    """
    skip = {"prompt", "problem"}
    columns = {k: [r[k] for r, n in zip(rows, sizes) for _ in range(n)] for k in rows[0] if k not in skip}
    columns.setdefault(answer_key, columns["answer"])
    columns["completion_ids"] = batch.response_ids
    columns["completion_tokens"] = batch.tokens
    columns["finish_reason"] = batch.finish_reason  # "stop" (EOS) or "length" (truncated)
    columns["group_id"] = [g for g, n in enumerate(sizes) for _ in range(n)]  # samples of one prompt
    return columns


def score_batch(rewards, rows: list[dict], prompts: list[str], batch: RolloutBatch, sizes: list[int],
                weights: dict[str, float], accuracy: str, answer_key: str = "answer") -> ScoredBatch:
    """Score `batch` (sizes[g] samples of rows[g], contiguous, in row order; one size per row even when they are
    all equal) on the reward workers (`rewards`: a RewardGroup, which keeps every group on one worker).

    weights: reward function -> weight of its term in the total; accuracy: the function whose verdict (> 0.5)
    counts as correct.
    """
    sizes = [int(n) for n in sizes]
    if len(sizes) != len(rows):
        raise ValueError(f"{len(sizes)} group sizes for {len(rows)} rows")
    expanded = [p for p, n in zip(prompts, sizes) for _ in range(n)]
    result = rewards.score(expanded, batch.text, reward_columns(rows, batch, sizes, answer_key), sizes)
    correct = [float(s > 0.5) for s in result.scores[accuracy]]
    return ScoredBatch(weighted_total(result, weights), correct, result)


def score_configured(rewards, cfg, rows: list[dict], batch: RolloutBatch, sizes: list[int]) -> ScoredBatch:
    """`score_batch` with a run config's reward weights, accuracy function and answer column (prompts: the rows'
    rendered `prompt`)."""
    r = cfg.reward
    return score_batch(rewards, rows, [row["prompt"] for row in rows], batch, sizes,
                       {f.fn: f.weight for f in r.functions}, r.accuracy, cfg.data.answer_key)

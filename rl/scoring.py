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


def reward_columns(rows: list[dict], batch: RolloutBatch, group_size: int, answer_key: str = "answer") \
        -> dict[str, list]:
    """Dataset columns repeated per sample (TRL's reward contract), plus the sampled token ids and counts.

    The answer arrives as `answer` and also under the dataset's own column name, so a reward written for TRL
    against that dataset finds the column it expects.
    """
    skip = {"prompt", "problem"}
    columns = {k: [r[k] for r in rows for _ in range(group_size)] for k in rows[0] if k not in skip}
    columns.setdefault(answer_key, columns["answer"])
    columns["completion_ids"] = batch.response_ids
    columns["completion_tokens"] = batch.tokens
    columns["finish_reason"] = batch.finish_reason  # "stop" (EOS) or "length" (truncated)
    columns["group_id"] = [g for g in range(len(rows)) for _ in range(group_size)]  # samples of one prompt
    return columns


def score_batch(rewards, rows: list[dict], prompts: list[str], batch: RolloutBatch, group_size: int,
                weights: dict[str, float], accuracy: str, answer_key: str = "answer") -> ScoredBatch:
    """Score `batch` (group_size samples per row, contiguous) on the reward workers (`rewards`: a RewardGroup).

    weights: reward function -> weight of its term in the total; accuracy: the function whose verdict (> 0.5)
    counts as correct.
    """
    expanded = [p for p in prompts for _ in range(group_size)]
    result = rewards.score(expanded, batch.text, reward_columns(rows, batch, group_size, answer_key), group_size)
    correct = [float(s > 0.5) for s in result.scores[accuracy]]
    return ScoredBatch(weighted_total(result, weights), correct, result)

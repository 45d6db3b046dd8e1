"""What an algorithm plugs into the run lifecycle (rl/trainer.py): a `Step`, and the `Run` it is handed.

A step kind declares
- where its data comes from: `items()` returns what the lifecycle's resumable sampler draws from (prompt rows that
  the step turns into rollouts and rewards, or records of a dataset such as preference pairs), `per_step` how many
  it draws a step, `roles` which actor groups it needs;
- what the learner computes on it: `draw()` takes the step's items from the sampler (and may prepare more, e.g.
  rollouts), returning a `Draw`; `run()` gets that Draw back, does one step and returns its metrics row. Nothing
  is left on the step between the two: what `run` needs travels in the Draw;
- optional hooks around the loop (`start`, `finish`) and state that must survive a resume (`state_dict`).
The lifecycle owns everything else: setup, placement, resume, checkpoints, held-out evaluation, hooks, teardown.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.config.schema import Config
from rl.contracts import RolloutBatch
from rl.store.metrics import MetricsLogger, summarize
from rl.data.prompts import held_out_rows, prepare_prompts
from rl.scoring.score import ScoredBatch, score_configured
from rl.steps.samples import StepSamples

ROLLOUT_ROLES = ("rollout", "reward", "learner")


@dataclass
class Run:
    """One run's live state, as the lifecycle hands it to steps and hooks. A role the run did not start is None."""
    cfg: Config
    out_dir: Path
    tokenizer: object
    model_path: str
    metrics: MetricsLogger
    sampler: object  # rl.data.loading.PromptSampler over the step's items
    start_step: int
    rollouts: object = None  # rl.rollout.group.RolloutGroup
    rewards: object = None  # rl.scoring.group.RewardGroup
    learner: object = None  # rl.learner.group.LearnerGroup
    weights: object = None  # rl.sync.owner.WeightSync: the one owner of the weight version

    def updated(self, step: int) -> None:
        """Record that the learner now holds step `step`'s update (nothing to record without rollout workers)."""
        if self.weights is not None:
            self.weights.updated(step)

    def sync(self) -> None:
        """Bring the rollout workers to the learner's weights, if they are behind."""
        if self.weights is not None:
            self.weights.sync()

    def generate(self, prompts: list[str], params, seed: int) -> RolloutBatch:
        return self.rollouts.generate(prompts, params, seed, weights=self.weights)

    def score(self, rows: list[dict], batch: RolloutBatch, sizes: list[int]) -> ScoredBatch:
        """The configured rewards on `batch` (sizes[g] samples of rows[g], contiguous, in row order)."""
        return score_configured(self.rewards, self.cfg, rows, batch, sizes)


@dataclass
class Draw:
    """What `Step.draw` took for one step, handed to `Step.run` as it is."""
    items: list  # the step's items in draw order (prompt rows: the lifecycle logs their ids as the `prompts` event)
    sampler_state: dict  # the sampler right after drawing them: what this step's checkpoint stores
    payload: Any = None  # whatever else the step kind prepared while drawing (rl/steps/adaptive.py: scored rounds)


class Step:
    roles: tuple[str, ...] = ROLLOUT_ROLES
    plot_keys: tuple[str, ...] = ("reward", "accuracy", "response_tokens_mean")

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def check(self, tokenizer) -> None:
        """Config and data problems pydantic cannot see, raised before any actor starts."""

    def items(self, tokenizer) -> tuple[list, dict]:
        """What the sampler draws from, and counts of what was read and skipped. Default: the training prompts."""
        return prepare_prompts(self.cfg, tokenizer, self.cfg.data.train, self.cfg.data.train_split,
                               limit=self.cfg.data.train_limit)

    @property
    def per_step(self) -> int:
        return self.cfg.rollout.prompts_per_step

    def describe(self) -> str:
        """What one step consumes, in words (the dry run prints it)."""
        r = self.cfg.rollout
        return f"{self.per_step} prompts x {r.group_size} samples of <= {r.max_new_tokens} tokens"

    def make_sampler(self, items: list):
        """The resumable sampler the lifecycle draws the step's items from (default: seeded epochs of every item,
        rl.data.loading.PromptSampler; a step kind may draw otherwise, e.g. Prompt-GDRO in rl/steps/adaptive.py)."""
        from rl.data.loading import PromptSampler

        return PromptSampler(items, seed=self.cfg.trainer.seed, shuffle=self.cfg.data.shuffle)

    def held_out(self, tokenizer) -> list[dict]:
        """Prompt rows of the lifecycle's held-out task accuracy (rollout + verifier); [] skips it."""
        return held_out_rows(self.cfg, tokenizer, self.cfg.data.eval_size)

    def start(self, run: Run) -> dict:
        """After the actors started and the checkpoint (if any) was restored; returns entries for the summary."""
        return {}

    def draw(self, run: Run, step: int) -> Draw:
        """The step's items and the sampler state right after drawing them (what the step's checkpoint stores)."""
        items = run.sampler.next_batch(self.per_step)
        return Draw(items, run.sampler.state_dict())

    def run(self, run: Run, step: int, draw: Draw) -> dict:
        raise NotImplementedError

    def finish(self, run: Run) -> dict:
        """After the last step, before the final checkpoint; returns entries for the summary."""
        return {}

    def abort(self) -> None:
        """The run is being interrupted: drop work in flight without waiting for it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def score_samples(run: Run, samples: StepSamples, batch: RolloutBatch) -> None:
    """Score freshly built records through `run.score` and write the scores into them (`batch`: the rollout they
    were built from, in the layout the reward workers take)."""
    samples.add_scores(run.score(samples.rows, batch, samples.sizes()))


def rollout_metrics(samples: StepSamples) -> dict:
    """The metrics every rollout-based step logs, whatever it trains on: over all of `samples`, whatever their
    keep flags (a truncated sample the overlong filter took out of the loss still counts here)."""
    tokens, correct, total = samples.tokens(), samples.verdicts(), samples.totals()
    token_stats = summarize(tokens)
    finish = [s.finish_reason for s in samples.samples]
    row = {
        "reward": sum(total) / len(total), "accuracy": sum(correct) / len(correct),
        "response_tokens_mean": token_stats["mean"], "response_tokens_max": token_stats["max"],
        "generated_tokens": sum(tokens),  # the step's generation cost (rl/steps/adaptive.py adds dropped draws)
        "truncation_rate": finish.count("length") / len(tokens),
        "entropy": sum(s.entropy_sum for s in samples.samples) / max(1, sum(tokens)),  # mean per token
        "tokens_correct_mean": _mean([t for t, c in zip(tokens, correct) if c > 0.5]),
        "tokens_incorrect_mean": _mean([t for t, c in zip(tokens, correct) if c <= 0.5]),
        "reward_failures": sum(samples.reward_log.failures.values()),
        "reward_timeouts": sum(samples.reward_log.timeouts.values()),
    }
    for name in samples.reward_names():
        vals = [s.rewards[name] for s in samples.samples]
        row[f"reward/{name}"] = sum(vals) / len(vals)
    # Speculative rollouts: how much drafting paid this step (absent when nothing was speculated).
    spec = samples.batch().speculation_stats()
    if spec:
        row["spec_acceptance_rate"], row["spec_tokens_per_forward"] = spec["acceptance_rate"], spec["tokens_per_forward"]
    return row


def log_rollout_events(run: Run, step: int, samples: StepSamples) -> None:
    """Reward failures, and every `logging.sample_every` steps one example completion, into events.jsonl."""
    if samples.reward_log.errors:
        run.metrics.log_event("reward_failures", {"step": step, "errors": samples.reward_log.errors[:5]})
    every = run.cfg.logging.sample_every
    if every and step % every == 0:
        first = samples.samples[0]
        run.metrics.log_event("sample", {"step": step, "prompt": samples.rows[first.group]["prompt"],
                                         "completion": first.text, "reward": first.total})


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")  # NaN is logged as null: "no such response this step"

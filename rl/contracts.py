"""Typed contracts between the roles: what a generation backend returns, what the learner trains on.

Plain dataclasses, so they pickle through Ray unchanged and read as field names instead of string keys. The
rollout batch keeps its samples flat, the G samples of one prompt contiguous (group g is rows g*G .. g*G+G-1), which
is the layout every reward, advantage and pairing function relies on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class StaleWeightsError(RuntimeError):
    """Raised by a recreated rollout worker asked to generate before it got the current weights back (handled by
    rl.cluster.watchdog.call_all). Defined here, not in rl.cluster.watchdog, so a rollout worker imports without Ray
    (bench/gpu_check.py runs one on a machine that has no Ray)."""


@dataclass
class RolloutBatch:
    """Samples from one `generate` call, one entry per sample in every list."""
    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    # Log-prob of each sampled token under the sampling policy (after temperature); [] when not measured.
    logprobs: list[list[float]] = field(default_factory=list)
    # Summed full-vocabulary entropy over the response's steps; 0.0 where the backend cannot measure it.
    entropy_sum: list[float] = field(default_factory=list)
    finish_reason: list[str] = field(default_factory=list)  # "stop" (EOS generated) or "length" (budget used up)
    text: list[str] = field(default_factory=list)
    # Speculative decoding (rl/rollout/speculative.py), per sample: {"forwards": verifying forwards it took part
    # in, "drafted": drafted tokens, "accepted": drafted tokens kept}; {} where the sample was decoded plainly.
    speculation: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def tokens(self) -> list[int]:
        """Response length in tokens, per sample."""
        return [len(r) for r in self.response_ids]

    def speculation_stats(self) -> dict[str, float]:
        """Over the speculated samples: acceptance_rate (accepted / drafted tokens), tokens_per_forward (response
        tokens per sequence and verifying forward; 1 is plain decoding), drafted, accepted ({} if none speculated)."""
        rows = [(s, len(r)) for s, r in zip(self.speculation, self.response_ids) if s]
        if not rows:
            return {}
        drafted, accepted = sum(s["drafted"] for s, _ in rows), sum(s["accepted"] for s, _ in rows)
        forwards = sum(s["forwards"] for s, _ in rows)
        return {"acceptance_rate": accepted / drafted if drafted else 0.0,
                "tokens_per_forward": sum(n for _, n in rows) / forwards if forwards else 0.0,
                "drafted": float(drafted), "accepted": float(accepted)}

    def append(self, prompt_ids: list[int], response_ids: list[int], logprobs: list[float], entropy_sum: float,
               finish_reason: str, text: str, speculation: dict | None = None) -> None:
        self.prompt_ids.append(prompt_ids)
        self.response_ids.append(response_ids)
        self.logprobs.append(logprobs)
        self.entropy_sum.append(entropy_sum)
        self.finish_reason.append(finish_reason)
        self.text.append(text)
        self.speculation.append(speculation or {})

    @classmethod
    def concat(cls, parts: list["RolloutBatch"]) -> "RolloutBatch":
        out = cls()
        for part in parts:
            for f in dataclasses.fields(cls):
                getattr(out, f.name).extend(getattr(part, f.name))
        return out


@dataclass
class TrainSequence:
    """One sampled response as the policy-gradient learner consumes it."""
    prompt_ids: list[int]
    response_ids: list[int]
    old_logprobs: list[float]  # the behaviour policy's log-probs, measured by the rollout
    advantage: float
    mini_batch: int = 0  # set by the learner group when it shards a step over mini-batches
    ref_logprobs: list[float] | None = None  # filled on the learner when kl_coef > 0


@dataclass
class PreferencePair:
    """A (prompt, chosen, rejected) triple, or a tie when `tie` (then chosen/rejected is only an order)."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    tie: bool = False
    weight: float = 1.0  # 0 for the stand-in a rank without pairs runs to keep the ZeRO collectives in step
    kind: str = "preference"  # online pairing: preference / shorter / tie_correct / tie_incorrect
    index: tuple[int, int] | None = None  # online pairing: the two samples' rows in the rollout batch
    stand_in: bool = False



@dataclass
class SftExample:
    """One supervised example (SFT). `prompt_ids` is the rendered prompt, never trained on; `completion_ids` is
    everything after it, with a 0/1 `loss_mask` per token: 1 on what the model should learn to write (a completion,
    or every assistant turn of a conversation, each with its end-of-turn token), 0 on what it only reads (later user
    turns, the assistant headers of the chat template)."""
    prompt_ids: list[int]
    completion_ids: list[int]
    loss_mask: list[int]
    id: str = ""
    weight: float = 1.0  # 0 for the stand-in a rank without examples runs to keep the ZeRO collectives in step
    stand_in: bool = False

    @property
    def num_tokens(self) -> int:
        """Trained tokens: the SFT loss's denominator counts these."""
        return sum(self.loss_mask)

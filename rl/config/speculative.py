"""Config section `rollout.speculative` (assembled into the one schema by rl/config/schema.py): lossless speculative
rollouts (rl/rollout/speculative.py). Every default lives here; the worker and the benchmark read these fields."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from rl.config.base import Section


class SpeculativeConfig(Section):
    """Draft k tokens cheaply, verify them in one forward of the policy, keep them by the speculative-sampling rule
    (Leviathan et al. 2023, Chen et al. 2023): the samples follow the policy's distribution exactly, and the log-probs
    are the policy's own from the verifying forward. Pays where a decode step is bound by streaming the weights (a
    small active batch: the long tail of a group) and where drafts are often right (repetitive chains of thought)."""
    drafter: Literal["none", "ngram", "model"] = Field(
        "none", description="`none`: plain decoding (off). `ngram`: prompt-lookup drafting, the continuation of the "
        "latest earlier occurrence of the last n tokens of prompt + response (no model). `model`: a small causal LM "
        "with the policy's tokenizer (`draft_model`) samples the draft from its own distribution.")
    num_draft_tokens: int = Field(4, ge=1, le=16, description="Most tokens drafted per sequence and step (k); the "
                                  "verifying forward runs k + 1 positions per sequence.")
    ngram_max: int = Field(3, ge=1, description="Longest suffix matched by the n-gram drafter (tried first).")
    ngram_min: int = Field(1, ge=1, description="Shortest suffix matched by the n-gram drafter.")
    draft_model: Optional[str] = Field(None, description="drafter `model`: a model spec as for model.path (folder, "
                                       "hub id, `tiny:llama`, ...) sharing the policy's vocabulary.")
    tail_batch_size: int = Field(4, ge=0, description="Speculate whenever this few sequences or fewer are still "
                                 "decoding (the tail of a chunk: a step there streams all weights for a handful of "
                                 "tokens, so verifying k more costs almost nothing).")
    min_acceptance: float = Field(0.4, ge=0, le=1, description="With more sequences active than tail_batch_size, "
                                  "speculate only while the measured acceptance (EMA of accepted / drafted tokens) "
                                  "is at least this (0: always speculate). Speculation gains when acceptance exceeds "
                                  "verify_token_cost.")
    adaptive_k: bool = Field(True, description="Pick k each step from the measured acceptance a: the k <= "
                             "num_draft_tokens maximising expected tokens per forward (1 - a^(k+1)) / (1 - a) over "
                             "its cost 1 + verify_token_cost * k (false: always num_draft_tokens).")
    verify_token_cost: float = Field(0.35, ge=0, description="Cost of one more verified position relative to a "
                                     "one-token decode step (docs: ~0.35 at batch 32 for SmolLM2 on this CPU, "
                                     "5 positions ~2.5x one; lower at small batches).")
    acceptance_beta: float = Field(0.8, ge=0, lt=1, description="EMA factor of the measured acceptance (per step "
                                   "with drafts); it starts at the first measurement.")
    probe_every: int = Field(8, ge=1, description="While the rule says plain decoding, still speculate every N-th "
                             "step so the acceptance estimate follows the policy.")

    distill_every: int = Field(0, ge=0, description="drafter `model`: every N generate calls, train the draft model "
                               "on the policy's latest samples (TLT's online drafter: cross-entropy on the policy's "
                               "sampled tokens), so acceptance follows the policy as RL moves it. 0: the draft stays "
                               "as loaded. Training the draft never changes what is sampled, only how fast.")
    distill_steps: int = Field(4, ge=1, description="Optimiser steps per distillation round.")
    distill_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the draft model.")
    distill_buffer: int = Field(512, ge=1, description="Latest sampled sequences kept to distil on.")
    distill_batch: int = Field(16, ge=1, description="Sequences per distillation step.")

    @model_validator(mode="after")
    def _consistent(self):
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min: {self.ngram_min} exceeds ngram_max {self.ngram_max}")
        if self.drafter == "model" and not self.draft_model:
            raise ValueError("draft_model: drafter `model` needs a draft model (a spec as for model.path)")
        if self.distill_every and self.drafter != "model":
            raise ValueError(f"distill_every: only the `model` drafter trains (drafter is `{self.drafter}`)")
        if self.draft_model and self.drafter != "model":
            raise ValueError(f"draft_model: only used by drafter `model` (drafter is `{self.drafter}`)")
        return self

    @property
    def enabled(self) -> bool:
        return self.drafter != "none"

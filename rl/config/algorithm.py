"""Config sections of the algorithm and the learner (assembled into the one schema by rl/config/schema.py, which is where
users and code import them from). Formulas and caveats: docs/algorithms.md."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from rl.config.base import Section


class FGOConfig(Section):
    """Fine-grained group optimization (docs/algorithms.md, "FGO"): inside each group, correct and incorrect
    responses form two subgroups whose rewards are +-softmax of length/entropy ratios."""
    alpha: float = Field(0.01, ge=0, description="Length exponent: larger favours shorter correct answers more "
                         "(0.01: the released code; the poster's ablations use 0 and 1).")
    beta: float = Field(1.0, ge=0, description="Entropy exponent: favours low-entropy correct answers and penalises "
                        "low-entropy wrong ones most.")
    entropy: Literal["sampled_token_sum", "mean_token_entropy"] = Field(
        "sampled_token_sum", description="H_i: `sampled_token_sum` = sum over the response of -p log p of the "
        "sampled token (the released code; grows with length); `mean_token_entropy` = full-vocabulary entropy "
        "averaged over the response's tokens (a cleaner ablation, not the published FGO).")
    weighted_subgroups: Literal["both", "correct"] = Field(
        "both", description="Which subgroups FGO reweights: `both` (the published method) or `correct` (the "
        "incorrect subgroup gets equal weights: only correct answers are pushed toward short and confident; our "
        "option against the sign problem of docs/algorithms.md, 'The sign condition').")


class TodoConfig(Section):
    """TODO / DPO preference training (docs/algorithms.md, "TODO and DPO"), offline on a preference file or online
    from verifier-built pairs of each rollout group. Used when algorithm.name is `todo` or `dpo` (dpo ignores alpha)."""
    beta: float = Field(0.01, gt=0, description="Scale of the implicit reward: mu = beta * (policy - reference "
                        "log-ratio of chosen minus that of rejected), log-probs summed over the response.")
    alpha: float = Field(0.5, ge=0, description="TOBT tie margin (phi = e^alpha): a win needs mu > alpha. 0 makes "
                         "TODO plain DPO; ties are then impossible and dropped.")
    online: bool = Field(False, description="false: train on `train_data` pairs; true: build pairs from each "
                         "rollout group with the verifier (`reward.accuracy`), see `pairing`.")
    train_data: Optional[str] = Field(None, description="Offline preference pairs: .jsonl/.json/.parquet file or "
                                      "`datasets` hub name with columns prompt, chosen, rejected, tie (chat message "
                                      "lists or plain strings). Rows missing a field are skipped and counted.")
    train_split: str = Field("train", description="Split of `train_data` when it is a hub dataset.")
    eval_data: Optional[str] = Field(None, description="Held-out preference pairs (same format) for TOBT three-way "
                                     "and sign accuracy; null: no preference evaluation.")
    eval_split: str = Field("test", description="Split of `eval_data` when it is a hub dataset.")
    eval_size: int = Field(256, ge=0, description="Held-out pairs used (0: all of them).")
    eval_every: int = Field(0, ge=0, description="Preference evaluation every N steps (0: only at start and end).")
    pairs_per_step: int = Field(16, ge=1, description="Offline: pairs per optimizer step (the data order is "
                                "seeded and resumable, like prompts).")
    dpo_ties: Literal["drop", "as_preference"] = Field(
        "drop", description="What `dpo` does with tied pairs: drop them, or train them as preferences in their "
        "stored order (what the TODO paper's DPO baseline did with its mixed files).")
    pairing: Literal["priority", "random"] = Field(
        "priority", description="Online: which candidate pairs of a group are used. `priority`: correct-vs-incorrect "
        "first, then shorter-vs-longer correct, then ties (random within a kind); `random`: uniform over all.")
    pairs_per_group: int = Field(4, ge=0, description="Online: pairs taken per rollout group (0: every candidate).")
    tie_length_ratio: float = Field(1.25, ge=1, description="Online: two correct (or two incorrect) responses are a "
                                    "tie when longer/shorter token length <= this; two correct ones further apart "
                                    "make a pair preferring the shorter.")
    incorrect_ties: bool = Field(True, description="Online: also tie two incorrect responses of similar length.")


class SftConfig(Section):
    """Supervised fine-tuning, the cold start before RL (docs/algorithms.md, "SFT"): `data.train` (and `data.eval`
    for the held-out loss) in TRL's prompt-completion (`prompt`, `completion`) or conversational (`messages`) format.
    Used when algorithm.name is `sft`."""
    examples_per_step: int = Field(16, ge=1, description="Examples per optimizer step (the data order is seeded "
                                   "and resumable, like prompts); the loss is the token mean over all of them.")
    max_completion_tokens: int = Field(0, ge=0, description="Rows whose completion (everything after the prompt) "
                                       "has more tokens than this are skipped and counted (0: no limit); prompts "
                                       "are bounded by data.max_prompt_tokens.")
    eval_size: int = Field(256, ge=0, description="Held-out examples of `data.eval` used for `eval_loss` (0: all).")
    eval_every: int = Field(0, ge=0, description="Held-out loss every N steps (0: only at start and end); "
                            "logged as `eval_loss` in the step's metrics row.")


class AlgorithmConfig(Section):
    name: Literal["grpo", "fgo", "todo", "dpo", "sft"] = Field(
        "grpo", description="Learner algorithm: `grpo` (group-normalised rewards), `fgo` (fine-grained group "
        "optimization, see `fgo`), `todo` (ternary-preference DPO, see `todo`), `dpo` (plain DPO, same path) or "
        "`sft` (supervised fine-tuning on `data.train`, see `sft`).")
    scale_by_std: Optional[bool] = Field(
        None, description="Divide group advantages by the group std. Default (null): true for grpo, false for fgo "
        "(the FGO poster's Dr.GRPO form; true is the released FGO code's form). false with grpo is Dr.GRPO.")
    advantage: Optional[str] = Field(
        None, description="grpo / fgo: the advantage estimator, by its registered name (rl/algo/advantages.py). "
        "Default (null): the algorithm's own (`grpo`: group-normalised total reward; `fgo`: FGO's subgroup weights).")
    fgo: FGOConfig = Field(default_factory=FGOConfig, description="FGO parameters (used when name is fgo); FGO's "
                           "correct/incorrect split is the score of `reward.accuracy` (> 0.5 = correct).")
    todo: TodoConfig = Field(default_factory=TodoConfig, description="TODO/DPO parameters and preference data "
                             "(used when name is todo or dpo); the policy's frozen reference is the start model.")
    sft: SftConfig = Field(default_factory=SftConfig, description="SFT parameters (used when name is sft).")
    clip_low: Optional[float] = Field(None, ge=0, description="PPO ratio lower clip: 1 - clip_low. Default (null): "
                                      "0.2 at importance_sampling_level token, 3e-4 at sequence / sequence_token.")
    clip_high: Optional[float] = Field(None, ge=0, description="PPO ratio upper clip: 1 + clip_high (clip-higher, "
                                       "DAPO). Default (null): 0.28 at importance_sampling_level token, 4e-4 at "
                                       "sequence / sequence_token.")
    importance_sampling_level: Literal["token", "sequence", "sequence_token"] = Field(
        "token", description="The PPO ratio (names as TRL's GRPOConfig; docs/algorithms.md, \"GSPO\"). `token`: "
        "pi/pi_old per token (GRPO). `sequence`: GSPO's s_i = exp(mean_t log(pi/pi_old)), one length-normalised "
        "ratio per response, clipped as a whole (GSPO's paper pairs it with seq-mean-token-mean and clip 3e-4 / "
        "4e-4, the defaults here). `sequence_token`: GSPO-token, sg[s_i] * pi_t / sg[pi_t] (value s_i, per-token "
        "gradient). All three equal GRPO on-policy (ratio 1).")
    overlong_filter: bool = Field(False, description="DAPO's overlong filtering: truncated responses (finish_reason "
                                  "`length`) get no loss and no share of the loss denominators; they still count "
                                  "in their group's advantage baseline (TRL: mask_truncated_completions).")
    dynamic_sampling: bool = Field(False, description="DAPO's dynamic sampling: groups whose total rewards do not "
                                   "vary (variance <= dynamic_sampling_min_variance) are dropped and more prompts "
                                   "drawn, until the step holds rollout.prompts_per_step varying groups or "
                                   "dynamic_sampling_max_extra extra groups were drawn (grpo/fgo, "
                                   "trainer.max_staleness 0).")
    dynamic_sampling_max_extra: Optional[int] = Field(
        None, ge=0, description="Dynamic sampling: most groups drawn beyond rollout.prompts_per_step in one step "
        "(null: 3 x prompts_per_step). At the cap the step trains on the varying groups it has (none: no update).")
    dynamic_sampling_min_variance: float = Field(
        1e-6, ge=0, description="Dynamic sampling: a group varies when the population variance of its samples' "
        "total rewards exceeds this (a threshold, not equality: float rewards that differ by rounding are constant).")
    kl_coef: float = Field(0.0, ge=0, description="k3 KL penalty to the frozen reference (0: no reference model).")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="How per-token losses are reduced; always over the whole step batch.")
    num_iterations: int = Field(1, ge=1, description="Passes over each rollout batch (>1 needs old log-probs).")
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per pass; the rollout batch is split evenly.")
    tis_cap: Optional[float] = Field(
        None, gt=0, description="Truncated importance sampling against the rollout engine (OpenRLHF's `tis`, verl's "
        "rollout correction; null: off): each token's policy-gradient term is weighted by min(pi_learner / "
        "pi_rollout, tis_cap), for engines whose numerics differ from the learner's (vLLM, bf16; see the "
        "logprob_diff_mean metric). Applies where the learner's own log-probs are pi_old (one pass, one mini-batch, "
        "on-policy); otherwise pi_old is the rollout's log-probs and the PPO ratio already weighs by pi / pi_rollout.")

    @model_validator(mode="after")
    def _default_std_scaling(self):
        if self.scale_by_std is None:  # resolved here so the dumped run config says what was used
            object.__setattr__(self, "scale_by_std", self.name != "fgo")
        return self

    @model_validator(mode="after")
    def _default_clip_range(self):
        # GSPO's sequence ratio is a geometric mean, far closer to 1 than token ratios: its paper (v2, section 5.1)
        # clips at 3e-4 / 4e-4, the values TRL's paper index gives for GSPO; token level keeps 0.2 / DAPO's 0.28.
        token = self.importance_sampling_level == "token"
        if self.clip_low is None:
            object.__setattr__(self, "clip_low", 0.2 if token else 3e-4)
        if self.clip_high is None:
            object.__setattr__(self, "clip_high", 0.28 if token else 4e-4)
        return self


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1, description="DeepSpeed ranks (Ray actors) in the learner group.")
    num_gpus_per_rank: float = Field(0, ge=0, description="GPUs per rank (0: CPU, gloo).")
    zero_stage: Literal[0, 2, 3] = Field(0, description="DeepSpeed ZeRO stage.")
    lr: float = Field(1e-6, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = Field((0.9, 0.999))
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up optimizer steps.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0: off).")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward/backward on one rank.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations (less memory, slower).")
    packing: bool = Field(False, description="Train on packed, unpadded micro-batches: the micro-batch's sequences "
                          "in one row with a block-diagonal causal mask (no pad tokens computed; attention is "
                          "quadratic in the packed length). Same loss as padded (tested); bench/ measures the speed.")
    shared_prefix: Optional[bool] = Field(
        None, description="Run each distinct prompt of a micro-batch once and share its KV cache among the group's "
        "samples (G samples of a prompt cost one prompt forward and backward instead of G; -15% train time in "
        "docs/performance.md). Same loss and gradients as padded (tested); shares most with micro_batch_size a "
        "multiple of rollout.group_size. Default (null): on unless packing or gradient_checkpointing is on.")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer offload to CPU (DeepSpeedCPUAdam).")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed config merged on top.")

    @model_validator(mode="after")
    def _default_shared_prefix(self):
        if self.shared_prefix is None:  # resolved here so the dumped run config says what was used
            object.__setattr__(self, "shared_prefix", not (self.packing or self.gradient_checkpointing))
        return self

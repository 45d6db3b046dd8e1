"""What the vLLM rollout backend (rl/rollout/vllm_worker.py) needs that can be computed, and tested, without vLLM or a GPU:
the engine arguments a config asks for, per-request seeds, finish-reason handling, weight chunks, the API check,
and the worker extension vLLM mixes into its GPU workers.

Weights reach the model through vLLM's supported route, `worker_extension_cls` + `LLM.collective_rpc` (as TRL and
OpenRLHF do): the method runs on every tensor-parallel worker, each `load_weights` keeps its own shard. The old route,
`llm.llm_engine.model_executor.driver_worker`, only exists for the in-process single-GPU executor.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
import warnings

import numpy as np

# The release the GPU constraints pin (configs/constraints-gpu.txt) and the pyproject extra allows.
TESTED_VLLM = "0.32.0"
EXTENSION_CLS = "rl.rollout.vllm_support.WeightLoadExtension"
# vLLM's own default share of a device it has to itself; a worker with rollout.num_gpus < 1 gets that part of it.
MEMORY_FRACTION = 0.9
LOAD_CHUNK_BYTES = 256 * 2 ** 20  # weights per collective_rpc call (TP > 1 serialises them to each worker process)
# What rl/rollout/vllm_worker.py calls; an older or newer vLLM without one of them fails at start with this list.
REQUIRED_ENGINE_ARGS = ("logprobs_mode", "worker_extension_cls", "enable_sleep_mode", "enable_prefix_caching")
REQUIRED_LLM_METHODS = ("collective_rpc", "reset_prefix_cache", "sleep", "wake_up", "generate")


def engine_args(cfg) -> dict:
    """vllm.LLM keyword arguments for a rl.config.schema.Config: dtype, memory share, prefix caching, the extension and
    log-prob mode, then the user's rollout.vllm on top (except the keys reasonrl owns, which rl.config.schema refuses).

    gpu_memory_utilization is a fraction of the WHOLE device, not of the worker's share: a worker with
    rollout.num_gpus 0.5 (colocated with a learner rank) gets 0.9 x 0.5 of it by default, so the learner keeps the
    rest."""
    r = cfg.rollout
    share = min(1.0, float(r.num_gpus))
    args = {"dtype": cfg.model.dtype, "gpu_memory_utilization": round(MEMORY_FRACTION * share, 4),
            "enable_prefix_caching": True, "seed": cfg.trainer.seed}
    args.update(r.vllm)
    if int(args.get("tensor_parallel_size", 1)) > 1:
        # Workers as child processes of the rollout actor, on the GPUs Ray gave it. Inside a placement group vLLM
        # would otherwise pick its Ray executor and ask for bundles of its own.
        args.setdefault("distributed_executor_backend", "mp")
    args.update(logprobs_mode="processed_logprobs", worker_extension_cls=EXTENSION_CLS,
                enable_sleep_mode=bool(r.vllm_sleep))
    return args


def request_seed(seed: int, worker: int, prompt: int, sample: int) -> int:
    """The seed of one request (one sample of one prompt): a hash of the call's seed, the worker, the prompt's index
    in the call and the sample's index, in [0, 2**63).

    vLLM seeds a request's generator with its SamplingParams.seed and gives sample j of an n > 1 request seed + j,
    so one seed per call made every prompt's samples the same random stream (duplicate prompts: identical
    samples), and neighbouring seeds overlapping streams. A hash keeps every (prompt, sample) apart, and the same
    inputs (a resumed run) give the same seeds."""
    digest = hashlib.blake2b(struct.pack("<4q", int(seed), int(worker), int(prompt), int(sample)),
                             digest_size=8, person=b"reasonrl-vllm").digest()
    return int.from_bytes(digest, "little") >> 1


def request_seeds(seed: int, worker: int, num_prompts: int, n: int) -> list[list[int]]:
    """request_seed for every (prompt, sample) of a call: [prompt][sample]."""
    return [[request_seed(seed, worker, i, j) for j in range(n)] for i in range(num_prompts)]


def request_sampling(params, seed: int, stop_ids: list[int]) -> dict:
    """vllm.SamplingParams keyword arguments of one request (one sample): the rollout's sampling settings, its own
    seed, and `stop_ids` (rl.rollout.stops.stop_token_ids: EOS and the chat template's end-of-turn token), which vLLM
    would otherwise not stop at: it stops at the EOS of the model's generation_config only."""
    return dict(n=1, max_tokens=params.max_new_tokens, seed=seed, logprobs=0 if params.logprobs else None,
                temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1, repetition_penalty=1.0, min_p=0.0,
                stop_token_ids=list(stop_ids))


def finish_reason(reason: str | None, index: int) -> str:
    """vLLM's finish reason as the rollout batch records it. `stop` (EOS) and `length` (budget) map to themselves;
    `abort` / `error` (or an unfinished request) mean the sample is not a complete sample of the policy, and
    counting it as truncated would train on it, so the call fails instead (as the continuous backend does)."""
    if reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"vLLM request {index} ended with finish_reason {reason!r} (not stop/length): the rollout "
                       "batch would hold an incomplete sample; see the rollout worker's log for vLLM's error")


def weight_chunks(state: dict, chunk_bytes: int = LOAD_CHUNK_BYTES) -> list[list[tuple[str, np.ndarray]]]:
    """(name, array) lists of at most chunk_bytes each (a bigger array alone), in the state dict's order."""
    chunks: list[list[tuple[str, np.ndarray]]] = []
    size = 0
    for name, arr in state.items():
        nbytes = int(np.asarray(arr).nbytes)
        if chunks and size + nbytes <= chunk_bytes:
            chunks[-1].append((name, arr))
            size += nbytes
        else:
            chunks.append([(name, arr)])
            size = nbytes
    return chunks


def check_api(vllm) -> None:
    """Raise, naming what is missing and the tested release, when the installed vLLM lacks an API the backend
    uses (vLLM 0.10.0, for one, has no logprobs_mode)."""
    fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)} if dataclasses.is_dataclass(vllm.EngineArgs) \
        else set()
    missing = [f"EngineArgs.{a}" for a in REQUIRED_ENGINE_ARGS if a not in fields]
    missing += [f"LLM.{m}" for m in REQUIRED_LLM_METHODS if not hasattr(vllm.LLM, m)]
    if missing:
        version = getattr(vllm, "__version__", "?")
        raise RuntimeError(f"vLLM {version} lacks {', '.join(missing)}, which rollout.backend vllm uses; install "
                           f"the tested release: pip install -c configs/constraints-gpu.txt 'vllm=={TESTED_VLLM}'")


class WeightLoadExtension:
    """Mixed into vLLM's GPU worker class (engine argument worker_extension_cls), so `LLM.collective_rpc
    ("reasonrl_load_weights", args=(chunk,))` runs this on every worker: with tensor parallelism each one loads the
    full tensors through the model's own loader, which keeps its shard (and maps HF names onto vLLM's fused
    q/k/v and gate/up projections)."""

    def reasonrl_load_weights(self, named_arrays: list[tuple[str, np.ndarray]]) -> int:
        import torch

        with warnings.catch_warnings():  # read-only views of Ray's object store; the loader copies them
            warnings.simplefilter("ignore", UserWarning)
            weights = [(name, torch.from_numpy(np.asarray(arr))) for name, arr in named_arrays]
        self.model_runner.model.load_weights(weights=weights)
        return len(weights)

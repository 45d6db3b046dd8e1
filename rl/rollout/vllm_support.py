"""What the vLLM rollout backend (rl/rollout/vllm_worker.py) needs that can be computed, and tested, without vLLM:
the engine arguments a config asks for, per-request seeds, finish-reason handling, weight chunks, the API check,
and the worker extension vLLM mixes into its workers.

Weights reach the model through vLLM's supported route, `worker_extension_cls` + `LLM.collective_rpc` (as TRL and
OpenRLHF do): the method runs on every tensor-parallel worker. Inside it the load goes through the model runner's
in-place `reload_weights(..., is_checkpoint_format=True)`, not `model.load_weights`: after start-up a platform may
have turned the parameters into kernel formats (vLLM's CPU backend repacks linear weights for oneDNN, so
`load_weights` fails there with "'Parameter' object has no attribute 'weight_loader'"; FP8 / quantized layers are
processed after loading on GPUs too), and `reload_weights` restores the checkpoint layout layer by layer, loads,
and re-runs that processing. Run for real on vLLM's CPU build (tests/test_vllm_engine.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import struct
import warnings

import numpy as np

# The release the GPU constraints pin (configs/constraints-gpu.txt) and the pyproject extra allows.
TESTED_VLLM = "0.32.0"
EXTENSION_CLS = "rl.rollout.vllm_support.WeightLoadExtension"
# vLLM's own default share of a device it has to itself; a worker with rollout.num_gpus < 1 gets that part of it.
MEMORY_FRACTION = 0.9
LOAD_CHUNK_BYTES = 256 * 2 ** 20  # weights per collective_rpc call (TP > 1 serialises them to each worker process)
# CPU KV cache (GiB) when the user set none: vLLM's CPU default takes a share of RAM meant for a serving box, and a
# rollout worker shares the machine with the learner. VLLM_CPU_KVCACHE_SPACE or rollout.vllm.kv_cache_memory_bytes win.
CPU_KV_CACHE_GIB = 1
# What rl/rollout/vllm_worker.py calls; an older or newer vLLM without one of them fails at start with this list.
REQUIRED_ENGINE_ARGS = ("logprobs_mode", "worker_extension_cls", "enable_sleep_mode", "enable_prefix_caching")
REQUIRED_LLM_METHODS = ("collective_rpc", "reset_prefix_cache", "sleep", "wake_up", "generate")
_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def is_cpu_build() -> bool:
    """vLLM's CPU build is installed (the `vllm-cpu` distribution, whose import name is `vllm`); found without
    importing vllm (seconds of start-up) so config checks stay fast."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False


def installed_version() -> str | None:
    """The installed vLLM's version, from either distribution (importlib.metadata.version("vllm") raises for
    vllm-cpu); the engine itself reports vllm.__version__ (rl/rollout/vllm_worker.py)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist).split("+")[0]
        except PackageNotFoundError:
            continue
    return None


def engine_args(cfg) -> dict:
    """vllm.LLM keyword arguments for a rl.config.schema.Config: dtype, memory share, prefix caching, the extension and
    log-prob mode, then the user's rollout.vllm on top (except the keys reasonrl owns, which rl.config.schema refuses).

    gpu_memory_utilization is a fraction of the WHOLE device, not of the worker's share: a worker with
    rollout.num_gpus 0.5 (colocated with a learner rank) gets 0.9 x 0.5 of it by default, so the learner keeps the
    rest."""
    r = cfg.rollout
    share = min(1.0, float(r.num_gpus))
    args = {"dtype": cfg.model.dtype, "enable_prefix_caching": True, "seed": cfg.trainer.seed}
    if r.num_gpus > 0:  # on vLLM's CPU build (rollout.num_gpus 0) the KV cache is sized by VLLM_CPU_KVCACHE_SPACE
        args["gpu_memory_utilization"] = round(MEMORY_FRACTION * share, 4)
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
    """(name, array) lists of about chunk_bytes each, in the state dict's order, never splitting a decoder layer
    (`...layers.N.`): each chunk is one `reload_weights` call, which processes a layer once it got all of its
    tensors and, at the end of the call, a partly loaded one with the rest left as whatever its fresh storage held
    (a fused q/k/v or gate/up projection would be half garbage). A layer bigger than chunk_bytes is one chunk."""
    groups: list[tuple[str | None, list[tuple[str, np.ndarray]], int]] = []
    for name, arr in state.items():
        m = _LAYER.match(name)
        key = m.group(1) if m else None
        nbytes = int(np.asarray(arr).nbytes)
        if groups and key is not None and groups[-1][0] == key:
            groups[-1][1].append((name, arr))
            groups[-1] = (key, groups[-1][1], groups[-1][2] + nbytes)
        else:
            groups.append((key, [(name, arr)], nbytes))
    chunks: list[list[tuple[str, np.ndarray]]] = []
    size = 0
    for _, items, nbytes in groups:
        if chunks and size + nbytes <= chunk_bytes:
            chunks[-1].extend(items)
            size += nbytes
        else:
            chunks.append(list(items))
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


def wire_tensor(arr):
    """A weight as it travels (rl.learner.engine.Engine.get_weights): numpy has no bfloat16, so bf16 weights ship
    as their int16 bit patterns (half of fp32's bytes through the object store); no model weight is int16."""
    import torch

    with warnings.catch_warnings():  # read-only views of Ray's object store; the loaders copy them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.asarray(arr))
    return t.view(torch.bfloat16) if t.dtype == torch.int16 else t


class WeightLoadExtension:
    """Mixed into vLLM's worker class (engine argument worker_extension_cls), so `LLM.collective_rpc(
    "reasonrl_load_weights", args=(chunk,))` runs this on every worker: with tensor parallelism each one loads the
    full tensors through the model's own loader, which keeps its shard (and maps HF names onto vLLM's fused
    q/k/v and gate/up projections)."""

    def reasonrl_load_weights(self, named_arrays: list[tuple[str, np.ndarray]]) -> list[str]:
        """Load one chunk in place; returns the names of the model's parameters that the loader reports loaded
        (vLLM's names: fused projections, a tied lm_head not among them), which the rollout worker compares with
        reasonrl_parameter_names."""
        weights = [(name, wire_tensor(arr)) for name, arr in named_arrays]
        runner = self.model_runner
        model = runner.get_model()
        loaded: set[str] = set()
        load = model.load_weights  # reload_weights calls it between its layer-wise set-up and processing

        def recording(weights):
            names = load(weights)
            loaded.update(names or ())
            return names

        model.load_weights = recording  # an instance attribute, removed again below
        try:
            runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        finally:
            del model.load_weights
        _reprocess_aliases(model, loaded)
        return sorted(loaded)

    def reasonrl_parameter_names(self) -> list[str]:
        """The engine model's parameter names (shared ones once: a tied lm_head is the embedding)."""
        return [name for name, _ in self.model_runner.get_model().named_parameters()]


def _reprocess_aliases(model, loaded: set[str]) -> None:
    """Re-run the post-load processing of layers whose weight IS a parameter loaded under another layer's name: a
    tied lm_head is the embedding's Parameter, so the loader skips it and the layer-wise reload leaves its
    processed state alone, but vLLM's CPU backend keeps a oneDNN-packed copy of it for the logits, which would go
    on scoring with the old embedding (measured: greedy outputs diverged from the learner's after the first
    token, tests/test_vllm_engine.py). On a GPU the unquantized head's processing does nothing."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
        owner = canonical.get(id(weight))
        if method is None or owner is None or owner == f"{name}.weight" or owner not in loaded:
            continue
        method.process_weights_after_loading(module)

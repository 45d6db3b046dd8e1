"""One learner rank's DeepSpeed side: building the engine, stepping the optimizer, checkpoints, weight export.

Everything that knows DeepSpeed is here, so the updates in rl.learner.updates read as the algorithm: they compute a loss
normalised by batch-global counts, call `backward`, and `step` once per mini-batch. ZeRO stages 0, 2 and 3 look
the same from outside; where they differ (grad norm at stage 0, gathering shards at stage 3) this file hides it.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from rl.config.schema import AlgorithmConfig, Config, LearnerConfig
from rl.models import load_policy, load_tokenizer
from rl.sync.transport import bucket_plan, new_store

# ZeRO-3 weight export (object-store sync, checkpoints) gathers this many bytes of parameters at a time.
EXPORT_BUCKET_BYTES = 256 * 2 ** 20


def release_cuda_cache() -> None:
    """Hand the learner's cached, unused CUDA blocks back to the device. The weight export ends a step: next a
    colocated vLLM engine wakes (rollout.vllm_sleep) and allocates its weights and KV cache, which fails while
    PyTorch's caching allocator in this process still holds the activations of the update it just ran."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def deepspeed_config(cfg: LearnerConfig, world_size: int, dtype: str) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    optimizer_params = {"lr": cfg.lr, "betas": list(cfg.adam_betas), "weight_decay": cfg.weight_decay}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}  # DeepSpeedCPUAdam (JIT-built on first use)
    else:
        optimizer_params["torch_adam"] = True  # no JIT build on CPU, same math as fused Adam
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,  # accumulation is driven by set_gradient_accumulation_boundary
        "train_batch_size": cfg.micro_batch_size * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bfloat16":
        # Gradients accumulate over micro-batches (and ZeRO reduces them) in fp32: DeepSpeed's default for bf16 is
        # bf16 accumulation, 8 mantissa bits, which loses small per-micro-batch contributions.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        if cfg.zero_stage == 0:
            # DeepSpeed without ZeRO refuses bf16 weights with fp32 accumulation (NotImplementedError "unsupported
            # mix", engine._do_optimizer_sanity_check), and bf16 alone takes its DDP_BFLOAT16 path:
            # FP16_UnfusedOptimizer, fp32 master weights but gradients accumulated and all-reduced in bf16. Its
            # ZeRO-1 bf16 path is BF16_Optimizer: fp32 master weights and fp32 gradient accumulation. Every rank
            # still holds the whole model and its gradients; only the optimizer states are partitioned, which does
            # not change the update (docs/performance.md, "The GPU path").
            zero["stage"] = 1
    if cfg.warmup_steps:
        ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr,
                                                          "warmup_num_steps": cfg.warmup_steps,
                                                          "warmup_type": "linear"}}
    return _deep_merge(ds, cfg.deepspeed)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def trusted_checkpoint_classes() -> list[type]:
    """The only non-tensor types in DeepSpeed's ZeRO-0/2 state (torch.serialization.get_unsafe_globals_in_checkpoint
    on our checkpoints): plain data classes, allowed by name. A ZeRO-3 resume is not tested yet."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def weights_only_load(path, map_location=None, trusted: list[type] | None = None):
    """torch.load of tensors, plain containers and the `trusted` classes only (default: DeepSpeed's three); any
    other global in the pickle (a class, or a callable a crafted __reduce__ names) raises UnpicklingError before
    anything is called."""
    with torch.serialization.safe_globals(trusted_checkpoint_classes() if trusted is None else trusted):
        return torch.load(path, map_location=map_location, weights_only=True)


def _weights_only_loads(engine) -> None:
    """Security default: DeepSpeed's checkpoint engine unpickles with weights_only=False (arbitrary code in a
    crafted file runs); ours reads tensors, plain containers and the trusted classes only. The HF model folder is
    safetensors."""
    engine.checkpoint_engine.load = weights_only_load


@dataclass(frozen=True)
class LearnerSetup:
    """What a learner rank is built from: the run config's learner and algorithm sections, the model's dtype, the
    seed, and the rollout's sampling distribution (temperature, top-k / top-p truncation), which the learner's
    log-probs must describe. Built once on the driver (`of`) and handed to every rank as it is."""
    learner: LearnerConfig
    algorithm: AlgorithmConfig
    dtype: str = "float32"
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def of(cls, cfg: Config) -> "LearnerSetup":
        r = cfg.rollout
        return cls(cfg.learner, cfg.algorithm, cfg.model.dtype, cfg.trainer.seed, r.temperature, r.top_k, r.top_p)


class Engine:
    """The policy under DeepSpeed on one rank, its frozen reference when the algorithm needs one, and the tokenizer.

    Attributes an update uses (after `build`): `policy` (the DeepSpeed engine; call it like the model), `ref`
    (a plain eval-mode model, or None), `device`, `pad_id`, `cfg` (learner section), `algo` (algorithm section),
    `temperature`, `top_k`, `top_p`, `world_size`.
    """

    def __init__(self, rank: int, world_size: int, model_path: str, setup: LearnerSetup):
        self.rank, self.world_size, self.model_path = rank, world_size, model_path
        self.cfg, self.algo, self.dtype, self.seed = setup.learner, setup.algorithm, setup.dtype, setup.seed
        self.temperature, self.top_k, self.top_p = setup.temperature, setup.top_k, setup.top_p
        self.policy = self.ref = self.tokenizer = self._sync = None
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------------------------------------ building
    def build(self, master_addr: str, master_port: int) -> dict:
        """Join the process group and build the DeepSpeed engine (collective: call on all ranks together)."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        import deepspeed

        use_cuda = self.cfg.num_gpus_per_rank > 0  # from the config, matching DS_ACCELERATOR set by rl.cluster.session
        if not use_cuda:
            # DeepSpeed JIT-builds a shared-memory all-reduce op for CPU ranks here (slow, and rebuilt whenever
            # processes with other build flags used the cache last). Only its inference_all_reduce uses it,
            # never training, so the build is skipped.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            # The group's store bound to master_addr only (loopback when every rank is on this node): torch's env://
            # store would listen on every interface. DeepSpeed takes an initialised torch.distributed as it is.
            store = new_store(master_addr, master_port, self.rank, self.world_size, 1800.0)
            torch.distributed.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world_size,
                                                 timeout=timedelta(minutes=30))
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
        torch.manual_seed(self.seed)
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        self.tokenizer = load_tokenizer(self.model_path)
        model = load_policy(self.model_path, self.dtype)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        self.policy, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(self.cfg, self.world_size, self.dtype))
        # The reference never trains, so it stays outside DeepSpeed (no ZeRO collectives in its forwards).
        if self.algo.kl_coef > 0 or self.algo.name in ("todo", "dpo"):  # TODO/DPO: reference = start model
            self.ref = load_policy(self.model_path, self.dtype, self.device).eval().requires_grad_(False)
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device)}

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    # ------------------------------------------------------------------------------------------------ stepping
    def boundary(self, last: bool) -> None:
        """Mark whether the next forward/backward ends a mini-batch (DeepSpeed reduces gradients only there)."""
        self.policy.set_gradient_accumulation_boundary(last)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss`, a loss already normalised by batch-global counts.

        DeepSpeed averages gradients over ranks, which would divide that loss by world_size a second time; the
        factor undoes it, so the update does not depend on the number of ranks."""
        self.policy.backward(loss * self.world_size)

    def step(self) -> float:
        """engine.step(); returns the global gradient norm it clipped by.

        ZeRO-1/2/3 optimizers record that norm; at stage 0 DeepSpeed records none, so it is taken from the (already
        all-reduced) gradients before the step consumes them. (bf16 at learner.zero_stage 0 runs DeepSpeed's stage 1,
        see deepspeed_config, which records it.)"""
        own = _grad_norm(self.policy.module) if self.policy.zero_optimization_stage() == 0 else None
        self.policy.step()
        norm = self.policy.get_global_grad_norm()
        norm = own if norm is None else norm
        return float(norm) if norm is not None else 0.0

    @property
    def lr(self) -> float:
        return float(self.policy.get_lr()[0])

    # ------------------------------------------------------------------------------------- weights, checkpoints
    def _gather(self, tensors: list):
        """Context in which ZeRO-3 shards of `tensors` are whole (collective: every rank enters it with the same
        tensors); a no-op below stage 3. On exit the gathered storage is freed, so the current CUDA stream is
        synchronised first: kernels still reading it (a copy out, a send) must be done."""
        import deepspeed

        if self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(deepspeed.zero.GatheredParameters(tensors, modifier_rank=None))
        if self.device.type == "cuda":
            stack.callback(torch.cuda.current_stream().synchronize)  # runs before the gather context releases
        return stack

    def gathered(self, bucket_bytes: int = EXPORT_BUCKET_BYTES):
        """Yields [(name, whole tensor)] bucket by bucket. Under ZeRO-3 each bucket is gathered when it is reached
        and freed when the consumer asks for the next, so at most one bucket of full parameters exists at a time
        (gathering every parameter at once needs the whole model's memory on every rank). Every rank must iterate
        to the end (the gathers are collective); below stage 3 one list of the resident parameters."""
        params = list(self.policy.module.named_parameters())  # deduplicates tied weights
        if self.cfg.zero_stage != 3:
            yield params
            return
        numels = [int(getattr(p, "ds_numel", p.numel())) for _, p in params]
        for bucket in bucket_plan(numels, bucket_bytes, elem_bytes=params[0][1].element_size()):
            group = [params[i] for i in bucket]
            with self._gather([p for _, p in group]):
                yield group

    def get_weights(self, wire_dtype: str | None = None) -> dict[str, np.ndarray] | None:
        """Numpy state dict on rank 0 (numpy travels through Ray's object store zero-copy; torch would pickle).

        wire_dtype "bfloat16" (the weight sync, rollout dtype bf16): bf16 weights ship as their int16 bit patterns
        (numpy has no bfloat16; rl.rollout.vllm_support.wire_tensor reads them back), half the bytes of fp32
        through the object store; otherwise float32 (checkpoints, checks)."""
        out: dict[str, np.ndarray] | None = {} if self.rank == 0 else None
        for group in self.gathered():  # every rank walks every bucket: ZeRO-3 gathers are collective
            if out is None:
                continue
            for n, p in group:
                if wire_dtype == "bfloat16":
                    out[n] = p.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().copy()
                    continue
                # A view is enough for resident fp32 CPU weights (Ray copies the return value into the object
                # store); gathered ZeRO-3 storage is freed after its bucket, and GPU/half weights need a conversion.
                view_ok = self.cfg.zero_stage != 3 and not p.is_cuda and p.dtype == torch.float32
                out[n] = p.detach().numpy() if view_ok else p.detach().to("cpu", torch.float32).numpy().copy()
        release_cuda_cache()
        return out

    def weight_manifest(self) -> list[tuple[str, tuple]]:
        """(name, full shape) of every parameter in broadcast order (ZeRO-3 shapes without gathering)."""
        return [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self.policy.module.named_parameters()]

    def join_weight_sync(self, rank: int, *args) -> None:
        """Rank 0 becomes member 0 (the source) of the collective weight-sync group (rl.sync.transport)."""
        from rl.sync.transport import Endpoint

        if self._sync is not None:  # a rebuilt group replaces the old one, destroyed before the new one forms
            self._sync.close()
        self._sync = None
        self._sync = Endpoint(*args[:2], rank, *args[2:])

    def broadcast_weights(self, bucket_bytes: int | None = None) -> int | None:
        """All ranks take part (ZeRO-3 gathers are collective); rank 0 broadcasts and returns the checksum it sent.

        Under ZeRO-3 each bucket is gathered just before it is packed into a staging buffer and freed once packed
        (rl.sync.transport.Endpoint.send with `gather`); the other ranks gather the same buckets, from the same plan
        (bucket_plan over the same shapes and `bucket_bytes`, weight_sync.bucket_mb), in the same order."""
        params = list(self.policy.module.named_parameters())
        gather = self._gather if self.cfg.zero_stage == 3 else None
        if self.rank == 0:
            return self._sync.send(params, gather=gather)
        if gather is not None:
            numels = [int(getattr(p, "ds_numel", p.numel())) for _, p in params]
            for bucket in bucket_plan(numels, bucket_bytes or EXPORT_BUCKET_BYTES):
                with gather([params[i][1] for i in bucket]):
                    pass
        return None

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed state (all ranks) and an HF-format model folder (rank 0) under `path`."""
        self.policy.save_checkpoint(os.path.join(path, "deepspeed"), tag="state")
        state: dict | None = {} if self.rank == 0 else None
        for group in self.gathered():  # bucket by bucket; every rank takes part in the ZeRO-3 gathers
            if state is not None:
                state.update({n: p.detach().cpu().clone() for n, p in group})
        if state is not None:
            self.policy.module.save_pretrained(os.path.join(path, "model"), state_dict=state)
            self.tokenizer.save_pretrained(os.path.join(path, "model"))

    def load_checkpoint(self, path: str) -> None:
        _weights_only_loads(self.policy)
        load_path, _ = self.policy.load_checkpoint(os.path.join(path, "deepspeed"), tag="state")
        if load_path is None:
            raise RuntimeError(f"no DeepSpeed state under {path}")

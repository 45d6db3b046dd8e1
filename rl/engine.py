"""One learner rank's DeepSpeed side: building the engine, stepping the optimizer, checkpoints, weight export.

Everything that knows DeepSpeed is here, so the updates in rl.updates read as the algorithm: they compute a loss
normalised by batch-global counts, call `backward`, and `step` once per mini-batch. ZeRO stages 0, 2 and 3 look
the same from outside; where they differ (grad norm at stage 0, gathering shards at stage 3) this file hides it.
"""
from __future__ import annotations

import contextlib
import copy
import os
from datetime import timedelta

import numpy as np
import torch

from rl.config import AlgorithmConfig, LearnerConfig
from rl.models import load_policy, load_tokenizer


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


def _weights_only_loads(engine) -> None:
    """Security default: DeepSpeed's checkpoint engine unpickles with weights_only=False (arbitrary code in a
    crafted file runs); ours reads tensors and plain containers only. The HF model folder is safetensors."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # The only non-tensor types in DeepSpeed's ZeRO-0/2 state (torch.serialization.get_unsafe_globals_in_checkpoint
    # on our checkpoints): plain data classes, allowed by name. A ZeRO-3 resume is not tested yet.
    trusted = [LossScaler, ZeroStageEnum, fragment_address]

    def load(path, map_location=None):
        with torch.serialization.safe_globals(trusted):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


class Engine:
    """The policy under DeepSpeed on one rank, its frozen reference when the algorithm needs one, and the tokenizer.

    Attributes an update uses (after `build`): `policy` (the DeepSpeed engine; call it like the model), `ref`
    (a plain eval-mode model, or None), `device`, `pad_id`, `cfg`, `algo`, `temperature`, `world_size`.
    """

    def __init__(self, rank: int, world_size: int, cfg: LearnerConfig, algo: AlgorithmConfig, model_path: str,
                 dtype: str, temperature: float, seed: int):
        self.rank, self.world_size, self.cfg, self.algo = rank, world_size, cfg, algo
        self.model_path, self.dtype, self.temperature, self.seed = model_path, dtype, temperature, seed
        self.policy = self.ref = self.tokenizer = self._sync = None
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------------------------------------ building
    def build(self, master_addr: str, master_port: int) -> dict:
        """Join the process group and build the DeepSpeed engine (collective: call on all ranks together)."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        import deepspeed

        use_cuda = self.cfg.num_gpus_per_rank > 0  # from the config, matching DS_ACCELERATOR set by rl.cluster
        if not use_cuda:
            # DeepSpeed JIT-builds a shared-memory all-reduce op for CPU ranks here (slow, and rebuilt whenever
            # processes with other build flags used the cache last). Only its inference_all_reduce uses it,
            # never training, so the build is skipped.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
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
        all-reduced) gradients before the step consumes them."""
        own = _grad_norm(self.policy.module) if self.cfg.zero_stage == 0 else None
        self.policy.step()
        norm = self.policy.get_global_grad_norm()
        norm = own if norm is None else norm
        return float(norm) if norm is not None else 0.0

    @property
    def lr(self) -> float:
        return float(self.policy.get_lr()[0])

    # ------------------------------------------------------------------------------------- weights, checkpoints
    def full_params(self):
        """(context, [(name, tensor)]): inside the context every tensor is whole; under ZeRO-3 the shards are
        gathered on entry (collective: every rank must enter it) and freed on exit."""
        import deepspeed

        params = list(self.policy.module.named_parameters())  # deduplicates tied weights
        if self.cfg.zero_stage == 3:
            ctx = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
        else:
            ctx = contextlib.nullcontext()
        return ctx, params

    def get_weights(self) -> dict[str, np.ndarray] | None:
        """Numpy state dict on rank 0 (numpy travels through Ray's object store zero-copy; torch would pickle)."""
        ctx, params = self.full_params()
        with ctx:
            if self.rank != 0:
                return None
            # A view is enough for resident fp32 CPU weights (Ray copies the return value into the object store);
            # gathered ZeRO-3 storage is freed when the context exits, and GPU/half weights need a conversion.
            view_ok = self.cfg.zero_stage != 3 and not params[0][1].is_cuda and params[0][1].dtype == torch.float32
            return {n: p.detach().numpy() if view_ok else p.detach().to("cpu", torch.float32).numpy().copy()
                    for n, p in params}

    def weight_manifest(self) -> list[tuple[str, tuple]]:
        """(name, full shape) of every parameter in broadcast order (ZeRO-3 shapes without gathering)."""
        return [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self.policy.module.named_parameters()]

    def join_weight_sync(self, rank: int, *args) -> None:
        """Rank 0 becomes member 0 (the source) of the collective weight-sync group (rl.weight_sync)."""
        from rl.weight_sync import Endpoint

        self._sync = None  # a rebuilt group replaces the old one, which is released before the new one forms
        self._sync = Endpoint(*args[:2], rank, *args[2:])

    def broadcast_weights(self) -> int | None:
        """All ranks take part (ZeRO-3 gathers are collective); rank 0 broadcasts and returns the checksum it sent."""
        ctx, params = self.full_params()
        with ctx:
            return self._sync.send(params) if self.rank == 0 else None

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed state (all ranks) and an HF-format model folder (rank 0) under `path`."""
        self.policy.save_checkpoint(os.path.join(path, "deepspeed"), tag="state")
        ctx, params = self.full_params()
        with ctx:
            if self.rank == 0:
                state = {n: p.detach().cpu().clone() for n, p in params}
                self.policy.module.save_pretrained(os.path.join(path, "model"), state_dict=state)
                self.tokenizer.save_pretrained(os.path.join(path, "model"))

    def load_checkpoint(self, path: str) -> None:
        _weights_only_loads(self.policy)
        load_path, _ = self.policy.load_checkpoint(os.path.join(path, "deepspeed"), tag="state")
        if load_path is None:
            raise RuntimeError(f"no DeepSpeed state under {path}")

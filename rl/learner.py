"""Learner group: N Ray actors, each one DeepSpeed ZeRO rank (gloo on CPU, NCCL on GPU).

Each rank holds the policy (and, when kl_coef > 0, a frozen reference), receives its share of every mini-batch,
accumulates gradients over micro-batches and takes one optimizer step per mini-batch. Losses are normalised by
batch-global token/sequence counts, so the update does not depend on how the batch is split (see
rl.algorithms.policy_loss); DeepSpeed averages gradients over ranks, which the loss undoes by a factor world_size.
"""
from __future__ import annotations

import copy
import os
import socket
from datetime import timedelta

import numpy as np
import torch

from rl.algorithms import policy_loss, preference_correct, preference_margin
from rl.batch import pack_pairs, pad_pairs, prefix_pairs, pad_values, response_logprobs, split_bounds, to_device
from rl.config import AlgorithmConfig, LearnerConfig
from rl.models import load_policy, load_tokenizer
from rl.preference import pair_batch, pair_losses, summed_logps


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


class LearnerRank:
    def __init__(self, rank: int, world_size: int, model_path: str, learner: dict, algorithm: dict,
                 dtype: str, temperature: float, seed: int, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.rank, self.world_size = rank, world_size
        self.cfg, self.algo = LearnerConfig(**learner), AlgorithmConfig(**algorithm)
        self.model_path, self.dtype, self.temperature, self.seed = model_path, dtype, temperature, seed

    def address(self) -> tuple[str, int]:
        """Rank 0's reachable address and a free port for the rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> dict:
        """Join the process group and build the DeepSpeed engine (collective: call on all ranks together)."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        import deepspeed

        use_cuda = self.cfg.num_gpus_per_rank > 0  # from the config, matching DS_ACCELERATOR set by rl.cluster
        if not use_cuda:
            # DeepSpeed JIT-builds a shared-memory all-reduce op for CPU ranks here (40 s; minutes on a loaded
            # machine, and again whenever processes with other build flags used the cache last). Only its
            # inference_all_reduce uses it, never training, so the build is skipped.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
        torch.manual_seed(self.seed)
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        self.tokenizer = load_tokenizer(self.model_path)
        model = load_policy(self.model_path, self.dtype)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(self.cfg, self.world_size, self.dtype))
        self.ref = None
        if self.algo.kl_coef > 0 or self.algo.name in ("todo", "dpo"):  # TODO/DPO: reference = start model
            self.ref = load_policy(self.model_path, self.dtype, self.device).eval().requires_grad_(False)
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device)}

    def ping(self) -> dict:
        import ray

        return {"rank": self.rank, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    # ------------------------------------------------------------------------------------------------ training
    def _micro(self, seqs: list[dict]) -> dict:
        prompts, responses = [s["prompt_ids"] for s in seqs], [s["response_ids"] for s in seqs]
        # shared prefix: each distinct prompt runs once per micro-batch; packed: one unpadded row;
        # padded: [B, longest prompt + longest response]
        if self.cfg.shared_prefix:
            batch = prefix_pairs(prompts, responses, self.tokenizer.pad_token_id)
        elif self.cfg.packing:
            batch = pack_pairs(prompts, responses)
        else:
            batch = pad_pairs(prompts, responses, self.tokenizer.pad_token_id)
        width = batch["response_mask"].shape[1]
        batch["old_logprobs"] = pad_values([s["old_logprobs"] for s in seqs], width)
        batch["advantages"] = torch.tensor([s["advantage"] for s in seqs], dtype=torch.float32)
        if "ref_logprobs" in seqs[0]:
            batch["ref_logprobs"] = pad_values([s["ref_logprobs"] for s in seqs], width)
        return to_device(batch, self.device)

    def train(self, shard: list[dict], plan: dict) -> dict:
        """One rollout batch: `num_iterations` passes x `mini_batches` optimizer steps.

        shard: this rank's sequences, each {prompt_ids, response_ids, old_logprobs, advantage, mini_batch}.
        plan: per mini-batch global counts {num_tokens[], num_seqs[], num_micro[]} and max_len.
        """
        self.engine.train()
        # One pass, one mini-batch, sampled from these weights: pi_old is the policy itself (ratio 1, no second
        # forward). Otherwise pi_old is the rollout's log-probs: the behaviour policy, also when it is a step stale.
        on_policy = plan.get("on_policy", True) and self.algo.num_iterations == 1 and self.algo.mini_batches == 1
        if self.ref is not None:
            self._attach_ref_logprobs(shard)
        totals = {"loss": 0.0, "clipped_tokens": 0.0, "kl_sum": 0.0, "ratio_sum": 0.0, "tokens": 0.0,
                  "grad_norm": 0.0, "optimizer_steps": 0}
        for _ in range(self.algo.num_iterations):
            for mb in range(self.algo.mini_batches):
                seqs = [s for s in shard if s["mini_batch"] == mb]
                chunks = [seqs[a:b] for a, b in split_bounds(len(seqs), plan["num_micro"][mb])]
                for i, chunk in enumerate(chunks):
                    # Ranks must run the same number of forward/backward passes (ZeRO collectives), so an
                    # empty chunk still runs: on a stand-in sequence whose loss is multiplied by zero.
                    weight = 1.0 if chunk else 0.0
                    batch = self._micro(chunk or shard[:1])
                    self.engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
                    logprobs = response_logprobs(self.engine, batch, self.temperature)
                    old = logprobs.detach() if on_policy else batch["old_logprobs"]
                    ref = batch.get("ref_logprobs")
                    loss, stats = policy_loss(
                        logprobs, old, batch["advantages"], batch["response_mask"],
                        clip_low=self.algo.clip_low, clip_high=self.algo.clip_high, loss_agg=self.algo.loss_agg,
                        num_tokens=plan["num_tokens"][mb], num_seqs=plan["num_seqs"][mb], max_len=plan["max_len"],
                        ref_logprobs=ref, kl_coef=self.algo.kl_coef)
                    self.engine.backward(loss * weight * self.world_size)
                    totals["loss"] += float(loss.detach()) * weight
                    for k in ("clipped_tokens", "kl_sum", "ratio_sum", "tokens"):
                        totals[k] += float(stats[k]) * weight
                totals["grad_norm"] += self._optimizer_step()
                totals["optimizer_steps"] += 1
        totals["lr"] = float(self.engine.get_lr()[0])
        return totals

    def _optimizer_step(self) -> float:
        """engine.step(); returns the global gradient norm it clipped by.

        ZeRO-1/2/3 optimizers record that norm; at stage 0 DeepSpeed records none, so it is taken from the (already
        all-reduced) gradients before the step consumes them."""
        own = _grad_norm(self.engine.module) if self.cfg.zero_stage == 0 else None
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = own if norm is None else norm
        return float(norm) if norm is not None else 0.0

    @torch.no_grad()
    def _attach_ref_logprobs(self, shard: list[dict]) -> None:
        """Reference log-probs once per rollout batch (the reference never changes), in micro-batches."""
        for start in range(0, len(shard), self.cfg.micro_batch_size):
            chunk = shard[start:start + self.cfg.micro_batch_size]
            lp = response_logprobs(self.ref, self._micro(chunk), self.temperature).cpu()
            for i, seq in enumerate(chunk):
                seq["ref_logprobs"] = lp[i, :len(seq["response_ids"])].tolist()

    # ------------------------------------------------------------------------------ preference pairs (TODO / DPO)
    def train_preference(self, shard: list[dict], plan: dict) -> dict:
        """One optimizer step on preference pairs {prompt_ids, chosen_ids, rejected_ids, tie, weight}.

        plan: {num_pairs (whole batch, all ranks), num_micro (same on every rank)}. Loss = sum of per-pair losses
        / num_pairs, so micro-batching and the number of ranks do not change it (as for policy_loss).
        """
        self.engine.train()
        t = self.algo.todo
        totals = {"loss": 0.0, "mu_sum": 0.0, "chosen_reward_sum": 0.0, "rejected_reward_sum": 0.0,
                  "tobt_correct": 0.0, "sign_correct": 0.0, "ties": 0.0, "pairs": 0.0}
        chunks = [shard[a:b] for a, b in split_bounds(len(shard), plan["num_micro"])]
        for i, chunk in enumerate(chunks):
            pairs = chunk or shard[:1]  # same number of forward/backward passes on every rank (ZeRO collectives)
            w = torch.tensor([p.get("weight", 1.0) if chunk else 0.0 for p in pairs], device=self.device)
            tie = torch.tensor([bool(p["tie"]) for p in pairs], device=self.device)
            batch = to_device(pair_batch(pairs, self.tokenizer.pad_token_id), self.device)
            with torch.no_grad():
                rc, rr = summed_logps(self.ref, batch)
            self.engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
            pc, pr = summed_logps(self.engine, batch)
            losses = pair_losses(self.algo.name, pc, pr, rc, rr, tie, t.beta, t.alpha)
            loss = (losses * w).sum() / max(1, plan["num_pairs"])
            self.engine.backward(loss * self.world_size)  # DeepSpeed averages over ranks; undo it
            with torch.no_grad():
                mu = preference_margin(pc, pr, rc, rr, t.beta)
                right = preference_correct(mu, tie, t.alpha)
                pref = (~tie).float() * w
                totals["loss"] += float(loss)
                totals["mu_sum"] += float((mu * w).sum())
                totals["chosen_reward_sum"] += float((t.beta * (pc - rc) * w).sum())
                totals["rejected_reward_sum"] += float((t.beta * (pr - rr) * w).sum())
                totals["tobt_correct"] += float((right["tobt"].float() * w).sum())
                totals["sign_correct"] += float((right["sign"].float() * pref).sum())
                totals["ties"] += float((tie.float() * w).sum())
                totals["pairs"] += float(w.sum())
        totals["grad_norm"] = self._optimizer_step()
        totals["lr"] = float(self.engine.get_lr()[0])
        return totals

    @torch.no_grad()
    def preference_logps(self, shard: list[dict], num_micro: int) -> list[list[float]]:
        """[policy_chosen, policy_rejected, ref_chosen, ref_rejected] summed log-probs per pair of `shard`."""
        self.engine.eval()
        out = []
        for a, b in split_bounds(len(shard), num_micro):
            pairs = shard[a:b] or shard[:1]  # stand-in keeps the ZeRO-3 gathers in step; its result is dropped
            batch = to_device(pair_batch(pairs, self.tokenizer.pad_token_id), self.device)
            pc, pr = summed_logps(self.engine, batch)
            rc, rr = summed_logps(self.ref, batch)
            if b > a:
                out.extend(torch.stack([pc, pr, rc, rr], 1).cpu().tolist())
        return out

    @torch.no_grad()
    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Policy log-probs of given responses (used by tests and diagnostics)."""
        self.engine.eval()
        batch = to_device(pad_pairs(prompt_ids, response_ids, self.tokenizer.pad_token_id), self.device)
        lp = response_logprobs(self.engine, batch, self.temperature).cpu()
        return [lp[i, :len(r)].tolist() for i, r in enumerate(response_ids)]

    # ------------------------------------------------------------------------------------- weights, checkpoints
    def _full_params(self):
        """Context yielding (name, full tensor) pairs; under ZeRO-3 the shards are gathered first."""
        import contextlib

        import deepspeed

        params = list(self.engine.module.named_parameters())  # deduplicates tied weights
        if self.cfg.zero_stage == 3:
            ctx = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
        else:
            ctx = contextlib.nullcontext()
        return ctx, params

    def get_weights(self) -> dict[str, np.ndarray] | None:
        """Numpy state dict on rank 0 (numpy travels through Ray's object store zero-copy; torch would pickle)."""
        ctx, params = self._full_params()
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
        return [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self.engine.module.named_parameters()]

    def join_weight_sync(self, rank: int, *args) -> None:
        """Rank 0 becomes member 0 (the source) of the collective weight-sync group (rl.weight_sync)."""
        from rl.weight_sync import Endpoint

        self._sync = None
        self._sync = Endpoint(*args[:2], rank, *args[2:])

    def broadcast_weights(self) -> int | None:
        """All ranks take part (ZeRO-3 gathers are collective); rank 0 broadcasts and returns the checksum it sent."""
        ctx, params = self._full_params()
        with ctx:
            return self._sync.send(params) if self.rank == 0 else None

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed state (all ranks) and an HF-format model folder (rank 0) under `path`."""
        self.engine.save_checkpoint(os.path.join(path, "deepspeed"), tag="state")
        ctx, params = self._full_params()
        with ctx:
            if self.rank == 0:
                state = {n: p.detach().cpu().clone() for n, p in params}
                self.engine.module.save_pretrained(os.path.join(path, "model"), state_dict=state)
                self.tokenizer.save_pretrained(os.path.join(path, "model"))

    def load_checkpoint(self, path: str) -> None:
        _weights_only_loads(self.engine)
        load_path, _ = self.engine.load_checkpoint(os.path.join(path, "deepspeed"), tag="state")
        if load_path is None:
            raise RuntimeError(f"no DeepSpeed state under {path}")

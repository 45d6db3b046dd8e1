"""Rollout worker: batched sampling with transformers `generate`.

Returns, per sample, the prompt and response token ids, the log-prob of every sampled token under the policy at
the sampling temperature (taken from the generation logits, so no second forward pass), the full-vocabulary entropy
of each step, and why the response ended (`stop`: EOS generated, `length`: budget exhausted).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from rl.algorithms import entropy_from_logits, token_logprobs
from rl.models import load_policy, load_tokenizer


@dataclass
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    batch_size: int = 64
    # Per-token log-probs and entropies need every step's [B, V] logits kept until the end (GBs at long budgets);
    # evaluation only needs the tokens, so it switches them off (logprobs come back empty, entropy_sum 0).
    logprobs: bool = True


class RolloutWorker:
    """Holds an inference copy of the policy. Wrapped as a Ray actor by `rl.cluster`."""

    def __init__(self, model_path: str, dtype: str = "float32", num_threads: int | None = None, device: str = "cpu"):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = device
        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        self.model = load_policy(model_path, dtype, self.device).eval()
        self.weights_version = 0

    def ping(self) -> dict:
        return {"pid": os.getpid(), "node": _node_id(), "weights_version": self.weights_version}

    @torch.no_grad()
    def load_weights(self, state: dict[str, np.ndarray], version: int) -> int:
        """Load a learner state dict sent as numpy arrays (read zero-copy from Ray's object store)."""
        # The arrays are read-only views of shared memory; load_state_dict copies, so wrapping them is safe
        # (torch warns about non-writable arrays regardless).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if self.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"weight sync mismatch: missing={sorted(set(missing) - tied)[:5]} "
                               f"unexpected={sorted(unexpected)[:5]}")
        self.weights_version = version
        return version

    def join_weight_sync(self, rank: int, *args) -> None:
        """Become member `rank` of the collective weight-sync group (rl.weight_sync, `weight_sync.mode: collective`)."""
        from rl.weight_sync import Endpoint

        self._sync = None  # a rebuilt group replaces the old one
        self._sync = Endpoint(*args[:2], rank, *args[2:])
        self._sync.check(list(self.model.named_parameters()))

    def receive_weights(self, version: int) -> float:
        """Receive learner rank 0's broadcast; returns the sum of what arrived (checked by the driver)."""
        if getattr(self, "_sync", None) is None:
            from rl.watchdog import StaleWeightsError

            raise StaleWeightsError("rollout worker is not in the weight-sync group (recreated?)")
        total = self._sync.receive(list(self.model.named_parameters()))
        self.weights_version = version
        return total

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams, seed: int, expect_version: int | None = None) -> dict:
        """Sample `params.n` responses per prompt; samples of one prompt are contiguous in the output.

        `expect_version`: the weights version the driver last synced; a worker Ray recreated in between still
        holds the initial weights and refuses (StaleWeightsError), so the driver resyncs it and asks again."""
        if expect_version is not None and expect_version != self.weights_version:
            from rl.watchdog import StaleWeightsError

            raise StaleWeightsError(f"rollout worker holds weights version {self.weights_version}, "
                                    f"expected {expect_version} (restarted?)")
        torch.manual_seed(seed)  # one seed per (step, worker): resumed runs sample the same tokens
        expanded = [p for p in prompts for _ in range(params.n)]
        out = {"prompt_ids": [], "response_ids": [], "logprobs": [], "entropy_sum": [], "finish_reason": [],
               "text": []}
        for start in range(0, len(expanded), params.batch_size):
            self._generate_chunk(expanded[start:start + params.batch_size], params, out)
        return out

    def _generate_chunk(self, prompts: list[str], params: SamplingParams, out: dict) -> None:
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        res = self.model.generate(**enc, generation_config=generation_config(params, tok))
        prompt_len = enc["input_ids"].shape[1]
        new_tokens = res.sequences[:, prompt_len:]
        temperature = 1.0 if params.greedy else params.temperature
        # Per-step log-prob of the sampled token and entropy, from the raw logits at the sampling temperature.
        steps_lp, steps_ent = [], []
        for t, logits in enumerate(res.logits or ()):  # one [B, V] tensor per step: never a [B, T, V] copy
            step_logits = logits.unsqueeze(1)
            steps_lp.append(token_logprobs(step_logits, new_tokens[:, t:t + 1], temperature).squeeze(1))
            steps_ent.append(entropy_from_logits(step_logits, temperature).squeeze(1))
        zeros = torch.zeros(new_tokens.shape[0], 0)
        lp = torch.stack(steps_lp, 1).cpu() if steps_lp else zeros
        ent = torch.stack(steps_ent, 1).cpu() if steps_ent else zeros
        mask = enc["attention_mask"].cpu().bool()
        ids = enc["input_ids"].cpu()
        for i in range(len(prompts)):
            row = new_tokens[i].tolist()
            stop = tok.eos_token_id in row
            n = row.index(tok.eos_token_id) + 1 if stop else len(row)  # keep the EOS: it is a sampled action
            out["prompt_ids"].append(ids[i][mask[i]].tolist())
            out["response_ids"].append(row[:n])
            out["logprobs"].append(lp[i, :n].tolist())
            out["entropy_sum"].append(float(ent[i, :n].sum()))
            out["finish_reason"].append("stop" if stop else "length")
            out["text"].append(tok.decode(row[:n], skip_special_tokens=True))


def generation_config(params: SamplingParams, tok):
    """Every field that shapes the sampling distribution, set explicitly.

    transformers fills fields left at None from the checkpoint's generation_config.json and then from global
    defaults (top_k=50!), which would sample from a truncated distribution while the log-probs describe the full
    one. top_k=0 and repetition_penalty=1.0 switch those processors off.
    """
    from transformers import GenerationConfig

    sampling = dict(do_sample=False) if params.greedy else dict(
        do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    return GenerationConfig(max_new_tokens=params.max_new_tokens, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, repetition_penalty=1.0,
                            no_repeat_ngram_size=0, typical_p=1.0, min_p=None, output_logits=params.logprobs,
                            return_dict_in_generate=True, **sampling)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None

"""Rollout worker: batched sampling with transformers `generate`.

Returns, per sample, the prompt and response token ids, the log-prob of every sampled token under the distribution
it was drawn from (the policy at the sampling temperature, truncated by top-k / top-p when those are set; measured
from the generation logits as they are produced, so no second forward pass), the entropy of that distribution at
each step (full-vocabulary without truncation), and why the response ended (`stop`: EOS or the chat template's
end-of-turn token generated, rl.rollout.stops; `length`: budget exhausted).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from rl.algo.core import entropy_from_logits, token_logprobs
from rl.config.speculative import SpeculativeConfig
from rl.learner.batch import expand_cache
from rl.contracts import RolloutBatch, StaleWeightsError
from rl.models import load_policy, load_tokenizer
from rl.rollout.stops import stop_token_ids
from rl.sync.transport import Endpoint


@dataclass
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    batch_size: int = 64
    # Per-token log-probs and entropies cost a log-softmax over the vocabulary per step; evaluation only needs the
    # tokens, so it switches them off (logprobs come back empty, entropy_sum 0).
    logprobs: bool = True
    # Prefill each distinct prompt once and share its KV cache among its n samples (transformers backend).
    shared_prefix: bool = True
    # transformers backend: "inverse_cdf" draws inside the logits-processor chain (CategoricalSampler);
    # "multinomial" leaves sampling to transformers (torch.multinomial).
    sampler: str = "inverse_cdf"


class RolloutWorker:
    """Holds an inference copy of the policy. Wrapped as a Ray actor by `rl.cluster.session`."""

    def __init__(self, model_path: str, dtype: str = "float32", num_threads: int | None = None, device: str = "cpu",
                 backend: str = "transformers", speculative: dict | SpeculativeConfig | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device, self.backend = device, backend
        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        self.stop_ids = stop_token_ids(self.tokenizer)  # EOS and the template's end-of-turn token
        self.model = load_policy(model_path, dtype, self.device).eval()
        self.weights_version = 0
        # rollout.speculative (a dict through Ray), validated again so a bad one fails at start, not mid-run.
        self.speculative = SpeculativeConfig.model_validate(speculative or {})
        self.draft_model = None
        if self.speculative.drafter == "model":
            from rl.models import resolve_model

            self.draft_model = load_policy(resolve_model(self.speculative.draft_model), dtype, self.device).eval()
        self.distiller = None
        if self.speculative.distill_every:
            from rl.rollout.draft_training import DraftDistiller

            s = self.speculative
            self.distiller = DraftDistiller(self.draft_model, s.distill_every, s.distill_steps, s.distill_lr,
                                            s.distill_buffer, s.distill_batch, self.tokenizer.pad_token_id or 0)

    def ping(self) -> dict:
        return {"pid": os.getpid(), "node": _node_id(), "weights_version": self.weights_version,
                "draft_version": self.distiller.version if self.distiller is not None else 0}

    @torch.no_grad()
    def load_weights(self, state: dict[str, np.ndarray], version: int) -> int:
        """Load a learner state dict sent as numpy arrays (read zero-copy from Ray's object store)."""
        # The arrays are read-only views of shared memory; load_state_dict copies, so wrapping them is safe
        # (torch warns about non-writable arrays regardless).
        from rl.rollout.vllm_support import wire_tensor  # bf16 arrives as int16 bits (Engine.get_weights)

        tensors = {k: wire_tensor(v) for k, v in state.items()}
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if self.model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"weight sync mismatch: missing={sorted(set(missing) - tied)[:5]} "
                               f"unexpected={sorted(unexpected)[:5]}")
        self.weights_version = version
        return version

    def join_weight_sync(self, rank: int, *args) -> None:
        """Become member `rank` of the collective weight-sync group (rl.sync.transport, `weight_sync.mode: collective`)."""
        if getattr(self, "_sync", None) is not None:
            self._sync.close()  # a rebuilt group replaces the old one, destroyed before the new one forms
        self._sync = None
        self._sync = Endpoint(*args[:2], rank, *args[2:])
        self._sync.check(list(self.model.named_parameters()))

    def receive_weights(self, version: int) -> int:
        """Receive learner rank 0's broadcast; returns the checksum of what arrived (checked by the driver)."""
        if getattr(self, "_sync", None) is None:
            raise StaleWeightsError("rollout worker is not in the weight-sync group (recreated?)")
        total = self._sync.receive(list(self.model.named_parameters()))
        self.weights_version = version
        return total

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams, seed: int,
                 expect_version: int | None = None) -> RolloutBatch:
        """Sample `params.n` responses per prompt; samples of one prompt are contiguous in the output.

        `expect_version`: the weights version the driver last synced; a worker Ray recreated in between still
        holds the initial weights and refuses (StaleWeightsError), so the driver resyncs it and asks again."""
        if expect_version is not None and expect_version != self.weights_version:
            raise StaleWeightsError(f"rollout worker holds weights version {self.weights_version}, "
                                    f"expected {expect_version} (restarted?)")
        torch.manual_seed(seed)  # one seed per (step, worker): resumed runs sample the same tokens
        expanded = [p for p in prompts for _ in range(params.n)]
        out = RolloutBatch()
        if self.speculative.enabled:  # both backends: rl/rollout/speculative.py decodes
            for start in range(0, len(expanded), params.batch_size):
                self._generate_speculative(expanded[start:start + params.batch_size], params, out)
            if self.distiller is not None:  # after sampling: the draft learns from what the policy just wrote
                self.distiller.observe(out.prompt_ids, out.response_ids)
            return out
        if self.backend == "continuous":
            self._generate_continuous(expanded, params, seed, out)
            return out
        for start in range(0, len(expanded), params.batch_size):
            self._generate_chunk(expanded[start:start + params.batch_size], params, out)
        return out

    def _shared_prompt_cache(self, prompts: list[str], enc, shared: bool = True):
        """KV cache of all but the last prompt token, computed once per distinct prompt and shared by its n samples
        (generate then runs only the last prompt token per sequence). None when no prompt repeats."""
        first: dict[str, int] = {}
        index = [first.setdefault(p, i) for i, p in enumerate(prompts)]
        if not shared or len(first) == len(prompts) or enc["input_ids"].shape[1] < 2:
            return None
        rows = torch.tensor(sorted(first.values()), device=self.device)
        mask = enc["attention_mask"][rows, :-1]
        # Positions as generate computes them for left-padded prompts (pads are masked, their values do not matter).
        out = self.model(input_ids=enc["input_ids"][rows, :-1], attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
        slot = {row: k for k, row in enumerate(sorted(first.values()))}
        expand = torch.tensor([slot[i] for i in index], device=self.device)
        return expand_cache(out.past_key_values, expand)

    def _generate_continuous(self, prompts: list[str], params: SamplingParams, seed: int, out: RolloutBatch) -> None:
        """transformers continuous batching: a sequence that ends frees its slot for the next one, so one long
        response does not keep a whole batch of finished ones running. The sampler returns the log-prob of each
        sampled token (after temperature); full-vocabulary entropies are not available (entropy_sum 0)."""
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        tok = self.tokenizer
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        # A small paged cache: sized for this batch, not for a fraction of the machine's memory.
        pages = params.batch_size * -(-(max(map(len, ids)) + params.max_new_tokens) // 256)
        cb = ContinuousBatchingConfig(return_logprobs=params.logprobs, seed=seed, num_blocks=pages,
                                      max_batch_tokens=max(256, params.batch_size * 8))
        results = self.model.generate_batch(ids, generation_config=generation_config(params, tok, stop_ids=self.stop_ids),
                                            continuous_batching_config=cb, progress_bar=False)
        done = [r for r in results.values() if r.error is None]  # transformers returns them in input order
        if len(done) != len(ids):  # it logs and drops failed requests; a rollout batch must be complete
            raise RuntimeError(f"continuous batching returned {len(done)} of {len(ids)} sequences")
        for res, prompt_ids in zip(done, ids):
            self._append(out, prompt_ids, list(res.generated_tokens), list(res.logprobs) if params.logprobs else [],
                         None)  # no entropies from the continuous-batching sampler

    def _generate_speculative(self, prompts: list[str], params: SamplingParams, out: RolloutBatch) -> None:
        """Speculative decoding (rl/rollout/speculative.py): finished sequences leave the batch, so the chunk's tail
        runs at a small batch, where drafting pays most. Same log-probs and entropies as _generate_chunk."""
        from rl.rollout.speculative import speculative_generate

        tok = self.tokenizer
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        res, _ = speculative_generate(self.model, ids, params, self.speculative, self.stop_ids, pad,
                                      draft_model=self.draft_model)
        for prompt_ids, r in zip(ids, res):
            self._append(out, prompt_ids, r["tokens"], r["logprobs"], torch.tensor(r["entropies"]),
                         {k: r[k] for k in ("forwards", "drafted", "accepted")})

    def _generate_chunk(self, prompts: list[str], params: SamplingParams, out: RolloutBatch) -> None:
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        # The distribution sampled: temperature, then top-k / top-p (greedy: the raw one, log-probs unused).
        stats = StepStats(1.0) if params.greedy else StepStats(params.temperature, params.top_k, params.top_p)
        own_sampler = not params.greedy and params.sampler == "inverse_cdf"
        # Order matters: StepStats reads the raw logits, the sampler replaces them by its pick.
        processors = ([stats] if params.logprobs else []) + ([CategoricalSampler(params)] if own_sampler else [])
        res = self.model.generate(**enc, past_key_values=self._shared_prompt_cache(prompts, enc, params.shared_prefix),
                                  generation_config=generation_config(params, tok, greedy=own_sampler,
                                                                     stop_ids=self.stop_ids),
                                  logits_processor=LogitsProcessorList(processors))
        prompt_len = enc["input_ids"].shape[1]
        new_tokens = res.sequences[:, prompt_len:]
        lp, ent = stats.finish(res.sequences)
        mask = enc["attention_mask"].cpu().bool()
        ids = enc["input_ids"].cpu()
        for i in range(len(prompts)):
            self._append(out, ids[i][mask[i]].tolist(), new_tokens[i].tolist(), lp[i].tolist(), ent[i])

    def _append(self, out: RolloutBatch, prompt_ids: list[int], row: list[int], logprobs: list[float],
                entropies, speculation: dict | None = None) -> None:
        """One sample, cut after its first stop token (kept: it is a sampled action); `entropies` None: not
        measured."""
        tok = self.tokenizer
        end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
        stop = end is not None
        n = end + 1 if stop else len(row)
        out.append(prompt_ids, row[:n], logprobs[:n], 0.0 if entropies is None else float(entropies[:n].sum()),
                   "stop" if stop else "length", tok.decode(row[:n], skip_special_tokens=True), speculation)


class StepStats:
    """A logits processor that measures, as generation goes, the log-prob of each sampled token and the entropy
    of each step under the sampled distribution: the raw logits at the sampling temperature, truncated to the top-k /
    top-p set as the warpers truncate them (rl.algo.core.truncate_logits; the full vocabulary without truncation),
    which is what the learner's log-probs describe too (rl.learner.batch.response_logprobs with the same top_k / top_p).

    transformers runs custom processors before its temperature/top-k/top-p warpers, so `scores` are the raw
    logits (the default processors are switched off by generation_config). The token sampled from step t's scores
    is only known at step t+1 (last column of input_ids), so one step's logits are kept, never all T of them as
    output_logits would (T x B x V floats: GBs at long budgets).
    """

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0):
        self.temperature, self.previous, self.logprobs, self.entropies = temperature, None, [], []
        self.truncation = (top_k, top_p)

    def _close_previous(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.logprobs.append(token_logprobs(self.previous, tokens, self.temperature, *self.truncation).squeeze(1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._close_previous(input_ids[:, -1:])
        self.previous = scores.unsqueeze(1)
        self.entropies.append(entropy_from_logits(self.previous, self.temperature, *self.truncation).squeeze(1))
        return scores

    def finish(self, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] log-probs and entropies (empty when the processor was not used)."""
        self._close_previous(sequences[:, -1:])
        self.previous = None
        if not self.logprobs:
            return torch.zeros(sequences.shape[0], 0), torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.logprobs, 1).cpu(), torch.stack(self.entropies, 1).cpu()


class CategoricalSampler:
    """The last logits processor: draws each row's next token from the (temperature, top-k, top-p warped)
    distribution by inverting its CDF, and returns scores that are 0 at the drawn token and -inf elsewhere, so
    generate's greedy step takes it.

    Why not transformers' own sampling: it calls torch.multinomial, which on CPU draws one exponential variate per
    vocabulary entry and row (for a 49k vocabulary, a sizeable share of a small model's decode step); the inverse
    CDF needs one uniform per row and a float64 cumulative sum (docs/performance.md). Same distribution
    (tests/test_rollout.py checks frequencies); the warpers are transformers' own, so truncation is identical.
    """

    def __init__(self, params: SamplingParams):
        self.warpers = [TemperatureLogitsWarper(params.temperature)] if params.temperature != 1.0 else []
        if params.top_k > 0:
            self.warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(params.top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        cdf = torch.softmax(scores.float(), dim=-1).double().cumsum(-1)  # float64: exact to ~1e-16 per token
        draw = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
        # right=True: the first token whose cumulative mass exceeds the draw, so zero-probability tokens never win.
        token = torch.searchsorted(cdf, draw, right=True).clamp_(max=cdf.shape[1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def generation_config(params: SamplingParams, tok, greedy: bool = False, stop_ids: list[int] | None = None):
    """Every field that shapes the sampling distribution, set explicitly; `greedy`: a logits processor samples;
    `stop_ids`: the ids that end a response (default the tokenizer's EOS; rl.rollout.stops adds end-of-turn).

    transformers fills fields left at None from the checkpoint's generation_config.json and then from global
    defaults (top_k=50!), which would sample from a truncated distribution while the log-probs describe the full
    one. top_k=0 and repetition_penalty=1.0 switch those processors off.
    """
    from transformers import GenerationConfig

    sampling = dict(do_sample=False) if params.greedy or greedy else dict(
        do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    return GenerationConfig(max_new_tokens=params.max_new_tokens, eos_token_id=stop_ids or tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, repetition_penalty=1.0,
                            no_repeat_ngram_size=0, typical_p=1.0, min_p=None,
                            return_dict_in_generate=True, **sampling)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None

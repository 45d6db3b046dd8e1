"""Lossless speculative sampling for rollouts: draft k tokens, verify them in one forward of the policy.

The rule (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", and Chen et al. 2023,
"Accelerating LLM Decoding with Speculative Sampling"): with p the policy's sampling distribution at a position and
q the drafter's, drafted token x is accepted with probability min(1, p(x) / q(x)); at the first rejection the token
is drawn from norm(max(0, p - q)) and the rest of the draft is discarded; when every draft is accepted, a bonus token
is drawn from p at the next position. Each emitted token is then distributed exactly as p (Leviathan et al., App.
A.1), so a response follows the policy's distribution exactly, whatever the drafter proposes. A deterministic drafter
(n-gram) is a point mass: accept with probability p(x), on rejection draw from p with x removed, renormalised.

p is the distribution every other rollout path samples and the learner scores: the logits at the sampling
temperature, truncated by top-k then top-p (rl.algo.core.truncate_logits); greedy decoding is a point mass at the
argmax. The log-prob returned for each token is log p from the verifying forward, the same quantity as the plain
path's and the learner's (rl.algo.core.token_logprobs), so the mismatch monitor is unchanged.

Why it pays on this CPU (docs/performance.md, specs/platform.md section 9): a decode step streams all weights for one
token per sequence, so verifying k + 1 positions costs far less than k + 1 steps, most of all at the small batches of
a group's long tail. `Schedule` speculates where that holds (config `rollout.speculative`, rl/config/speculative.py).
"""
from __future__ import annotations

import time

import torch

from rl.algo.core import truncate_logits
from rl.rollout.distributions import sample, target_distribution
from rl.rollout.drafters import Drafter, ModelDrafter, NgramDrafter
from rl.rollout.kv import MaskedKV


def accept_probability(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    """min(1, p(x) / q(x)): the one line that makes speculation lossless (tests replace it to show a biased rule
    is caught). q(x) > 0 since x was drawn from q."""
    return (p_x / q_x.clamp(min=1e-30)).clamp(max=1.0)


def verify(probs: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor,
           q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule for a batch. probs [n, K+1, V]: p at each verified position (position j: the
    distribution of the token after j accepted drafts); drafts [n, K]; lengths [n] (row i drafted lengths[i] <= K
    tokens); q [n, K, V] the drafter's distributions, None for a point mass at the drafts.

    Returns (accepted [n]: how many leading drafts were kept, token [n]: the token emitted after them, drawn from
    the residual at the first rejection or from p after the last draft)."""
    n, k = drafts.shape
    dev = drafts.device
    rows = torch.arange(n, device=dev)
    accepted = torch.zeros(n, dtype=torch.long, device=dev)
    if k:
        p_x = probs[:, :k].gather(2, drafts[..., None]).squeeze(-1)
        q_x = torch.ones_like(p_x) if q is None else q.gather(2, drafts[..., None]).squeeze(-1)
        ok = torch.rand(n, k, dtype=torch.float64, device=dev) < accept_probability(p_x, q_x).double()
        ok &= torch.arange(k, device=dev)[None, :] < lengths[:, None]
        accepted = ok.long().cumprod(1).sum(1)
    p = probs[rows, accepted]
    rejected = (accepted < lengths).nonzero().squeeze(1)
    if rejected.numel():
        a = accepted[rejected]
        if q is None:  # max(0, p - onehot(x)) is p with x removed
            residual = p[rejected].scatter(1, drafts[rejected, a][:, None], 0.0)
        else:
            residual = (p[rejected] - q[rejected, a]).clamp(min=0.0)
        # All-zero only where rounding made p == q, where the rule cannot reject: keep p then.
        empty = residual.sum(1, keepdim=True) <= 0
        p = p.index_put((rejected,), torch.where(empty, p[rejected], residual))
    return accepted, sample(p)


def best_k(acceptance: float, k_max: int, cost: float) -> int:
    """The k <= k_max maximising expected tokens per verifying forward, (1 - a^(k+1)) / (1 - a) for per-token
    acceptance a (Leviathan et al. 2023, eq. 1), over its cost 1 + cost * k relative to a plain step."""
    a = min(max(acceptance, 0.0), 0.999)
    score = [(1 - a ** (k + 1)) / (1 - a) / (1 + cost * k) for k in range(1, k_max + 1)]
    return 1 + max(range(k_max), key=score.__getitem__)


class Schedule:
    """When to speculate and with which k (config `rollout.speculative`, field docs there): always in the tail
    (at most `tail_batch_size` sequences active, where a verified position costs almost nothing), otherwise while the
    measured acceptance reaches `min_acceptance`, with a probe every `probe_every` steps to keep measuring."""

    def __init__(self, spec):
        self.spec, self.acceptance, self.idle = spec, None, 0

    def k(self, active: int) -> int:
        s = self.spec
        tail = active <= s.tail_batch_size
        unknown = self.acceptance is None
        if not (tail or unknown or self.acceptance >= s.min_acceptance or self.idle + 1 >= s.probe_every):
            self.idle += 1
            return 0
        self.idle = 0
        if not s.adaptive_k or unknown:
            return s.num_draft_tokens
        return best_k(self.acceptance, s.num_draft_tokens, 0.0 if tail else s.verify_token_cost)

    def update(self, accepted: int, trials: int) -> None:
        """`trials`: drafts put to the test (the accepted ones and each row's first rejected one): accepted / trials
        estimates the per-token acceptance, which the truncated count accepted / drafted would underestimate."""
        if trials:
            rate, b = accepted / trials, self.spec.acceptance_beta
            self.acceptance = rate if self.acceptance is None else b * self.acceptance + (1 - b) * rate


def make_drafter(spec, params, vocab_size: int, draft_model=None) -> Drafter:
    if spec.drafter == "ngram":
        return NgramDrafter(spec.ngram_min, spec.ngram_max)
    if spec.drafter == "model":
        if draft_model is None:
            raise ValueError("rollout.speculative.drafter: `model` needs the draft model loaded")
        return ModelDrafter(draft_model, vocab_size, params.temperature, params.top_k, params.top_p, params.greedy)
    raise ValueError(f"rollout.speculative.drafter: {spec.drafter!r} does not draft")


@torch.no_grad()
def speculative_generate(model, prompts: list[list[int]], params, spec, stop_ids, pad_id: int = 0,
                         drafter: Drafter | None = None, draft_model=None) -> tuple[list[dict], dict]:
    """Sample one response per prompt (token-id lists) with speculative decoding.

    params: rl.rollout.worker.SamplingParams (max_new_tokens, temperature, top_k, top_p, greedy, logprobs,
    shared_prefix); spec: rl.config.SpeculativeConfig; stop_ids: the token id(s) that end a response (EOS, the
    template's end-of-turn: rl.rollout.stops), None for none. Returns, per prompt, {"tokens", "logprobs",
    "entropies", "finish_reason", "forwards", "drafted", "accepted"} (ended after the first stop token, kept), and
    batch totals
    {"forwards" (verifying forwards of the batch), "row_forwards" (summed over the sequences in each), "draft_steps",
    "drafted", "accepted", "tokens", "draft_forwards", "seconds"}."""
    t0 = time.perf_counter()
    stops = set() if stop_ids is None else {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    vocab = model.get_output_embeddings().weight.shape[0]
    drafter = drafter or make_drafter(spec, params, vocab, draft_model)
    dev = model.get_output_embeddings().weight.device
    ids, mask, rows = (t.to(dev) for t in _prefill_inputs(prompts, pad_id, params.shared_prefix))
    policy = MaskedKV(model)
    policy.prefill(ids, mask, rows)
    drafter.start(ids, mask, rows, [len(p) for p in prompts])
    last = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=dev)
    seqs = [list(p) for p in prompts]
    out = [dict(tokens=[], logprobs=[], entropies=[], finish_reason="length", forwards=0, drafted=0, accepted=0)
           for _ in prompts]
    totals = dict(forwards=0, row_forwards=0, draft_steps=0, drafted=0, accepted=0, tokens=0)
    schedule, active = Schedule(spec), list(range(len(prompts)))
    while active:
        k = schedule.k(len(active))
        room = torch.tensor([params.max_new_tokens - len(out[i]["tokens"]) - 1 for i in active]).clamp(0, k)
        drafts, q = torch.zeros(len(active), 0, dtype=torch.long, device=dev), None
        lengths = torch.zeros(len(active), dtype=torch.long, device=dev)
        proposed = bool(k) and int(room.max()) > 0
        if proposed:
            drafts, lengths, q = drafter.propose([seqs[i] for i in active], room.to(dev))
            width = int(lengths.max())
            drafts, lengths = drafts[:, :width].to(dev), lengths.to(dev)
            q = None if q is None else q[:, :width]
        n_in = drafts.shape[1] + 1
        logits = policy.forward(torch.cat([last[:, None], drafts], 1),
                                torch.ones(len(active), n_in, dtype=torch.bool, device=dev))
        probs, logp = target_distribution(logits, params.temperature, params.top_k, params.top_p, params.greedy)
        accepted, token = verify(probs, drafts, lengths, q)
        # Row i emits its first accepted[i] drafts, then `token`; the verified positions after them become holes.
        emitted = torch.cat([drafts, torch.zeros(len(active), 1, dtype=torch.long, device=dev)], 1)
        emitted[torch.arange(len(active), device=dev), accepted] = token
        policy.drop_last(torch.arange(n_in, device=dev)[None, :] > accepted[:, None])
        if proposed:
            drafter.commit(accepted)
        lp = logp.gather(2, emitted[..., None]).squeeze(-1) if params.logprobs else None
        ent = _entropy(probs if not params.greedy else logp.exp(), logp) if params.logprobs else None
        tests = torch.minimum(accepted + 1, lengths)  # drafts tested: the accepted ones and the first rejected one
        schedule.update(int(accepted.sum()), int(tests.sum()))
        totals["forwards"] += 1
        totals["row_forwards"] += len(active)
        totals["draft_steps"] += int(lengths.sum() > 0)
        totals["drafted"] += int(lengths.sum())
        totals["accepted"] += int(accepted.sum())
        keep = []
        emitted_rows = emitted.tolist()
        lp_rows = lp.tolist() if lp is not None else None
        ent_rows = ent.tolist() if ent is not None else None
        for r, (i, a, n_drafted) in enumerate(zip(active, accepted.tolist(), lengths.tolist())):
            new = emitted_rows[r][:a + 1][:params.max_new_tokens - len(out[i]["tokens"])]
            end = next((j for j, t in enumerate(new) if t in stops), None)
            if end is not None:
                new = new[:end + 1]
                out[i]["finish_reason"] = "stop"
            o = out[i]
            o["tokens"] += new
            o["forwards"] += 1
            o["drafted"] += n_drafted
            o["accepted"] += a
            if lp_rows is not None:
                o["logprobs"] += lp_rows[r][:len(new)]
                o["entropies"] += ent_rows[r][:len(new)]
            seqs[i] += new
            totals["tokens"] += len(new)
            if o["finish_reason"] == "length" and len(o["tokens"]) < params.max_new_tokens:
                keep.append(r)
        last = token
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.long, device=dev)
            policy.compact(index)
            drafter.select(index)
            last, active = last.index_select(0, index), [active[r] for r in keep]
        else:
            policy.compact()
    totals.update(draft_forwards=drafter.forwards, seconds=time.perf_counter() - t0)
    return out, totals


def _entropy(probs: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the vocabulary (truncated tokens: p = 0 and log p = -inf contribute 0)."""
    return -torch.where(probs > 0, probs * logp, 0.0).sum(-1)


def _prefill_inputs(prompts: list[list[int]], pad_id: int, shared: bool):
    """Distinct prompts without their last token, left-padded ([D, P] ids and mask), and each sequence's row."""
    first: dict[tuple, int] = {}
    index = [first.setdefault(tuple(p), len(first)) if shared else i for i, p in enumerate(prompts)]
    distinct = list(first) if shared else [tuple(p) for p in prompts]
    width = max(len(p) for p in distinct) - 1
    ids = torch.full((len(distinct), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(distinct), width, dtype=torch.bool)
    for d, p in enumerate(distinct):
        if len(p) > 1:
            ids[d, width - len(p) + 1:] = torch.tensor(p[:-1], dtype=torch.long)
            mask[d, width - len(p) + 1:] = True
    return ids, mask, torch.tensor(index, dtype=torch.long)


def summarize(drafted: int, accepted: int, tokens: int, forwards: int) -> dict[str, float]:
    """acceptance_rate (accepted / drafted tokens) and tokens_per_forward (tokens per sequence per verifying
    forward: 1 for plain decoding, up to k + 1)."""
    return {"acceptance_rate": accepted / drafted if drafted else 0.0,
            "tokens_per_forward": tokens / forwards if forwards else 0.0}

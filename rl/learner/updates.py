"""What the learner computes, and how the driver splits it over ranks and sums it back.

Rank side: an update (one optimizer step or more) or a query (no gradients) is a function
`fn(engine, shard, plan)` of an rl.learner.engine.Engine, this rank's items and the batch-global plan, registered by name
in UPDATES / QUERIES. A new algorithm adds one function and one decorator line; rl.learner.rank.LearnerRank dispatches
by name and never changes.

Driver side (pure Python, no Ray): a plan function `plan_fn(items, num_ranks, micro_batch_size)` returns one
shard per rank and the plan every rank gets; a reduce function turns the per-rank results into one value.
rl.learner.group.LearnerGroup.update / .query glue the two sides together.

Two rules hold for every update, because ZeRO's collectives need every rank in the same call at the same time:
every rank runs the same number of forward/backward passes (a rank without items runs a zero-weight stand-in),
and losses are normalised by batch-global counts from the plan, so the update does not depend on the split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from rl.algo.core import logprob_mismatch, policy_loss, preference_correct, preference_margin, tis_weights, sft_loss
from rl.learner.batch import pack_pairs, pad_pairs, pad_values, prefix_pairs, response_logprobs, split_bounds, to_device
from rl.contracts import PreferencePair, SftExample, TrainSequence
from rl.data.preference import pair_batch, pair_losses, summed_logps
from rl.data.sft import sft_batch

UPDATES: dict[str, Callable] = {}
QUERIES: dict[str, Callable] = {}


def register_update(name: str):
    def add(fn):
        UPDATES[name] = fn
        return fn
    return add


def register_query(name: str):
    def add(fn):
        QUERIES[name] = fn
        return fn
    return add


def _lookup(table: dict, kind: str, name: str) -> Callable:
    if name not in table:
        raise ValueError(f"unknown learner {kind} {name!r} (registered: {', '.join(sorted(table))})")
    return table[name]


def run_update(engine, name: str, shard: list, plan: Any):
    engine.policy.train()
    return _lookup(UPDATES, "update", name)(engine, shard, plan)


def run_query(engine, name: str, shard: list, plan: Any = None):
    engine.policy.eval()
    with torch.no_grad():
        return _lookup(QUERIES, "query", name)(engine, shard, plan)


# ------------------------------------------------------------------------------------------------------ plans
@dataclass
class PolicyPlan:
    """Batch-global counts of one policy-gradient step, one entry per mini-batch (the same on every rank)."""
    num_tokens: list[int]  # response tokens in the mini-batch over all ranks: the token-mean denominator
    num_seqs: list[int]  # sequences in the mini-batch over all ranks: the sequence-mean denominator
    num_micro: list[int]  # micro-batches every rank runs (the most any rank needs)
    max_len: int  # response budget: the seq-mean-token-sum-norm denominator
    on_policy: bool = True  # the sequences were sampled from the current weights


@dataclass
class PairPlan:
    num_pairs: int  # pairs in the whole batch, all ranks: the loss denominator
    num_micro: int  # micro-batches every rank runs


def plan_policy(sequences: list[TrainSequence], num_ranks: int, micro_batch_size: int, *, mini_batches: int,
                max_len: int, on_policy: bool = True) -> tuple[list[list[TrainSequence]], PolicyPlan]:
    """Split the step's sequences into `mini_batches` contiguous mini-batches, each into contiguous rank parts.

    Sequences are copied with their `mini_batch` set, so the caller's objects stay as they were. A rank left
    without any sequence gets a stand-in (mini_batch -1, in no mini-batch) to run its zero-weight passes on.
    """
    if not sequences:
        raise ValueError("a policy update needs at least one sequence")
    plan = PolicyPlan([], [], [], max_len, on_policy)
    shards: list[list[TrainSequence]] = [[] for _ in range(num_ranks)]
    for mb, (a, b) in enumerate(split_bounds(len(sequences), mini_batches)):
        part = sequences[a:b]
        plan.num_tokens.append(max(1, sum(len(s.response_ids) for s in part)))
        plan.num_seqs.append(len(part))
        per_rank = [part[x:y] for x, y in split_bounds(len(part), num_ranks)]
        plan.num_micro.append(max(1, max(math.ceil(len(p) / micro_batch_size) for p in per_rank)))
        for r, p in enumerate(per_rank):
            shards[r].extend(replace(s, mini_batch=mb) for s in p)
    for shard in shards:
        if not shard:
            shard.append(replace(sequences[0], mini_batch=-1))
    return shards, plan


def plan_pairs(pairs: list[PreferencePair], num_ranks: int, micro_batch_size: int) \
        -> tuple[list[list[PreferencePair]], PairPlan]:
    """Contiguous shards of pairs, one per rank (a rank left without pairs gets a zero-weight stand-in), and the
    micro-batch count every rank runs; a micro-batch of pairs holds micro_batch_size sequences."""
    if not pairs:
        raise ValueError("a preference update needs at least one pair")
    shards = [pairs[a:b] or [replace(pairs[0], weight=0.0, stand_in=True)]
              for a, b in split_bounds(len(pairs), num_ranks)]
    per_micro = max(1, micro_batch_size // 2)  # each pair is two sequences (chosen, rejected)
    return shards, PairPlan(len(pairs), max(math.ceil(len(s) / per_micro) for s in shards))


def replicate(items: list, num_ranks: int, micro_batch_size: int) -> tuple[list[list], None]:
    """Every rank gets all items: a query whose forward must run on all ranks (ZeRO-3 gathers) but not split."""
    return [items] * num_ranks, None


# ---------------------------------------------------------------------------------------------------- reduces
def reduce_policy(stats: list[dict]) -> dict:
    """Summed statistics over ranks (maxima: the largest); loss and grad norm averaged over optimizer steps, lr
    from rank 0."""
    total = {k: sum(s[k] for s in stats) for k in stats[0]
             if k not in ("lr", "grad_norm", "optimizer_steps", "logprob_diff_max")}
    total["logprob_diff_max"] = max(s.get("logprob_diff_max", 0.0) for s in stats)
    total["grad_norm"] = stats[0]["grad_norm"] / max(1, stats[0]["optimizer_steps"])  # global norm, same on all
    total["lr"] = stats[0]["lr"]
    total["loss"] /= max(1, stats[0]["optimizer_steps"])
    return total


def reduce_preference(stats: list[dict]) -> dict:
    """Batch means over ranks: loss, margin, implicit rewards, train accuracies."""
    tot = {k: sum(s[k] for s in stats) for k in stats[0] if k not in ("grad_norm", "lr")}
    n, n_pref = max(1.0, tot["pairs"]), max(1.0, tot["pairs"] - tot["ties"])
    return {"loss": tot["loss"], "margin": tot["mu_sum"] / n, "reward_chosen": tot["chosen_reward_sum"] / n,
            "reward_rejected": tot["rejected_reward_sum"] / n, "train_tobt_acc": tot["tobt_correct"] / n,
            "train_sign_acc": tot["sign_correct"] / n_pref, "pairs": tot["pairs"], "ties": tot["ties"],
            "grad_norm": stats[0]["grad_norm"], "lr": stats[0]["lr"]}


def concat(parts: list[list]) -> list:
    """Per-rank result lists joined in rank order (contiguous shards: the items' order)."""
    return [row for part in parts for row in part]


def first(parts: list):
    return parts[0]


# ------------------------------------------------------------------------------------------- policy gradient
def _micro(engine, seqs: list[TrainSequence]) -> dict:
    prompts, responses = [s.prompt_ids for s in seqs], [s.response_ids for s in seqs]
    # shared prefix: each distinct prompt runs once per micro-batch; packed: one unpadded row;
    # padded: [B, longest prompt + longest response]
    if engine.cfg.shared_prefix:
        batch = prefix_pairs(prompts, responses, engine.pad_id)
    elif engine.cfg.packing:
        batch = pack_pairs(prompts, responses)
    else:
        batch = pad_pairs(prompts, responses, engine.pad_id)
    width = batch["response_mask"].shape[1]
    batch["old_logprobs"] = pad_values([s.old_logprobs for s in seqs], width)
    batch["advantages"] = torch.tensor([s.advantage for s in seqs], dtype=torch.float32)
    if seqs[0].ref_logprobs is not None:
        batch["ref_logprobs"] = pad_values([s.ref_logprobs for s in seqs], width)
    return to_device(batch, engine.device)


def _logprobs(engine, model, batch: dict) -> torch.Tensor:
    """Response log-probs under the distribution the rollout sampled: its temperature and top-k / top-p."""
    return response_logprobs(model, batch, engine.temperature, engine.top_k, engine.top_p)


@torch.no_grad()
def _attach_ref_logprobs(engine, shard: list[TrainSequence]) -> None:
    """Reference log-probs once per rollout batch (the reference never changes), in micro-batches."""
    for start in range(0, len(shard), engine.cfg.micro_batch_size):
        chunk = shard[start:start + engine.cfg.micro_batch_size]
        lp = _logprobs(engine, engine.ref, _micro(engine, chunk)).cpu()
        for i, seq in enumerate(chunk):
            seq.ref_logprobs = lp[i, :len(seq.response_ids)].tolist()


@register_update("policy")
def policy_update(engine, shard: list[TrainSequence], plan: PolicyPlan) -> dict:
    """One rollout batch: `num_iterations` passes x one optimizer step per mini-batch of the plan.

    Also the training-inference mismatch monitor: |rollout log-prob - learner log-prob| over the response tokens
    scored before the first optimizer step (the whole batch unless algorithm.mini_batches > 1), from the forward the
    update runs anyway. On-policy both sides had the same weights, so it measures how the engines' numerics differ;
    on a one-step-stale batch it also holds one step of policy change."""
    algo, mini_batches = engine.algo, len(plan.num_micro)
    # One pass, one mini-batch, sampled from these weights: pi_old is the policy itself (ratio 1, no second
    # forward). Otherwise pi_old is the rollout's log-probs: the behaviour policy, also when it is a step stale.
    on_policy = plan.on_policy and algo.num_iterations == 1 and mini_batches == 1
    # Truncated IS (algorithm.tis_cap) where pi_old is the learner's own: the tokens came from pi_rollout. Where pi_old
    # is the rollout's log-probs, the PPO ratio already weighs by pi_theta / pi_rollout.
    tis_cap = algo.tis_cap if on_policy else None
    if engine.ref is not None:
        _attach_ref_logprobs(engine, shard)
    totals = {"loss": 0.0, "clipped_tokens": 0.0, "kl_sum": 0.0, "ratio_sum": 0.0, "tokens": 0.0,
              "grad_norm": 0.0, "optimizer_steps": 0, "logprob_diff_sum": 0.0, "logprob_diff_max": 0.0,
              "logprob_diff_tokens": 0.0, "logprob_nonfinite": 0.0, "tis_weight_sum": 0.0}
    for it in range(algo.num_iterations):
        for mb in range(mini_batches):
            seqs = [s for s in shard if s.mini_batch == mb]
            chunks = [seqs[a:b] for a, b in split_bounds(len(seqs), plan.num_micro[mb])]
            for i, chunk in enumerate(chunks):
                # An empty chunk still runs, on a stand-in sequence whose loss is multiplied by zero.
                weight = 1.0 if chunk else 0.0
                batch = _micro(engine, chunk or shard[:1])
                engine.boundary(i == len(chunks) - 1)
                logprobs = _logprobs(engine, engine.policy, batch)
                old = logprobs.detach() if on_policy else batch["old_logprobs"]
                mask = batch["response_mask"]
                tis = None if tis_cap is None else tis_weights(logprobs.detach(), batch["old_logprobs"], mask, tis_cap)
                loss, stats = policy_loss(
                    logprobs, old, batch["advantages"], mask,
                    clip_low=algo.clip_low, clip_high=algo.clip_high, loss_agg=algo.loss_agg,
                    num_tokens=plan.num_tokens[mb], num_seqs=plan.num_seqs[mb], max_len=plan.max_len,
                    ref_logprobs=batch.get("ref_logprobs"), kl_coef=algo.kl_coef, token_weights=tis,
                    importance_sampling_level=algo.importance_sampling_level)
                engine.backward(loss * weight)
                totals["loss"] += float(loss.detach()) * weight
                for k in ("clipped_tokens", "kl_sum", "ratio_sum", "tokens"):
                    totals[k] += float(stats[k]) * weight
                if tis is not None:
                    totals["tis_weight_sum"] += float(tis.sum()) * weight
                if it == 0 and mb == 0 and chunk:  # before any optimizer step of this update
                    diff = logprob_mismatch(logprobs.detach(), batch["old_logprobs"], mask)
                    totals["logprob_diff_sum"] += float(diff["sum"])
                    totals["logprob_diff_tokens"] += float(diff["tokens"])
                    totals["logprob_nonfinite"] += float(diff["nonfinite"])
                    totals["logprob_diff_max"] = max(totals["logprob_diff_max"], float(diff["max"]))
            totals["grad_norm"] += engine.step()
            totals["optimizer_steps"] += 1
    totals["lr"] = engine.lr
    return totals


@register_query("logprobs")
def policy_logprobs(engine, shard: list[tuple[list[int], list[int]]], plan=None) -> list[list[float]]:
    """Policy log-probs of given (prompt_ids, response_ids) responses (tests and diagnostics)."""
    responses = [r for _, r in shard]
    batch = to_device(pad_pairs([p for p, _ in shard], responses, engine.pad_id), engine.device)
    lp = _logprobs(engine, engine.policy, batch).cpu()
    return [lp[i, :len(r)].tolist() for i, r in enumerate(responses)]


# ------------------------------------------------------------------------------ preference pairs (TODO / DPO)
@register_update("preference")
def preference_update(engine, shard: list[PreferencePair], plan: PairPlan) -> dict:
    """One optimizer step on preference pairs. Loss = sum of per-pair losses / plan.num_pairs, so micro-batching
    and the number of ranks do not change it (as for policy_loss)."""
    t = engine.algo.todo
    totals = {"loss": 0.0, "mu_sum": 0.0, "chosen_reward_sum": 0.0, "rejected_reward_sum": 0.0,
              "tobt_correct": 0.0, "sign_correct": 0.0, "ties": 0.0, "pairs": 0.0}
    chunks = [shard[a:b] for a, b in split_bounds(len(shard), plan.num_micro)]
    for i, chunk in enumerate(chunks):
        pairs = chunk or shard[:1]  # an empty chunk still runs, on a stand-in with weight 0
        w = torch.tensor([p.weight if chunk else 0.0 for p in pairs], device=engine.device)
        tie = torch.tensor([bool(p.tie) for p in pairs], device=engine.device)
        batch = to_device(pair_batch(pairs, engine.pad_id), engine.device)
        with torch.no_grad():
            rc, rr = summed_logps(engine.ref, batch)
        engine.boundary(i == len(chunks) - 1)
        pc, pr = summed_logps(engine.policy, batch)
        losses = pair_losses(engine.algo.name, pc, pr, rc, rr, tie, t.beta, t.alpha)
        loss = (losses * w).sum() / max(1, plan.num_pairs)
        engine.backward(loss)
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
    totals["grad_norm"] = engine.step()
    totals["lr"] = engine.lr
    return totals


@register_query("preference_logps")
def preference_logps(engine, shard: list[PreferencePair], plan: PairPlan) -> list[list[float]]:
    """[policy_chosen, policy_rejected, ref_chosen, ref_rejected] summed log-probs per real pair of `shard`."""
    out = []
    for a, b in split_bounds(len(shard), plan.num_micro):
        pairs = shard[a:b] or shard[:1]  # the stand-in forward keeps ZeRO-3 gathers in step; its rows are dropped
        batch = to_device(pair_batch(pairs, engine.pad_id), engine.device)
        pc, pr = summed_logps(engine.policy, batch)
        rc, rr = summed_logps(engine.ref, batch)
        if b > a:
            out.extend(row for p, row in zip(pairs, torch.stack([pc, pr, rc, rr], 1).cpu().tolist())
                       if not p.stand_in)
    return out


# ------------------------------------------------------------------------------- supervised fine-tuning (SFT)
@dataclass
class SftPlan:
    num_tokens: int  # trained tokens of the whole batch, all ranks: the loss denominator
    num_micro: int  # micro-batches every rank runs


def plan_sft(examples: list[SftExample], num_ranks: int, micro_batch_size: int) \
        -> tuple[list[list[SftExample]], SftPlan]:
    """Contiguous shards of examples, one per rank (a rank left without examples gets a zero-weight stand-in), the
    batch's trained-token count and the micro-batch count every rank runs (the most any rank needs)."""
    if not examples:
        raise ValueError("an SFT update needs at least one example")
    shards = [examples[a:b] or [replace(examples[0], weight=0.0, stand_in=True)]
              for a, b in split_bounds(len(examples), num_ranks)]
    tokens = sum(e.num_tokens for e in examples if not e.stand_in)
    return shards, SftPlan(max(1, tokens), max(math.ceil(len(s) / micro_batch_size) for s in shards))


def reduce_sft(stats: list[dict]) -> dict:
    """Loss summed over ranks (each rank's part is already divided by the batch-global count); grad norm and lr
    from rank 0 (the same global value on every rank)."""
    tot = {k: sum(s[k] for s in stats) for k in ("loss", "tokens", "examples")}
    return {**tot, "grad_norm": stats[0]["grad_norm"], "lr": stats[0]["lr"]}


def reduce_sft_loss(stats: list[dict]) -> dict:
    """Held-out token-mean NLL over all ranks' examples."""
    nll, tokens = sum(s["nll_sum"] for s in stats), sum(s["tokens"] for s in stats)
    return {"eval_loss": nll / max(1.0, tokens), "eval_tokens": tokens}


def _sft_micro_batches(engine, shard: list[SftExample], plan: SftPlan):
    """(is last, batch) per micro-batch; an empty chunk runs the shard's first example with weight 0, because
    every rank must run the same passes (ZeRO's collectives)."""
    chunks = [shard[a:b] for a, b in split_bounds(len(shard), plan.num_micro)]
    for i, chunk in enumerate(chunks):
        examples = chunk or [replace(shard[0], weight=0.0, stand_in=True)]
        yield i == len(chunks) - 1, to_device(sft_batch(examples, engine.pad_id, engine.cfg.packing), engine.device)


@register_update("sft")
def sft_update(engine, shard: list[SftExample], plan: SftPlan) -> dict:
    """One optimizer step of supervised NLL: loss = summed NLL of the trained tokens / plan.num_tokens, so it does
    not depend on micro-batches or ranks. Log-probs at temperature 1: the model's own distribution."""
    totals = {"loss": 0.0, "tokens": 0.0, "examples": float(sum(e.weight for e in shard if not e.stand_in))}
    for last, batch in _sft_micro_batches(engine, shard, plan):
        engine.boundary(last)
        logprobs = response_logprobs(engine.policy, batch)
        loss, stats = sft_loss(logprobs, batch["loss_mask"], plan.num_tokens)
        engine.backward(loss)
        totals["loss"] += float(loss.detach())
        totals["tokens"] += float(stats["tokens"])
    totals["grad_norm"] = engine.step()
    totals["lr"] = engine.lr
    return totals


@register_query("sft_loss")
def sft_eval_loss(engine, shard: list[SftExample], plan: SftPlan) -> dict:
    """Summed NLL and trained-token count of this rank's examples (reduce_sft_loss makes the token mean)."""
    out = {"nll_sum": 0.0, "tokens": 0.0}
    for _, batch in _sft_micro_batches(engine, shard, plan):
        _, stats = sft_loss(response_logprobs(engine.policy, batch), batch["loss_mask"], plan.num_tokens)
        out["nll_sum"] += float(stats["nll_sum"])
        out["tokens"] += float(stats["tokens"])
    return out

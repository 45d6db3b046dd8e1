"""Preference pairs for TODO / DPO: loading {prompt, chosen, rejected, tie} data, building pairs from a
verifier-scored rollout group, batching pairs for the learner, and preference evaluation.

A pair, wherever it travels (driver -> learner ranks), is an rl.contracts.PreferencePair (token ids; response ids
end with the end-of-turn token like a sampled response does). No Ray / DeepSpeed here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from rl.algo.core import dpo_losses, preference_correct, preference_margin, todo_losses
from rl.learner.batch import pad_pairs, response_logprobs
from rl.contracts import PreferencePair, RolloutBatch
from rl.data.loading import MAX_BAD_LINES, DataError, as_text, blank, load_dataset, read_jsonl, render_prompt

log = logging.getLogger("reasonrl")

FIELDS = ("prompt", "chosen", "rejected", "tie")
# Online pair kinds, in the order `pairing: priority` takes them.
PAIR_KINDS = ("preference", "shorter", "tie_correct", "tie_incorrect")


# ------------------------------------------------------------------------------------------------ data
def _prompt_messages(prompt, system_prompt: str | None) -> list[dict] | None:
    prompt = as_text(prompt)
    if isinstance(prompt, str):
        return ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + \
            [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return [dict(m) for m in prompt]
    return None


def _response_messages(response) -> list[dict] | None:
    response = as_text(response)
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    if isinstance(response, list) and response and all(isinstance(m, dict) and "content" in m for m in response):
        return [dict(m) for m in response]
    return None


def encode_pair(tokenizer, prompt, chosen, rejected, tie: bool,
                system_prompt: str | None = None) -> PreferencePair | None:
    """Token ids of one pair; prompt/responses are plain strings or chat message lists. None if unusable.

    The response ids are what the chat template appends to the prompt for the assistant turn (its end-of-turn
    token included, trailing newline dropped): exactly the tokens a sampled response consists of.
    """
    msgs = _prompt_messages(prompt, system_prompt)
    responses = [_response_messages(chosen), _response_messages(rejected)]
    if msgs is None or None in responses:
        return None
    prompt, chosen, rejected = as_text(prompt), as_text(chosen), as_text(rejected)
    if getattr(tokenizer, "chat_template", None) is None:
        if not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
            return None
        prompt_text = render_prompt(tokenizer, prompt, system_prompt)
        texts = [chosen, rejected]
        tail = [tokenizer.eos_token_id]
    else:
        prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        texts, tail = [], []
        for resp in responses:
            full = tokenizer.apply_chat_template(msgs + resp, tokenize=False)
            if not full.startswith(prompt_text):
                return None  # a template that rewrites earlier turns: the response cannot be cut out
            texts.append(full[len(prompt_text):].rstrip("\n"))
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    chosen_ids, rejected_ids = enc(texts[0]) + tail, enc(texts[1]) + tail
    return PreferencePair(enc(prompt_text), chosen_ids, rejected_ids, tie=bool(tie))


def load_pairs(source: str, split: str, tokenizer, system_prompt: str | None = None,
               max_prompt_tokens: int | None = None, limit: int = 0) -> tuple[list[PreferencePair], dict]:
    """Encoded pairs from a .jsonl/.json/.parquet file or a hub dataset, and counts of what was skipped.

    A row missing prompt/chosen/rejected (or with a null tie) is skipped and counted. A dataset with no `tie`
    column at all is an ordinary preference set: every row is a preference. A JSONL file is read line by line
    (rl.data.loading.read_jsonl): a malformed line is skipped too (`skipped_bad_json`), and `bad_lines` lists the first
    skipped line numbers. Raises DataError if none is usable.
    """
    jsonl = Path(source).suffix.lower() == ".jsonl"
    if jsonl:  # `datasets` would reject the whole file for one malformed line, without saying which
        data = read_jsonl(source, required=FIELDS[:3], required_if_present=("tie",), what="pairs")
        records, lines, has_tie = data.records, data.lines, "tie" in data.columns
        read, bad = data.stats["lines"], list(data.stats["bad_lines"])
    else:
        ds = load_dataset(source, split)
        records = ds.to_list() if ds is not None else []
        lines, has_tie = [None] * len(records), ds is not None and "tie" in ds.column_names
        read, bad = len(records), []
    stats = {"read": read, **{f"skipped_no_{f}": 0 for f in FIELDS}, "skipped_bad_format": 0,
             "skipped_too_long": 0, "tie_column": has_tie}
    if jsonl:
        stats.update({k: v for k, v in data.stats.items() if k.startswith("skipped_")})
    pairs = []
    for line, record in zip(lines, records):
        missing = [f for f in FIELDS if (f != "tie" or has_tie) and blank(record.get(f))]
        if missing:
            stats[f"skipped_no_{missing[0]}"] += 1
            continue
        pair = encode_pair(tokenizer, record["prompt"], record["chosen"], record["rejected"],
                           bool(record["tie"]) if has_tie else False, system_prompt)
        if pair is None:
            stats["skipped_bad_format"] += 1
            bad.append(line)
            continue
        if max_prompt_tokens and len(pair.prompt_ids) > max_prompt_tokens:
            stats["skipped_too_long"] += 1
            continue
        pairs.append(pair)
        if limit and len(pairs) == limit:
            break
    stats.update(pairs=len(pairs), ties=sum(p.tie for p in pairs))
    if jsonl:
        stats["bad_lines"] = sorted(set(bad))[:MAX_BAD_LINES]
    if not pairs:
        raise DataError(f"preference data {source!r} has no usable pairs (split {split!r}): {stats}")
    return pairs, stats


def trainable(pairs: list[PreferencePair], name: str, alpha: float, dpo_ties: str) -> list[PreferencePair]:
    """The pairs an algorithm can train on: DPO drops ties (or keeps them as preferences), TODO needs alpha > 0
    to model a tie (at alpha = 0 a tie's likelihood is 0 and its loss infinite), so they are dropped then."""
    if name == "todo" and alpha > 0:
        return pairs
    if name == "dpo" and dpo_ties == "as_preference":
        return [dataclasses.replace(p, tie=False) for p in pairs]
    return [p for p in pairs if not p.tie]


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------- pair building
def candidate_pairs(correct: list[bool], lengths: list[int], tie_length_ratio: float, incorrect_ties: bool = True,
                    responses: list | None = None) -> list[tuple[int, int, str]]:
    """Every usable (chosen, rejected, kind) pair of one group, indices into the group.

    correct vs incorrect -> `preference` (the correct one chosen); two correct whose token lengths are within
    `tie_length_ratio` (longer / shorter) -> `tie_correct`, further apart -> `shorter` (the shorter one chosen,
    so preferences also compress); two incorrect within the ratio -> `tie_incorrect` (if `incorrect_ties`), further
    apart -> nothing (no reason to prefer either). Identical responses are never paired: their margin is 0
    whatever the weights, so they carry no gradient.
    """
    out = []
    for i in range(len(correct)):
        for j in range(i + 1, len(correct)):
            if responses is not None and responses[i] == responses[j]:
                continue
            if bool(correct[i]) != bool(correct[j]):
                out.append((i, j, "preference") if correct[i] else (j, i, "preference"))
                continue
            short, long_ = (i, j) if lengths[i] <= lengths[j] else (j, i)
            close = lengths[long_] <= tie_length_ratio * max(1, lengths[short])
            if close and (correct[i] or incorrect_ties):
                out.append((i, j, "tie_correct" if correct[i] else "tie_incorrect"))
            elif not close and correct[i]:
                out.append((short, long_, "shorter"))
    return out


def select_pairs(candidates: list[tuple[int, int, str]], policy: str, k: int,
                 rng: np.random.Generator) -> list[tuple[int, int, str]]:
    """`k` pairs (0: all) by `priority` (kinds in PAIR_KINDS order, random within a kind) or `random` (uniform)."""
    order = [candidates[i] for i in rng.permutation(len(candidates))]
    if policy == "priority":
        order.sort(key=lambda c: PAIR_KINDS.index(c[2]))  # stable: keeps the random order within a kind
    elif policy != "random":
        raise ValueError(f"unknown pairing policy {policy!r}")
    return order if k == 0 else order[:k]


def rollout_pairs(batch: RolloutBatch, correct: list[float], group_size: int, todo_cfg, use_ties: bool,
                  rng: np.random.Generator) -> tuple[list[PreferencePair], dict]:
    """Pairs from every group of a scored rollout, and per-kind counts (`pairs/<kind>`, `groups_without_pairs`)."""
    pairs, counts = [], {f"pairs/{k}": 0 for k in PAIR_KINDS}
    counts["groups_without_pairs"] = 0
    for g in range(len(correct) // group_size):
        idx = list(range(g * group_size, (g + 1) * group_size))
        resp = [batch.response_ids[i] for i in idx]
        cands = candidate_pairs([correct[i] > 0.5 for i in idx], [len(r) for r in resp], todo_cfg.tie_length_ratio,
                                todo_cfg.incorrect_ties, resp)
        if not use_ties:
            cands = [c for c in cands if not c[2].startswith("tie")]
        chosen = select_pairs(cands, todo_cfg.pairing, todo_cfg.pairs_per_group, rng)
        counts["groups_without_pairs"] += not chosen
        for a, b, kind in chosen:
            counts[f"pairs/{kind}"] += 1
            pairs.append(PreferencePair(batch.prompt_ids[idx[a]], resp[a], resp[b], tie=kind.startswith("tie"),
                                        kind=kind, index=(idx[a], idx[b])))
    return pairs, counts


# ------------------------------------------------------------------------------------- batching, scoring
def pair_batch(pairs: list[PreferencePair], pad_id: int) -> dict:
    """One padded batch holding every chosen response, then every rejected one (a single forward for both)."""
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return pad_pairs(prompts, responses, pad_id)


def summed_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (temperature 1: the policy's own distribution) of chosen and rejected [n], [n]."""
    lp = response_logprobs(model, batch)
    return (lp * batch["response_mask"]).sum(-1).chunk(2)


def pair_losses(name: str, pc, pr, rc, rr, tie, beta: float, alpha: float) -> torch.Tensor:
    if name == "todo":
        return todo_losses(pc, pr, rc, rr, tie, beta, alpha)
    return dpo_losses(pc, pr, rc, rr, beta)


def preference_metrics(logps: list[list[float]], ties: list[bool], beta: float, alpha: float) -> dict:
    """Held-out preference numbers from per-pair [policy_chosen, policy_rejected, ref_chosen, ref_rejected].

    tobt_acc*: argmax of the three TOBT probabilities equals the label (TODO's evaluation); sign_acc: mu > 0 on
    preference pairs (DPO's). Both count a 3-way or 2-way draw as wrong.
    """
    t = torch.tensor(logps, dtype=torch.float64).reshape(-1, 4)
    tie = torch.tensor(ties, dtype=torch.bool)
    mu = preference_margin(t[:, 0], t[:, 1], t[:, 2], t[:, 3], beta)
    right = preference_correct(mu, tie, alpha)
    pref = ~tie
    out = {"pairs": len(ties), "ties": int(tie.sum()), "mu_mean": float(mu.mean()),
           "tobt_acc": float(right["tobt"].double().mean())}
    if pref.any():
        out["tobt_acc_pref"] = float(right["tobt"][pref].double().mean())
        out["sign_acc"] = float(right["sign"][pref].double().mean())
        out["mu_mean_pref"] = float(mu[pref].mean())
    if tie.any():
        out["tobt_acc_tie"] = float(right["tobt"][tie].double().mean())
        out["abs_mu_mean_tie"] = float(mu[tie].abs().mean())
    return out


@torch.no_grad()
def local_logps(policy, reference, pairs: list[PreferencePair], pad_id: int, batch_pairs: int = 8) -> list[list[float]]:
    """[pc, pr, rc, rr] per pair with plain (non-distributed) models: the CLI's `pref-eval`."""
    out = []
    for start in range(0, len(pairs), batch_pairs):
        batch = pair_batch(pairs[start:start + batch_pairs], pad_id)
        pc, pr = summed_logps(policy, batch)
        rc, rr = summed_logps(reference, batch)
        out.extend(torch.stack([pc, pr, rc, rr], 1).tolist())
    return out

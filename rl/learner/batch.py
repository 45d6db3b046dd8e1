"""Turning variable-length (prompt, response) pairs into padded tensors, and scoring them with a model.

Layout per micro-batch: prompts left-padded to the longest prompt, responses right-padded to the longest response,
so every response starts at the same column. Position ids come from the attention mask, exactly as `generate`
computes them for left-padded prompts: that is what makes learner log-probs match rollout log-probs.
"""
from __future__ import annotations

import torch

from rl.algo.core import token_logprobs


def pad_pairs(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    p_len = max(len(p) for p in prompt_ids)
    r_len = max(1, max(len(r) for r in response_ids))
    n = len(prompt_ids)
    input_ids = torch.full((n, p_len + r_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, p_len + r_len), dtype=torch.long)
    response_mask = torch.zeros((n, r_len), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, p_len - len(p):p_len] = torch.tensor(p, dtype=torch.long)
        attention[i, p_len - len(p):p_len] = 1
        if r:
            input_ids[i, p_len:p_len + len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, p_len:p_len + len(r)] = 1
            response_mask[i, :len(r)] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions,
            "response_mask": response_mask, "response_tokens": input_ids[:, p_len:], "prompt_len": p_len}


def pack_pairs(prompt_ids: list[list[int]], response_ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """All (prompt + response) sequences of a micro-batch concatenated into one row, no padding.

    Position ids restart at 0 for every sequence: transformers reads that as packed sequences (attention_mask None)
    and builds a block-diagonal causal mask, so no token attends across sequences. `logits_index` holds the
    positions whose logits predict a response token; `rows`/`cols` place those log-probs back into the
    [B, R] layout of `pad_pairs`, so the loss code is the same for both layouts.
    """
    ids, pos, keep, rows, cols = [], [], [], [], []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        start = len(ids) + len(p) - 1  # position predicting the first response token
        keep.extend(range(start, start + len(r)))
        rows.extend([i] * len(r))
        cols.extend(range(len(r)))
        ids.extend(p + r)
        pos.extend(range(len(p) + len(r)))
    r_len = max(1, max(len(r) for r in response_ids))
    response_mask = torch.zeros((len(response_ids), r_len), dtype=torch.float32)
    response_tokens = torch.zeros((len(response_ids), r_len), dtype=torch.long)
    for i, r in enumerate(response_ids):
        response_mask[i, :len(r)] = 1
        response_tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]),
            "logits_index": torch.tensor(keep, dtype=torch.long), "rows": torch.tensor(rows, dtype=torch.long),
            "cols": torch.tensor(cols, dtype=torch.long), "response_mask": response_mask,
            "response_tokens": response_tokens, "packed": True}


def prefix_pairs(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch laid out to run each distinct prompt once: the G samples of a group share its KV cache.

    prompt_*: the U distinct prompts, left-padded; prompt_index[b]: which of them sequence b continues;
    response_*: the B responses, right-padded, with positions continuing after their prompt's real length.
    """
    distinct: dict[tuple, int] = {}
    index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]
    prompts = [list(p) for p in distinct]
    prompt_batch = pad_pairs(prompts, [[] for _ in prompts], pad_id)  # left-padded prompts, no response
    p_len = prompt_batch["prompt_len"]
    r_len = max(1, max(len(r) for r in response_ids))
    response_input = torch.full((len(response_ids), r_len), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(response_ids), r_len), dtype=torch.float32)
    for i, r in enumerate(response_ids):
        if r:
            response_input[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            response_mask[i, :len(r)] = 1
    idx = torch.tensor(index, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    return {"prompt_input_ids": prompt_batch["input_ids"][:, :p_len],
            "prompt_attention_mask": prompt_batch["attention_mask"][:, :p_len],
            "prompt_position_ids": prompt_batch["position_ids"][:, :p_len], "prompt_index": idx,
            "response_input_ids": response_input, "response_mask": response_mask, "response_tokens": response_input,
            "response_position_ids": lengths[:, None] + torch.arange(r_len)[None, :], "shared_prefix": True}


def expand_cache(cache, index: torch.Tensor):
    """A new KV cache whose row b is row index[b] of `cache` (distinct prompts -> their samples); differentiable."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                                        for layer in cache.layers])


def _shared_prefix_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, R, V] predicting each response token, running every distinct prompt once.

    The prompts' KV cache is expanded to the B sequences by index; gradients flow back through it into the prompt
    forward, summed over the group, which is what B separate forwards would give (tested against pad_pairs).
    """
    idx = batch["prompt_index"]
    head = model(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"],
                 position_ids=batch["prompt_position_ids"], use_cache=True, logits_to_keep=1)
    cache = expand_cache(head.past_key_values, idx)
    mask = torch.cat([batch["prompt_attention_mask"].index_select(0, idx),
                      batch["response_mask"].to(batch["prompt_attention_mask"].dtype)], dim=1)
    r_len = batch["response_input_ids"].shape[1]
    tail = model(input_ids=batch["response_input_ids"], attention_mask=mask, past_key_values=cache,
                 position_ids=batch["response_position_ids"], use_cache=True)
    first = head.logits.index_select(0, idx)  # the last prompt position predicts response token 0
    rest = tail.logits[:, :r_len - 1]  # the last response position predicts nothing we score
    return torch.cat([first, rest], dim=1)


def pad_values(values: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, :len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def response_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> torch.Tensor:
    """Log-probs [B, R] of the response tokens under `model` (gradients flow if enabled); mask with response_mask.

    top_k / top_p: the rollout's truncation, applied to these logits as the sampler applied it (rl.algo.core.
    truncate_logits), so the learner's log-probs describe the distribution that was sampled, as the rollout's do."""
    truncation = (top_k, top_p)
    if batch.get("shared_prefix"):
        return token_logprobs(_shared_prefix_logits(model, batch).float(), batch["response_tokens"], temperature,
                              *truncation)
    if batch.get("packed"):
        if not len(batch["logits_index"]):  # every response empty: nothing to score
            return torch.zeros_like(batch["response_mask"])
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                    logits_to_keep=batch["logits_index"], use_cache=False)
        targets = batch["response_tokens"][batch["rows"], batch["cols"]]
        flat = token_logprobs(out.logits.float(), targets.unsqueeze(0), temperature, *truncation).squeeze(0)
        return torch.zeros_like(batch["response_mask"]).index_put((batch["rows"], batch["cols"]), flat)
    r_len = batch["response_tokens"].shape[1]
    # Only the last r_len+1 positions are needed: skipping the prompt's lm_head saves time and memory
    # (the vocabulary projection dominates small models).
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=r_len + 1, use_cache=False)
    logits = out.logits[:, :-1].float()  # position p_len-1+t predicts response token t
    return token_logprobs(logits, batch["response_tokens"], temperature, *truncation)


def split_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, end) ranges over n items whose sizes differ by at most one (some may be empty)."""
    q, r = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append((start, end))
        start = end
    return out


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

"""Turning variable-length (prompt, response) pairs into padded tensors, and scoring them with a model.

Layout per micro-batch: prompts left-padded to the longest prompt, responses right-padded to the longest response,
so every response starts at the same column. Position ids come from the attention mask, exactly as `generate`
computes them for left-padded prompts: that is what makes learner log-probs match rollout log-probs.
"""
from __future__ import annotations

import torch

from rl.algorithms import token_logprobs


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


def pad_values(values: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, :len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def response_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [B, R] of the response tokens under `model` (gradients flow if enabled)."""
    r_len = batch["response_tokens"].shape[1]
    # Only the last r_len+1 positions are needed: skipping the prompt's lm_head saves time and memory
    # (the vocabulary projection dominates small models).
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=r_len + 1, use_cache=False)
    logits = out.logits[:, :-1].float()  # position p_len-1+t predicts response token t
    return token_logprobs(logits, batch["response_tokens"], temperature)


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

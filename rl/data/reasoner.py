"""The tiny reasoner: a word-level tokenizer of the testbed's own vocabulary and a small random-init Llama, saved
as an ordinary HF model folder (config.json, model.safetensors, tokenizer.json, chat template) that `model.path`,
`AutoModelForCausalLM`, eval and every rollout backend take unchanged.

Why: SmolLM2-135M costs about a minute a step on two CPU cores, so an RL run of hundreds of steps, the budget at
which length pressure can show, is out of reach with it. A model of about a million parameters trained from scratch
by the SFT step on the testbed's solutions costs seconds a step.

Tokenization: each word, each digit and each punctuation mark is one token, with the space before it folded into
the token (" is", " 7", "7"), and a newline is a token. Decoding concatenates the tokens, so every text made of
known words round-trips exactly; an unknown word becomes `<unk>`. Digits are single tokens so that the model reads
and writes numbers column by column, as the solutions do. The chat template is ChatML (`<|im_start|>role ...
<|im_end|>`), whose `<|im_end|>` is the end-of-sequence token.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

# One pre-token per match: a newline, a word, a digit or any other single character, each with the space before it.
PRE_TOKEN = r"\n| ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]| "
SPECIAL = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>")
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama shapes by width: MLP 3x the width, 32-wide heads, tied embeddings (the vocabulary is ~100 tokens, so almost
# every parameter sits in the layers). Width 128 x 4 layers is 0.8M parameters.
HEAD_DIM = 32


def pre_tokens(text: str) -> list[str]:
    import re

    return re.findall(PRE_TOKEN, text)


def vocabulary(texts: Iterable[str]) -> list[str]:
    """The special tokens, the role names, then every pre-token of `texts` (sorted, so the ids are reproducible)."""
    seen: set[str] = set()
    for text in texts:
        seen.update(pre_tokens(text))
    words = [w for w in ROLES if w not in seen] + sorted(seen)
    return list(SPECIAL) + words


def build_tokenizer(texts: Iterable[str]):
    """A PreTrainedTokenizerFast whose vocabulary is the pre-tokens of `texts` (plus specials and role names)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(texts))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKEN), behavior="isolated")
    core.decoder = decoders.Fuse()  # the spaces live inside the tokens: decoding is plain concatenation
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  clean_up_tokenization_spaces=False, model_max_length=1024)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_reasoner(out: str | Path, texts: Iterable[str], width: int = 128, layers: int = 4, seed: int = 0) -> dict:
    """Write a random-init Llama with a word-level tokenizer of `texts` into `out`; returns its size summary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if width % HEAD_DIM or width <= 0 or layers <= 0:
        raise ValueError(f"reasoner width must be a positive multiple of {HEAD_DIM} and layers positive, "
                         f"got width {width}, layers {layers}")
    tok = build_tokenizer(texts)
    heads = width // HEAD_DIM
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tok), "width": width,
               "layers": layers, "heads": heads, "seed": seed}
    (out / "reasoner.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_reasoner_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)

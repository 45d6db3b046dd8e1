"""A tiny Llama that answers: every response is `\\boxed{4}` or `\\boxed{5}` (about half each, independently per
sample), then end of turn. For the eval tests, which need a real model whose verdicts are sometimes right: the random
`tiny:llama` never writes a box, so its accuracy is always 0 and every accuracy, interval and pass@k check would hold
for a scorer that marked everything wrong.

How: attention and MLP outputs are zeroed (o_proj, down_proj), so the residual stream at a position is the current
token's embedding alone and the next token depends only on the current one (a bigram model). Each token of the
answer gets its own embedding direction, and the untied output head maps that direction to the answer's next token
with a logit margin of 32 (another token is drawn with probability ~1e-9 per position, at temperature 1); `{` maps to
`4` and `5` equally. Every other token maps to `\\`, so the answer starts right after any prompt.
"""
from __future__ import annotations

from pathlib import Path

ANSWERS = ("4", "5")  # the two answers, drawn with equal probability
MARGIN = 32.0  # 7 tokens per response: \ box ed { 4|5 } <|im_end|>


def save_answer_model(out: str | Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from rl.models import TINY, load_tokenizer, resolve_model, save_random_llama

    tok = load_tokenizer(resolve_model("tiny:llama"))
    path = save_random_llama(tok, out, **{**TINY["llama"], "tie_word_embeddings": False})
    model = AutoModelForCausalLM.from_pretrained(path)
    box = tok.encode("\\boxed{", add_special_tokens=False)
    digits = [tok.encode(a, add_special_tokens=False) for a in ANSWERS]
    close = tok.encode("}", add_special_tokens=False)
    assert all(len(d) == 1 for d in digits) and len(close) == 1, (digits, close)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    # (tokens that share a direction, the tokens that may follow them)
    chain = [([t], [n]) for t, n in zip(box, box[1:])]
    chain += [([box[-1]], [d[0] for d in digits]), ([d[0] for d in digits], close), (close, [eot])]
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0  # direction 0: every token outside the answer...
        head.zero_()
        head[box[0], 0] = MARGIN / hidden ** 0.5  # ...is followed by the answer's first token
        for direction, (tokens, following) in enumerate(chain, start=1):
            emb[tokens] = 0.0
            emb[tokens, direction] = 1.0
            # a one-hot residual leaves the final RMSNorm as sqrt(hidden) on its direction
            head[following, direction] = MARGIN / hidden ** 0.5
    model.save_pretrained(path)
    return path

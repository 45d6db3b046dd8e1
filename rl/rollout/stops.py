"""Where a response ends: the tokenizer's EOS and the chat template's end-of-turn token (no torch import, so the
vLLM worker and the tests use it too).

Why: a chat model ends its turn with the template's end-of-turn token, which need not be the tokenizer's EOS.
Qwen2.5-Math-1.5B's EOS is `<|endoftext|>` while its ChatML turn ends at `<|im_end|>`; stopping at EOS alone lets a
response run on into invented next turns (tokens and ACT inflate, and the last `\\boxed{}` can come from an invented
problem). Qwen's own eval stops on both. The end-of-turn token is read off the template itself: render a
conversation with a marker as the assistant's reply and take the special token that follows the marker.
"""
from __future__ import annotations

_MARKER = "reasonrl-end-of-turn-probe"


def end_of_turn_token_id(tokenizer) -> int | None:
    """The id of the special token the chat template writes right after an assistant message (None: no template,
    or plain text follows)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": _MARKER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation shape: EOS alone, as before
        return None
    if not isinstance(text, str) or _MARKER not in text:
        return None
    after = text.split(_MARKER, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a response: EOS first, then the template's end-of-turn token when it differs."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot = end_of_turn_token_id(tokenizer)
    if eot is not None and eot not in ids:
        ids.append(eot)
    return ids

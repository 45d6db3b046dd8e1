"""SFT data: TRL's two supervised formats, encoded into token ids and a per-token loss mask, and batched.

Formats (per row, as TRL's SFTTrainer reads them):
- prompt-completion: `prompt` and `completion`, each a plain string or a chat message list; the loss covers the
  completion's assistant turns;
- conversational: `messages`, a chat message list; the loss covers every assistant turn, nothing else.

A string prompt is rendered exactly as RL renders a problem (rl.data.loading.render_prompt with `data.system_prompt` and
`data.prompt_suffix`), and a message list without a system turn gets `data.system_prompt` too, so a model trained
here meets the same prompt when RL continues from its checkpoint. Each assistant turn is what the chat template
appends for it, end-of-turn token included and the trailing newline left to the context (the way encode_pair in
rl.data.preference cuts responses): a trained turn ends where a sampled response ends. No Ray / DeepSpeed here.
"""
from __future__ import annotations

import logging

import torch

from rl.learner.batch import pack_pairs, pad_pairs, pad_values
from rl.contracts import SftExample
from rl.data.loading import DataError, as_text, blank, load_dataset, render_prompt

log = logging.getLogger("reasonrl")

SKIPS = ("no_prompt", "no_completion", "no_messages", "bad_format", "too_long")


# --------------------------------------------------------------------------------------------- field checks
def _messages(value) -> list[dict] | None:
    """A clean copy of a chat message list (role and string content each), or None if it is not one. Keys that
    Arrow filled with None (a key some other row's messages have) are dropped, so templates never see them."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


# ------------------------------------------------------------------------------------------------ encoding
def _segments(tokenizer, messages: list[dict], trained: list[bool]) -> list[tuple[str, bool]] | None:
    """The conversation as text segments (text, trained), cut out of the chat template turn by turn: before each
    trained assistant turn, the template's text up to its assistant header (context); then the turn's own text up
    to and including its end-of-turn token (trained). None when the template rewrites earlier turns (then a turn
    cannot be cut out) or no turn is trained."""
    segments, rendered = [], ""
    for i, train in enumerate(trained):
        if not train:
            continue
        try:
            head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        except Exception:  # a template that refuses the row (e.g. roles that must alternate): a bad row, not a crash
            return None
        if not head.startswith(rendered) or not full.startswith(head):
            return None
        turn = full[len(head):].rstrip("\n")  # the newline after the end-of-turn token is the next turn's context
        segments += [(head[len(rendered):], False), (turn, True)]
        rendered = head + turn
    return segments or None


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _from_segments(tokenizer, segments: list[tuple[str, bool]]) -> SftExample:
    # Segment by segment, as generation sees it: the prompt is tokenized alone, a response token by token.
    prompt_ids = _ids(tokenizer, segments[0][0])
    completion, mask = [], []
    for text, train in segments[1:]:
        ids = _ids(tokenizer, text)
        completion += ids
        mask += [int(train)] * len(ids)
    return SftExample(prompt_ids, completion, mask)


def encode_prompt_completion(tokenizer, prompt, completion, system_prompt: str | None = None,
                             suffix: str = "") -> SftExample | None:
    """One prompt-completion row (strings or message lists); None if unusable. The loss covers the completion's
    assistant turns (a tool or user message inside a completion list is context)."""
    prompt, completion = as_text(prompt), as_text(completion)
    if getattr(tokenizer, "chat_template", None) is None:  # no template: plain text, the completion ends with EOS
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            return None
        ids = _ids(tokenizer, completion) + [tokenizer.eos_token_id]
        return SftExample(_ids(tokenizer, render_prompt(tokenizer, prompt, system_prompt, suffix)), ids,
                          [1] * len(ids))
    if isinstance(prompt, str):
        prompt_msgs = _with_system([{"role": "user", "content": prompt + suffix}], system_prompt)
    else:
        prompt_msgs = _messages(prompt)
        prompt_msgs = None if prompt_msgs is None else _with_system(prompt_msgs, system_prompt)
    completion_msgs = [{"role": "assistant", "content": completion}] if isinstance(completion, str) \
        else _messages(completion)
    if prompt_msgs is None or completion_msgs is None:
        return None
    trained = [False] * len(prompt_msgs) + [m["role"] == "assistant" for m in completion_msgs]
    segments = _segments(tokenizer, prompt_msgs + completion_msgs, trained)
    if segments is None:
        return None
    if isinstance(prompt, str) and segments[0][0] != render_prompt(tokenizer, prompt, system_prompt, suffix):
        return None  # cannot happen with the same template; guards the promise that RL sees this very prompt
    return _from_segments(tokenizer, segments)


def encode_conversation(tokenizer, messages, system_prompt: str | None = None) -> SftExample | None:
    """One conversational row; the loss covers every assistant turn. None if unusable (no assistant turn after
    the first user turn, no chat template, a malformed message)."""
    msgs = _messages(messages)
    if msgs is None or getattr(tokenizer, "chat_template", None) is None:
        return None
    msgs = _with_system(msgs, system_prompt)
    # Assistant turns before any user turn (a greeting) have nothing to answer: they stay context.
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), len(msgs))
    segments = _segments(tokenizer, msgs, [m["role"] == "assistant" and i > first_user for i, m in enumerate(msgs)])
    return None if segments is None else _from_segments(tokenizer, segments)


# ------------------------------------------------------------------------------------------------- loading
def load_examples(source: str, split: str, tokenizer, system_prompt: str | None = None, suffix: str = "",
                  max_prompt_tokens: int | None = None, max_completion_tokens: int = 0,
                  limit: int = 0) -> tuple[list[SftExample], dict]:
    """Encoded examples from a .jsonl/.json/.parquet file or a hub dataset, and counts of what was skipped and why.

    A row with a usable `messages` list is conversational; otherwise it needs `prompt` and `completion`. A row
    missing its field, with a wrong type, or with a prompt over `max_prompt_tokens` (a completion over
    `max_completion_tokens`, 0: no limit) is skipped and counted. Raises DataError naming the source if none is left.
    """
    ds = load_dataset(source, split)
    records = ds.to_list() if ds is not None else []
    columns = list(ds.column_names) if ds is not None else []
    if ds is not None and "messages" not in columns and not {"prompt", "completion"} & set(columns):
        raise DataError(f"SFT data {source!r} has neither a 'messages' column (conversational) nor 'prompt' and "
                        f"'completion' columns (prompt-completion); available columns: {columns}")
    stats = {"read": len(records), **{f"skipped_{k}": 0 for k in SKIPS}, "conversational": 0,
             "prompt_completion": 0}
    examples = []
    for index, record in enumerate(records):
        if "messages" in columns and not blank(record.get("messages")):
            kind, ex = "conversational", encode_conversation(tokenizer, record["messages"], system_prompt)
        elif "messages" in columns and "prompt" not in columns and "completion" not in columns:
            stats["skipped_no_messages"] += 1
            continue
        elif blank(record.get("prompt")) or blank(record.get("completion")):
            stats["skipped_no_prompt" if blank(record.get("prompt")) else "skipped_no_completion"] += 1
            continue
        else:
            kind = "prompt_completion"
            ex = encode_prompt_completion(tokenizer, record["prompt"], record["completion"], system_prompt, suffix)
        if ex is None or not ex.num_tokens:
            stats["skipped_bad_format"] += 1
            continue
        if (max_prompt_tokens and len(ex.prompt_ids) > max_prompt_tokens) or \
                (max_completion_tokens and len(ex.completion_ids) > max_completion_tokens):
            stats["skipped_too_long"] += 1
            continue
        rid = record.get("id")
        ex.id = f"{split}-{index}" if rid is None or str(rid) == "" else str(rid)
        stats[kind] += 1
        examples.append(ex)
        if limit and len(examples) == limit:
            break
    stats.update(examples=len(examples), completion_tokens=sum(e.num_tokens for e in examples))
    if not examples:
        raise DataError(f"SFT data {source!r} has no usable rows (split {split!r}): {stats}")
    if any(stats[f"skipped_{k}"] for k in SKIPS):
        log.warning("SFT data %s: skipped %s", source, {k: stats[f"skipped_{k}"] for k in SKIPS
                                                         if stats[f"skipped_{k}"]})
    return examples, stats


# ------------------------------------------------------------------------------------------------ batching
def sft_batch(examples: list[SftExample], pad_id: int, packing: bool = False) -> dict:
    """A padded (or packed) micro-batch of examples, with `loss_mask` [B, T]: each example's per-token mask times
    its weight (0 for a stand-in), on the completion columns of rl.learner.batch's layout."""
    prompts, completions = [e.prompt_ids for e in examples], [e.completion_ids for e in examples]
    batch = pack_pairs(prompts, completions) if packing else pad_pairs(prompts, completions, pad_id)
    width = batch["response_mask"].shape[1]
    mask = pad_values([[float(x) for x in e.loss_mask] for e in examples], width)
    batch["loss_mask"] = mask * torch.tensor([e.weight for e in examples], dtype=torch.float32)[:, None]
    return batch

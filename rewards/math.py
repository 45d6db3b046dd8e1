"""Built-in math rewards: boxed-answer extraction, math-verify equivalence and a format reward.

math-verify enforces its parse/verify timeouts with ``signal.alarm``, so it only works in a process's MAIN thread
(off it, it raises ValueError even with ``raise_on_error=False``; platform spec section 5). Run these functions
through ``rewards.isolation.IsolatedRewards`` (a child process's main thread) or in a plain main thread.
"""
from __future__ import annotations

import functools
import logging
import re

from math_verify import parse, verify

from rewards.registry import register
from .isolation import cap_log_messages

# math-verify logs what it failed to parse, in full ("Timeout during parsing: <the whole answer>"), on the loggers of
# its modules; a filter on the package logger would not see them (filters do not apply to children's records).
cap_log_messages(*(name for name in list(logging.root.manager.loggerDict)
                   if name == "math_verify" or name.startswith("math_verify.")))

__all__ = ["last_boxed", "math_verify", "boxed_format"]

# Optional whitespace after the command: "\boxed {x}" is valid LaTeX and models do write it.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, matched by braces (nesting allowed).

    None when there is no box or the last one is unbalanced: a completion cut off inside its final box has not
    given an answer, and falling back to an earlier box would reward a draft the model moved away from.
    """
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    i = start = starts[-1]
    depth = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # skip the escaped char: \{ and \} are literal braces, not grouping
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _text(completion) -> str:
    # TRL passes conversational completions as [{"role": "assistant", "content": ...}]; score the last message.
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return completion if isinstance(completion, str) else str(completion)


def _wrap(expr: str) -> str:
    # Bare LaTeX is not extracted reliably (`\sqrt{8}` -> [], `(1, 2)` -> [2]); inside $...$ it is.
    s = expr.strip()
    if s.startswith("$") or "\\boxed" in s:
        return s
    return f"${s}$"


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    # GRPO scores a group of completions against the same gold answer; parse it once. A tuple, so the cached
    # value cannot be mutated by a caller.
    return tuple(parse(_wrap(gold)))


@register("math_verify")
def math_verify(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 if the last boxed expression of the completion is mathematically equal to ``answer``, else 0.0."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        pred = last_boxed(_text(completion))
        gold_parsed = _parse_gold(str(gold)) if gold is not None else ()
        # An unparseable gold must never score 1.0 (an empty gold list must not make verify() vacuously true).
        if pred is None or not pred.strip() or not gold_parsed:
            out.append(0.0)
            continue
        pred_parsed = parse(_wrap(pred))
        out.append(1.0 if pred_parsed and verify(list(gold_parsed), pred_parsed) else 0.0)
    return out


@register("boxed_format")
def boxed_format(prompts, completions, **kwargs) -> list[float]:
    """1.0 if the completion ends its answer in a balanced, non-empty ``\\boxed{...}``, else 0.0."""
    return [1.0 if (b := last_boxed(_text(c))) is not None and b.strip() else 0.0 for c in completions]


def _literal(text: str) -> str:
    """Spacing, `$`, a trailing period and thousands separators are presentation, not content."""
    text = text.strip().strip("$").strip().rstrip(".").strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", re.sub(r"\s+", "", text))


@register("exact_match")
def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 if the last \\boxed{} holds the gold answer itself, compared as a literal.

    For tasks whose answers are plain values (arith, GSM8K): math_verify simplifies expressions, so a policy that
    boxes the question (`\\boxed{11 + 11}`) would score as correct there.
    """
    out = []
    for completion, gold in zip(completions, answer):
        pred = last_boxed(_text(completion))
        out.append(float(pred is not None and gold is not None and _literal(pred) == _literal(str(gold)) != ""))
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@register("last_number")
def last_number(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 if the last number written anywhere in the completion equals a numeric gold answer.

    Partial credit for a policy that computes the right value but has not learned the requested format yet:
    rewarding the format alone lets a weak model collapse onto `\\boxed{<any number>}`.
    """
    out = []
    for completion, gold in zip(completions, answer):
        numbers = _NUMBER.findall(_text(completion))
        try:
            ok = bool(numbers) and float(numbers[-1].replace(",", "")) == float(str(gold).replace(",", ""))
        except ValueError:  # a non-numeric gold answer: this reward does not apply
            ok = False
        out.append(float(ok))
    return out

"""Built-in math rewards: boxed-answer extraction, math-verify equivalence and a format reward.

math-verify enforces its parse/verify timeouts with ``signal.alarm``, so it only works in a process's MAIN thread
(off it, it raises ValueError even with ``raise_on_error=False``; platform spec section 5). Run these functions
through ``rewards.isolation.IsolatedRewards`` (a child process's main thread) or in a plain main thread.
"""
from __future__ import annotations

import logging
import re

from rewards.answers import (EXTRACTIONS, THINK_MODES, Extraction, Think, equal, extract, last_boxed, normalize_gold,
                             parse_answer)
from rewards.registry import register
from .isolation import cap_log_messages

# math-verify logs what it failed to parse, in full ("Timeout during parsing: <the whole answer>"), on the loggers of
# its modules; a filter on the package logger would not see them (filters do not apply to children's records).
cap_log_messages(*(name for name in list(logging.root.manager.loggerDict)
                   if name == "math_verify" or name.startswith("math_verify.")))

__all__ = ["last_boxed", "math_verify", "boxed_format"]

def _text(completion) -> str:
    # TRL passes conversational completions as [{"role": "assistant", "content": ...}]; score the last message.
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return completion if isinstance(completion, str) else str(completion)


_GOLDS: dict[tuple[str, str], tuple] = {}
_GOLDS_MAX = 4096


def _parse_gold(gold: str, extraction: str = "last_box") -> tuple:
    # GRPO scores a group of completions against the same gold answer; parse it once. A tuple, so the cached
    # value cannot be mutated by a caller. normalize_gold: Minerva's `4.5e33`, `-1./3`, `np.arcsin(...)` as LaTeX.
    # Only successful parses are kept: an empty one may be math-verify's parse timeout on a loaded machine, and
    # remembering it would score that problem 0 for the rest of the process.
    key = (gold, extraction)
    if key in _GOLDS:
        return _GOLDS[key]
    parsed = tuple(parse_answer(normalize_gold(gold), extraction))
    if parsed:
        if len(_GOLDS) >= _GOLDS_MAX:
            _GOLDS.pop(next(iter(_GOLDS)))  # oldest first
        _GOLDS[key] = parsed
    return parsed


@register("math_verify")
def math_verify(prompts, completions, answer, extraction: Extraction = "last_box", think: Think = "keep",
                rel_tol: float = 0.0, **kwargs) -> list[float]:
    """1.0 if the completion's answer is mathematically equal to ``answer``, else 0.0.

    The defaults are the training reward: the last balanced ``\\boxed{}`` of the whole completion, math-verify's
    equivalence. The eval protocols (eval/protocols.py) pass reward kwargs: ``extraction="math_verify"``
    (lighteval's targets: boxes first, several joined, "the answer is 42"), ``think="split"`` (only the text after
    ``</think>``), ``rel_tol`` (numbers within a relative tolerance, Qwen2.5-Math's grader: 1e-4).
    """
    if extraction not in EXTRACTIONS or think not in THINK_MODES:
        raise ValueError(f"math_verify: extraction must be one of {EXTRACTIONS} and think one of {THINK_MODES}, "
                         f"got {extraction!r}, {think!r}")
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_parsed = _parse_gold(str(gold), extraction) if gold is not None else ()
        # An unparseable gold must never score 1.0 (an empty gold list must not make verify() vacuously true).
        if not gold_parsed:
            out.append(0.0)
            continue
        pred_parsed, _ = extract(_text(completion), extraction, think)
        out.append(1.0 if equal(list(gold_parsed), pred_parsed, rel_tol) else 0.0)
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

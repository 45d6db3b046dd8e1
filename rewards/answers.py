"""Answers as numbers a paper's table would agree with: gold normalisation, `</think>` splitting, the extraction
modes, a numeric fallback with a relative tolerance, and equivalence between two extracted answers (maj@k).

Why each piece exists (issue 27, checked against ../shared/data):
  * Minerva golds are plain-text physics answers. `4.5e33` inside `$...$` parses as 4.5·e·33 (Euler's e), `-1./3`
    as -1, and a few are Python (`np.arcsin(10/13)`); every right answer to them scored 0. `normalize_gold` rewrites
    them into the LaTeX a model writes (`4.5\\times10^{33}`, `-1/3`, `\\arcsin(10/13)`).
  * Reasoning models think before answering: a box inside `<think>` is a draft. `split_think` keeps the text after
    the last `</think>` (DeepScaleR/rllm score only that; lighteval strips reasoning tags by default).
  * Extraction `last_box` is the training reward's strict rule (only the last balanced box); `math_verify` is
    math-verify 0.9's parse with lighteval's targets (ExprExtractionConfig + LatexExtractionConfig for pred and
    gold, precision 6: several boxes joined into one set, "the answer is 42" found). NOT yet lighteval 0.13's own
    verdict: its in-house extraction counts a response right when ANY of its boxes matches, and reads bare golds
    differently; bench/lighteval_crosscheck.py lists the disagreements (issue 27).
  * `rel_tol`: Qwen2.5-Math's grader accepts numbers within a relative 1e-4 of the gold (its `numeric_equal`).

math-verify's timeouts use signal.alarm, so parse/verify run with timeouts only in a main thread (`_timeouts`).
"""
from __future__ import annotations

import functools
import math
import re
import threading
from typing import Literal

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

Extraction = Literal["last_box", "math_verify"]
Think = Literal["keep", "split"]
EXTRACTIONS: tuple[str, ...] = ("last_box", "math_verify")
THINK_MODES: tuple[str, ...] = ("keep", "split")
# lighteval's pass_at_k_math / MATH-500 metric: both targets, for predictions and golds (boxed first: LaTeX config's
# boxed_match_priority), float_rounding 6.
LIGHTEVAL_TARGETS = (ExprExtractionConfig(), LatexExtractionConfig())

THINK_END = "</think>"
# A number in e-notation standing alone (not part of a name like `x2e3` or a decimal continuing it).
_E_NOTATION = re.compile(r"(?<![\w.\\])([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)[eE]([+-]?\d+)(?![\w.])")
_TRAILING_DOT = re.compile(r"(?<=\d)\.(?!\d)")  # `-1./3`: a Python float literal's dot, not a decimal point
_PYTHON = re.compile(r"\b(?:np|numpy|math)\.")
_PY_FUNCS = {"arcsin": "asin", "arccos": "acos", "arctan": "atan"}


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


def _timeouts() -> bool:
    return threading.current_thread() is threading.main_thread()


def _e_to_latex(match: re.Match) -> str:
    mantissa, exponent = match.group(1).rstrip("."), int(match.group(2))
    return f"{mantissa}\\times10^{{{exponent}}}" if mantissa not in ("1", "+1") else f"10^{{{exponent}}}"


def _python_to_latex(expr: str) -> str | None:
    """`np.arcsin(10/13)` -> `\\arcsin{\\left(\\frac{10}{13} \\right)}` through sympy (None if it does not parse)."""
    import sympy
    from sympy.parsing.sympy_parser import parse_expr

    text = _PYTHON.sub("", expr)
    for py, sym in _PY_FUNCS.items():
        text = re.sub(rf"\b{py}\b", sym, text)
    try:
        value = parse_expr(text, evaluate=False)
    except Exception:
        return None
    return sympy.latex(value, inv_trig_style="full")


def normalize_number_notation(text: str) -> str:
    """e-notation and trailing-dot floats as LaTeX: `4.5e33` -> `4.5\\times10^{33}`, `-1./3` -> `-1/3`."""
    return _TRAILING_DOT.sub("", _E_NOTATION.sub(_e_to_latex, text))


def normalize_gold(gold: str) -> str:
    """A benchmark's gold answer as LaTeX math-verify reads as meant (see the module docstring). Idempotent; a gold
    holding a full worked solution (`\\boxed{}` inside) is left alone."""
    s = str(gold).strip()
    if "\\boxed" in s:
        return s
    s = re.sub(r"\$\s*\$", " ", s)  # `a+$ $b`: a gold typed across two math spans
    if _PYTHON.search(s):
        s = _python_to_latex(s) or s
    return normalize_number_notation(s)


def split_think(text: str, mode: Think = "keep") -> str:
    """`split`: the text after the last `</think>` (all of it when there is none: a model that does not think)."""
    if mode == "split" and THINK_END in text:
        return text.rsplit(THINK_END, 1)[1]
    return text


def _wrap(expr: str) -> str:
    # Bare LaTeX is not extracted reliably (`\sqrt{8}` -> [], `(1, 2)` -> [2]); inside $...$ it is.
    s = expr.strip()
    return s if s.startswith("$") or "\\boxed" in s else f"${s}$"


def parse_answer(expr: str, extraction: Extraction = "last_box") -> list:
    """math-verify's parse of an extracted answer or a gold (`$...$`-wrapped, numbers normalised)."""
    targets = LIGHTEVAL_TARGETS if extraction == "math_verify" else (LatexExtractionConfig(), ExprExtractionConfig())
    text = expr if "\\boxed" in expr else normalize_number_notation(expr)  # a worked solution stays as written
    return parse(_wrap(text), targets,
                 parsing_timeout=5 if _timeouts() else None)  # type: ignore[arg-type]


def extract(text: str, extraction: Extraction = "last_box", think: Think = "keep") -> tuple[list, str | None]:
    """(math-verify's parse of the prediction, the answer as a string) for one response; ([], None): no answer."""

    body = split_think(text, think)
    if extraction == "last_box":
        box = last_boxed(body)
        if box is None or not box.strip():
            return [], None
        return parse_answer(box, extraction), box
    parsed = parse(body, LIGHTEVAL_TARGETS, parsing_timeout=5 if _timeouts() else None)  # type: ignore[arg-type]
    return parsed, (str(parsed[-1]) if parsed else None)


def _number(parsed: list) -> float | None:
    for value in parsed:
        try:
            if getattr(value, "is_number", False) and value.is_real:  # sympy: a numeric, real expression
                return float(value)
        except (TypeError, ValueError):
            continue
    return None


def equal(gold: list, pred: list, rel_tol: float = 0.0) -> bool:
    """math-verify's verdict (lighteval's float_rounding 6), then, with `rel_tol` > 0, numbers within it."""
    if not gold or not pred:
        return False
    if verify(gold, pred, float_rounding=6, timeout_seconds=5 if _timeouts() else None):
        return True
    if rel_tol > 0:
        g, p = _number(gold), _number(pred)
        return g is not None and p is not None and math.isclose(g, p, rel_tol=rel_tol)
    return False


@functools.lru_cache(maxsize=65536)
def same_answer(a: str, b: str) -> bool:
    """Do two extracted answers say the same thing (`\\frac12` and `0.5`)? For maj@k: literal first (cheap), then
    math-verify both ways (its verify is not symmetric for equations and intervals)."""
    if re.sub(r"\s+", "", a) == re.sub(r"\s+", "", b):
        return True
    pa, pb = parse_answer(a, "math_verify"), parse_answer(b, "math_verify")
    return equal(pa, pb) or equal(pb, pa)


def extracted_answer(text: str, extraction: Extraction = "last_box", think: Think = "keep") -> str | None:
    """The answer a response gives, as a string (eval records, maj@k votes); the last-box mode does not parse."""
    if extraction == "last_box":

        return last_boxed(split_think(text, think))
    return extract(text, extraction, think)[1]

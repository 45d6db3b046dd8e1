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
    gold, precision 6: several boxes joined into one set, "the answer is 42" found); the answer strings maj@k votes
    on are compared this way. `lighteval` is lighteval 0.13's math metric (Metrics.pass_at_k_math ->
    MultilingualExtractiveMatchMetric) rebuilt from math-verify's own parse/verify with lighteval's settings: its
    targets (LaTeX boxed_match_priority 55, after "final answer is"), first_match fallback (the matched string is
    kept beside the parse), golds read as lighteval's MATH-500 task reads them (inside a box: its gold is the
    solution) and compared as strings when they do not parse, stripped text, any (gold, prediction) pair matching; with think="tags", lighteval's remove_reasoning_tags (every
    `<think>...</think>` pair cut; an unopened `</think>` leaves the text whole). One rule is lighteval's
    dependency's, not math-verify's: lighteval 0.13 pins latex2sympy2_extended 1.0.6, which keeps an earlier box
    with the last one only when the text between them is nothing but `,`, `and` or `or`; math-verify 0.9 (1.11) also
    joins boxes up to 10 characters apart or with a separator anywhere within 70 (`\boxed{0} or rather
    \boxed{5}` -> {0, 5}). `_lighteval_boxed_content` is that 1.0.6 rule; bench/lighteval_crosscheck.py measures
    the rest against lighteval itself.
  * `rel_tol`: Qwen2.5-Math's grader accepts numbers within a relative 1e-4 of the gold (its `numeric_equal`).

math-verify's timeouts use signal.alarm, so parse/verify run with timeouts only in a main thread (`_timeouts`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
import threading
from typing import Literal

import math_verify.parser
from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

Extraction = Literal["last_box", "math_verify", "lighteval"]
Think = Literal["keep", "split", "tags"]
EXTRACTIONS: tuple[str, ...] = ("last_box", "math_verify", "lighteval")
THINK_MODES: tuple[str, ...] = ("keep", "split", "tags")
# lighteval's pass_at_k_math / MATH-500 metric: both targets, for predictions and golds (boxed first: LaTeX config's
# boxed_match_priority), float_rounding 6.
LIGHTEVAL_TARGETS = (ExprExtractionConfig(), LatexExtractionConfig())
# lighteval 0.13's own LatexExtractionConfig (metrics/utils/extractive_match_utils.py): boxes at priority 55, i.e.
# after "final answer is ..." (50), and its normalisation (equations=True there is a no-op in latex2sympy2 1.11,
# where the parser handles equations: left out so that no deprecation warning is logged per call).
_LIGHTEVAL_LATEX = LatexExtractionConfig(boxed_match_priority=55, normalization_config=NormalizationConfig(
    basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all", equations=False))
# Metrics.pass_at_k_math: the same targets for golds and predictions.
LIGHTEVAL_METRIC_TARGETS = (ExprExtractionConfig(), _LIGHTEVAL_LATEX)
THINK_TAGS = ("<think>", "</think>")

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
    """`split`: the text after the last `</think>` (all of it when there is none: a model that does not think).
    `tags`: lighteval's remove_reasoning_tags (pipeline default): every `<think>...</think>` pair cut out, first
    opening tag to the next closing one, until no pair is left; a `</think>` without a `<think>` before it (a chat
    template that opens the thinking in the prompt) leaves the text whole, as in lighteval."""
    if mode == "split" and THINK_END in text:
        return text.rsplit(THINK_END, 1)[1]
    if mode == "tags":
        start_tag, end_tag = THINK_TAGS
        while start_tag in text and end_tag in text:
            start = text.find(start_tag)
            end = text.find(end_tag, start)
            if end == -1:
                break
            text = text[:start] + text[end + len(end_tag):]
    return text


def _wrap(expr: str) -> str:
    # Bare LaTeX is not extracted reliably (`\sqrt{8}` -> [], `(1, 2)` -> [2]); inside $...$ it is.
    s = expr.strip()
    return s if s.startswith("$") or "\\boxed" in s else f"${s}$"


# --- lighteval 0.13's last-box rule (latex2sympy2_extended 1.0.6, math_normalization.extract_boxed_content) --------
# math-verify normalises a matched `\boxed{...}` group with NormalizationConfig(boxed="last"), and which earlier boxes
# "last" keeps is decided by the installed latex2sympy2_extended: 1.11 (math-verify 0.9's pin) joins boxes less than
# 10 characters apart, or differing ones with `and`/`or`/`,`/`;` anywhere in up to 70 characters between them;
# 1.0.6 (lighteval 0.13's pin) only when the text between them is nothing but one of `and`/`or`/`,`. Both cannot be
# installed in one venv, so under the `lighteval` extraction math-verify's normalize_latex gets the box's content cut
# by the 1.0.6 rule first (`_lighteval_boxed_content`, written from its documented behaviour). Everything else stays math-verify's own code.
_LE_SEPARATOR = re.compile(r"^\s*(?:and|or|,)\s*$")
_lighteval_rules = contextvars.ContextVar("reasonrl_lighteval_box_rule", default=False)


def _closing_brace(text: str, open_at: int) -> int | None:
    """Index of the `}` that closes the `{` at `open_at` (plain depth count, as the 1.0.6 rule counts), or None."""
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def _lighteval_boxed_content(text: str) -> str:
    """What latex2sympy2_extended 1.0.6 keeps of the boxes in `text` (mode "last"): the last box's content, joined
    (with `,`) with each earlier box whose gap to the next kept one is only `and`, `or` or `,`. A last box that does
    not open with a brace, or never closes, yields the rest of the text after `\\boxed`; no box: the text itself."""
    boxes = []  # (command start, content start, content end) of every closed box, in order
    for m in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        brace = m.end()
        close = _closing_brace(text, brace) if text.startswith("{", brace) else None
        boxes.append((m.start(), brace, None) if close is None else (m.start(), brace + 1, close))
    if not boxes:
        return text
    *earlier, (start, first, end) = boxes
    if end is None:
        return text[first:]
    kept = [text[first:end].strip()]
    for prev_start, prev_first, prev_end in reversed(earlier):
        if prev_end is None or prev_end >= start or not _LE_SEPARATOR.match(text[prev_end + 1:start]):
            break
        kept.append(text[prev_first:prev_end].strip())
        start = prev_start
    return ",".join(reversed(kept))


_normalize_latex = math_verify.parser.normalize_latex


def _normalize_latex_rule_aware(text: str, config: NormalizationConfig) -> str:
    if _lighteval_rules.get() and config.boxed == "last":
        return _normalize_latex(_lighteval_boxed_content(text), dataclasses.replace(config, boxed="none"))
    return _normalize_latex(text, config)


if math_verify.parser.normalize_latex is not _normalize_latex_rule_aware:  # installed once; a pass-through unless
    math_verify.parser.normalize_latex = _normalize_latex_rule_aware  # a `lighteval` parse is running


@contextlib.contextmanager
def _lighteval_box_rule():
    token = _lighteval_rules.set(True)
    try:
        yield
    finally:
        _lighteval_rules.reset(token)


def _parse_lighteval(text: str) -> list:
    """lighteval 0.13's extraction of one string (a gold or a response): MultilingualExtractiveMatchMetric with
    Metrics.pass_at_k_math's targets, fallback_mode first_match, extraction_mode any_match, on the stripped text."""
    with _lighteval_box_rule():
        return parse(text.strip(), LIGHTEVAL_METRIC_TARGETS, fallback_mode="first_match",
                     extraction_mode="any_match", parsing_timeout=5 if _timeouts() else None)  # type: ignore[arg-type]


def parse_answer(expr: str, extraction: Extraction = "last_box") -> list:
    """math-verify's parse of an extracted answer or a gold (`$...$`-wrapped, numbers normalised). Under
    `lighteval`, a gold as lighteval's MATH-500 task reads it: inside a box (its gold is "ANSWER: " + the solution,
    whose last box is the answer; a bare `3\\sqrt{13}` would be read as 3), with lighteval's targets, and the
    string itself when nothing parses (compared as a string, never vacuously true)."""
    if extraction == "lighteval":
        text = expr.strip() if "\\boxed" in expr else f"\\boxed{{{expr.strip()}}}"
        return _parse_lighteval(text) or ([expr.strip()] if expr.strip() else [])
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
    if extraction == "lighteval":
        parsed = _parse_lighteval(body)
        return parsed, (str(parsed[-1]) if parsed else None)
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

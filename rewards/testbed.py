"""The verbose-reasoner testbed's step language: how a worked solution's lines are written, and `count_steps`, which
reads any response back (a model's, possibly malformed) and counts its necessary and redundant steps.

Both live here, in the verifier layer, so the writer and the reader of a line format cannot drift apart, and so that
eval/ and rl/ (the generator, rl/data/testbed.py) can use them while rewards/ imports neither.

A problem is `What is A op B?` with op `+`, `-` (A >= B) or `*`. Its *necessary* steps, one line each:
  column sums       `Tens: 4 + 8 + 1 = 13, write 3, carry 1.`    (top digit + bottom digit + carry in)
  column differences `Tens: 4 - 1 - 8 + 10 = 5, borrow 1.`         (top - borrow in - bottom [+ 10 when it borrows])
  partial products  `Partial: 47 * 30 = 1410.`                     (A times one digit of B at its place value)
  sum of partials   `Sum: 376 + 1410 = 1786.`
and then the answer line `The answer is \\boxed{1786}.` (neither kind). *Redundant* steps have their own openings:
  restate      `Let me restate the problem: we need 47 * 38.`
  verify_step  `Wait, let me verify that step: 376 / 8 = 47.`      (the previous step undone by the inverse operation)
  other_route  `Wait, let me multiply in the other order: ...` / `... add in the other order: ...` /
               `Wait, let me check by adding back: ...`
  estimate     `Wait, let me estimate: 50 * 40 = 2000, close to 1786.`
  final_check  `Wait, let me do a final check: 47 * 38 = 1786. Yes.`
  repeat       a necessary step written a second time (same numbers)
  other_check  any other line opening with "Wait", "Let me check/verify/double-check", "Double-check", "Check:"
"""
from __future__ import annotations

import re

from rewards.registry import register

__all__ = ["COLUMNS", "REDUNDANT_KINDS", "parse_problem", "answer_of", "necessary_steps", "answer_line", "count_steps",
           "line_kinds", "is_testbed_row", "testbed_redundancy"]

COLUMNS = ("Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands", "Millions")
OPS = {"+": "+", "-": "-", "*": "*", "×": "*", "x": "*"}
REDUNDANT_KINDS = ("restate", "verify_step", "other_route", "estimate", "final_check", "repeat", "other_check")

_PROBLEM = re.compile(r"what is\s+(\d+)\s*([-+*×x])\s*(\d+)\s*\?", re.I)
_NUM = r"(-?\d+)"
_MUL = r"\s*[*×x]\s*"
_ADD_COL = re.compile(rf"^({'|'.join(COLUMNS)}):\s*(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)\s*=\s*(\d+),?\s*write\s+(\d+),?"
                      rf"\s*carry\s+(\d+)\.?$", re.I)
_SUB_COL = re.compile(rf"^({'|'.join(COLUMNS)}):\s*(\d+)\s*-\s*(\d+)\s*-\s*(\d+)(\s*\+\s*10)?\s*=\s*(\d+),?"
                      rf"\s*borrow\s+(\d+)\.?$", re.I)
_PARTIAL = re.compile(rf"^partial:\s*{_NUM}{_MUL}{_NUM}\s*=\s*{_NUM}\.?$", re.I)
_SUM = re.compile(rf"^sum:\s*(\d+(?:\s*\+\s*\d+)+)\s*=\s*{_NUM}\.?$", re.I)
# Redundant openings, tried in order (the first match names the kind).
_REDUNDANT = [
    ("restate", re.compile(r"^(let me|i will|i'll|first,? let me) restate\b", re.I)),
    ("verify_step", re.compile(r"^wait,?\s+let me verify (that|this) step\b", re.I)),
    ("other_route", re.compile(r"^wait,?\s+let me (add|multiply) in the other order\b|^wait,?\s+let me check by "
                               r"adding back\b", re.I)),
    ("estimate", re.compile(r"^wait,?\s+let me estimate\b", re.I)),
    ("final_check", re.compile(r"^(wait,?\s+let me do a )?final check\b", re.I)),
    ("other_check", re.compile(r"^(wait\b|let me (check|verify|double[- ]check|re-?check)\b|double[- ]check\b|"
                               r"check:)", re.I)),
]
_BULLET = re.compile(r"^\s*(?:[-*•]\s+|\d+[.)]\s+|step\s*\d+\s*[:.]\s*)", re.I)


def parse_problem(problem) -> tuple[int, str, int]:
    """(A, op, B) of a testbed problem: a row with a `testbed` dict ({"a", "op", "b"}), a row with `problem`, or the
    problem text itself. Raises ValueError for anything else."""
    if isinstance(problem, dict):
        tb = problem.get("testbed")
        if isinstance(tb, dict) and {"a", "op", "b"} <= set(tb):
            return int(tb["a"]), OPS[str(tb["op"])], int(tb["b"])
        problem = problem.get("problem", "")
    m = _PROBLEM.search(str(problem))
    if not m:
        raise ValueError(f"not a testbed problem: {str(problem)[:80]!r}")
    return int(m.group(1)), OPS[m.group(2)], int(m.group(3))


def _digits(n: int, width: int) -> list[int]:
    """Digits of n from the ones upwards, padded with zeros to `width`."""
    return [(n // 10 ** i) % 10 for i in range(width)]


def answer_of(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


# ----------------------------------------------------------------------------------------- necessary steps
# Each step is (line text, key, inverse): the key is what the counter compares (the numbers, not the spacing), the
# inverse is the arithmetic a `verify_step` line writes to undo it.

def necessary_steps(a: int, op: str, b: int) -> list[tuple[str, tuple, str]]:
    """The necessary steps of `a op b`, in order (the minimal solution is these lines plus `answer_line`)."""
    if op == "-" and a < b:
        raise ValueError(f"testbed subtractions have A >= B, got {a} - {b}")
    if op in "+-":
        width = max(len(str(a)), len(str(b)))
        steps, carry = [], 0
        for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
            if op == "+":
                s = x + y + carry
                line = f"{COLUMNS[i]}: {x} + {y} + {carry} = {s}, write {s % 10}, carry {s // 10}."
                steps.append((line, ("add", COLUMNS[i].lower(), x, y, carry, s, s % 10, s // 10),
                              f"{s} - {y} - {carry} = {x}"))
                carry = s // 10
            else:
                v = x - carry - y
                borrow = int(v < 0)
                d = v + 10 * borrow
                plus = " + 10" if borrow else ""
                line = f"{COLUMNS[i]}: {x} - {carry} - {y}{plus} = {d}, borrow {borrow}."
                steps.append((line, ("sub", COLUMNS[i].lower(), x, carry, y, bool(borrow), borrow, d),
                              f"{d} + {y} + {carry} = {x + 10 * borrow}"))
                carry = borrow
        return steps
    partials = []
    for i, d in enumerate(_digits(b, len(str(b)))):
        m, p = d * 10 ** i, a * d * 10 ** i
        inverse = f"{p} / {m} = {a}" if m else f"{a} * 0 = 0"
        partials.append((f"Partial: {a} * {m} = {p}.", ("partial", a, m, p), inverse))
    if len(partials) == 1:
        return partials
    terms = [k[3] for _, k, _ in partials]
    total = sum(terms)
    line = "Sum: " + " + ".join(map(str, terms)) + f" = {total}."
    return partials + [(line, ("sum", tuple(terms), total), f"{total} - {terms[-1]} = {total - terms[-1]}")]


def answer_line(a: int, op: str, b: int) -> str:
    return f"The answer is \\boxed{{{answer_of(a, op, b)}}}."


# ------------------------------------------------------------------------------------------------- counting

def _key(line: str) -> tuple | None:
    """The comparable content of a necessary-form line (None if the line is not of a necessary form)."""
    if m := _ADD_COL.match(line):
        return ("add", m.group(1).lower(), *map(int, m.group(2, 3, 4, 5, 6, 7)))
    if m := _SUB_COL.match(line):
        # Whether "+ 10" was written is kept apart from the stated borrow, so a line that adds 10 but says
        # "borrow 0" (or the reverse) matches no reference step.
        x, bin_, y, plus, d, borrow = m.groups()[1:]
        return ("sub", m.group(1).lower(), int(x), int(bin_), int(y), bool(plus), int(borrow), int(d))
    if m := _PARTIAL.match(line):
        return ("partial", *map(int, m.groups()))
    if m := _SUM.match(line):
        return ("sum", tuple(int(t) for t in re.split(r"\s*\+\s*", m.group(1).strip())), int(m.group(2)))
    return None


def _lines(response: str) -> list[str]:
    return [_BULLET.sub("", ln).strip() for ln in str(response).splitlines() if ln.strip()]


def line_kinds(response: str) -> list[str]:
    """One label per non-empty line: `answer` (holds a \\boxed{}), a redundant kind (repeats not told apart),
    `necessary:<add|sub|partial|sum>` or `other`: the shape of a solution, whatever its numbers."""
    out = []
    for line in _lines(response):
        key = None
        kind = "answer" if "\\boxed" in line or "\\fbox" in line else \
            next((name for name, rx in _REDUNDANT if rx.match(line)), None)
        if kind is None:
            key = _key(line)
        out.append(kind or (f"necessary:{key[0]}" if key else "other"))
    return out


def count_steps(problem, response: str) -> dict:
    """Count the steps of `response` to the testbed `problem` (a row or the problem text).

    Returns `necessary` (distinct lines of a necessary form), `necessary_correct` (those equal to a step of the
    reference solution), `necessary_expected` (the reference's steps), `necessary_missing` (reference steps not
    written correctly), `redundant` (lines of a redundant form, repeats of a necessary line included),
    `redundant_kinds` ({kind: count}), `other_lines` (non-empty lines of no known form, the answer line excluded),
    `answer_lines` (lines with a \\boxed{}), `redundancy_rate` = redundant / (necessary + redundant) (0.0 when both
    are 0) and `correct` (the last boxed value equals the answer, as an integer).
    """
    a, op, b = parse_problem(problem)
    reference = [k for _, k, _ in necessary_steps(a, op, b)]
    remaining = list(reference)
    seen: set = set()
    necessary = correct = other = answers = 0
    kinds: dict[str, int] = {}
    last_box = None
    for line in _lines(response):
        if "\\boxed" in line or "\\fbox" in line:
            answers += 1
            boxes = re.findall(r"\\(?:boxed|fbox)\s*\{([^{}]*)\}", line)
            last_box = boxes[-1] if boxes else last_box
            continue
        kind = next((name for name, rx in _REDUNDANT if rx.match(line)), None)
        if kind is None:
            key = _key(line)
            if key is None:
                other += 1
                continue
            if key in seen:
                kind = "repeat"
            else:
                seen.add(key)
                necessary += 1
                if key in remaining:
                    remaining.remove(key)
                    correct += 1
                continue
        kinds[kind] = kinds.get(kind, 0) + 1
    redundant = sum(kinds.values())
    try:
        right = last_box is not None and int(last_box.strip().strip("$").replace(",", "")) == answer_of(a, op, b)
    except ValueError:
        right = False
    return {"necessary": necessary, "necessary_correct": correct, "necessary_expected": len(reference),
            "necessary_missing": len(remaining), "redundant": redundant, "redundant_kinds": kinds,
            "other_lines": other, "answer_lines": answers,
            "redundancy_rate": redundant / (necessary + redundant) if necessary + redundant else 0.0,
            "correct": bool(right)}


def is_testbed_row(row: dict) -> bool:
    """Rows the generator wrote carry a `testbed` dict with the operands."""
    tb = row.get("testbed") if isinstance(row, dict) else None
    return isinstance(tb, dict) and {"a", "op", "b"} <= set(tb)


@register("testbed_redundancy")
def testbed_redundancy(prompts, completions, testbed=None, **kwargs) -> list[float | None]:
    """Per-response redundancy rate on testbed rows (None where a row is not a testbed problem): a metric, not a
    reward. List it with weight 0 and training logs `reward/testbed_redundancy` per step at the cost of a regex pass.
    """
    rows = testbed if testbed is not None else [None] * len(completions)
    out: list[float | None] = []
    for completion, tb in zip(completions, rows, strict=True):
        text = completion[-1].get("content", "") if isinstance(completion, list) and completion else completion
        try:
            out.append(float(count_steps({"testbed": tb}, str(text))["redundancy_rate"]) if tb else None)
        except (ValueError, KeyError):
            out.append(None)
    return out

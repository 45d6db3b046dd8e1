"""The verbose-reasoner testbed: generated arithmetic whose worked solutions hold the necessary steps plus redundant
ones, with known ground truth for both (the line formats and the counter: rewards/testbed.py).

Purpose: SFT a small model on these solutions so it starts verbose and about half right, then see whether an RL
method (GRPO, FGO, length penalties) removes the redundant steps rather than the necessary ones (`count_steps` tells,
per response, how many of each it wrote).

Verbosity is the *mode* of the SFT data, not an option. Greedy decoding follows the likeliest continuation at each
decision point, so if every redundant step were individually rare (0-3 checks drawn uniformly over many slots), "no
check here" would win at every slot and greedy output would hold none; a probe showed exactly that. So each kind of
redundant step has its own slot and inclusion probability (KIND_PROBS), three of them above 0.5 (restate, other
route, final check: what greedy should keep), the others below (what sampling varies); the draw is then conditioned
on 1..k redundant steps in all, so every SFT solution has at least one and the count and kinds vary. The end checks
share the opening "Wait, let me", so after the last necessary step greedy first picks "a check" over the answer
line. `modal_path` computes the line-by-line argmax path over the SFT solutions (testbed.json `sft_modal_path`): at
the defaults restate, the four column steps, other route, estimate, final check, answer.

Difficulty (the operations and digit counts of DIFFICULTIES): 0 is the probe's 3-digit sums (87.5% greedy after a
small SFT: too easy, column steps are one-digit facts); 3, 2-digit x 2-digit products with partial products, makes
the model memorise 2-digit x 1-digit facts, which a short SFT does not (21% held-out after 112 steps). The default 1,
4-digit sums and differences column by column, with 4-6 redundant steps, lands the SFT'd SmolLM2 at 48% held-out
with responses 2.05x the minimal length (docs/results.md has the calibration).

Version 2 (`reasonrl testbed --v2`, for the tiny reasoner of rl/data/reasoner.py): 3-digit sums, and every slot is
drawn on its own with the probabilities of KIND_PROBS_V2, not conditioned on a count. A solution then holds 0-7
redundant steps; the modal path keeps the three likely ones (restate, other route, final check), while about 40% of
the solutions hold fewer: a policy that samples like its SFT data often writes a correct answer shorter than its
greedy one, which is what a compression method needs to select. v1 stays the default and reproduces as before.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from rewards.testbed import REDUNDANT_KINDS, answer_line, answer_of, line_kinds, necessary_steps
from rl.data.loading import DataError
from rl.store.atomic import write_atomic

# difficulty -> [(op, digits of A, digits of B)]; a level with several entries draws them equally often.
DIFFICULTIES: dict[int, list[tuple[str, int, int]]] = {
    0: [("+", 3, 3)],
    1: [("+", 4, 4), ("-", 4, 4)],
    2: [("+", 5, 5), ("-", 5, 5)],
    3: [("*", 2, 2)],
    4: [("*", 3, 2)],
}
DEFAULT_DIFFICULTY = 1  # the calibrated one (docs/results.md): SFT'd SmolLM2 starts at 48% held-out
# 4-6 redundant steps per SFT solution: the column steps of a 4-digit sum are long, so fewer would leave the SFT
# solutions under twice the minimal length (1-4: 1.7x, 3-5: 1.9x, 4-6: 2.1x on the SmolLM2 tokenizer).
DEFAULT_MIN_REDUNDANT, DEFAULT_MAX_REDUNDANT = 4, 6
# Inclusion probability of each redundant kind in its slot (verify_step: after each necessary step).
KIND_PROBS = {"restate": 0.7, "verify_step": 0.2, "other_route": 0.65, "estimate": 0.35, "final_check": 0.7}
# Version 2: every slot independent. 3 of the 7 slots are likely (the greedy path), P(fewer than 3) = 0.40.
KIND_PROBS_V2 = {"restate": 0.75, "verify_step": 0.1, "other_route": 0.7, "estimate": 0.25, "final_check": 0.75}
V2 = dict(difficulty=0, min_redundant=0, max_redundant=7, probs=KIND_PROBS_V2, independent=True)
V2_SYSTEM_PROMPT = "Solve step by step."  # short: the reasoner's prompt tokens are part of every sequence
END_KINDS = ("other_route", "estimate", "final_check")  # written in this order after the last necessary step
_ENUMERATE_LIMIT = 200_000


# ------------------------------------------------------------------------------------------------ problems

def _canonical(op: str, a: int, b: int) -> tuple:
    # 47 * 38 and 38 * 47 are one fact (and each one's other-route check writes the other's steps), so the splits
    # are disjoint on the unordered pair for + and *.
    return (op, *sorted((a, b))) if op in "+*" else (op, a, b)


def _ordered(op: str, a: int, b: int) -> tuple[int, int]:
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def space_size(difficulty: int) -> int:
    """How many distinct (canonical) problems a difficulty has."""
    total = 0
    for op, da, db in DIFFICULTIES[difficulty]:
        na, nb = 9 * 10 ** (da - 1), 9 * 10 ** (db - 1)
        total += na * (na + 1) // 2 if da == db else na * nb
    return total


def sample_problems(difficulty: int, n: int, seed: int) -> list[tuple[int, str, int]]:
    """`n` distinct problems (A, op, B) in a seeded random order; A >= B for subtraction."""
    if difficulty not in DIFFICULTIES:
        raise DataError(f"testbed difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    space = space_size(difficulty)
    if n > space:
        raise DataError(f"testbed difficulty {difficulty} has only {space} distinct problems (commuted pairs count "
                        f"once), but {n} were requested; lower the sizes or use another difficulty")
    rng = np.random.default_rng([int(seed) & (2**64 - 1), difficulty, 0x7E5])
    kinds = DIFFICULTIES[difficulty]
    if space <= _ENUMERATE_LIMIT:
        ranges = [(op, range(10 ** (da - 1), 10 ** da), range(10 ** (db - 1), 10 ** db)) for op, da, db in kinds]
        every = sorted({_canonical(op, a, b) for op, ra, rb in ranges for a, b in itertools.product(ra, rb)})
        picked = [every[i] for i in rng.permutation(len(every))[:n]]
    else:
        seen: dict[tuple, None] = {}
        while len(seen) < n:
            op, da, db = kinds[int(rng.integers(len(kinds)))]
            a, b = int(rng.integers(10 ** (da - 1), 10 ** da)), int(rng.integers(10 ** (db - 1), 10 ** db))
            seen.setdefault(_canonical(op, a, b))
        picked = list(seen)
    out = []
    for op, x, y in picked:
        if op == "*" and len(str(x)) != len(str(y)):
            x, y = max(x, y), min(x, y)  # 3-digit x 2-digit: the longer number is A (one partial per digit of B)
        elif op in "+*" and rng.random() < 0.5:
            x, y = y, x  # same-length factors: either order is shown (the split already holds one of them)
        a, b = _ordered(op, x, y)
        out.append((a, op, b))
    return out


def problem_text(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


# ----------------------------------------------------------------------------------------- redundant steps
# Their openings are the ones rewards/testbed.py recognises (tests/test_testbed.py checks every writer against it).

def _round1(n: int) -> int:
    """n rounded to one significant figure (half up)."""
    p = 10 ** (len(str(abs(n))) - 1)
    return (abs(n) + p // 2) // p * p * (1 if n >= 0 else -1)


def redundant_line(kind: str, a: int, op: str, b: int, inverse: str = "") -> str:
    ans = answer_of(a, op, b)
    if kind == "restate":
        return f"Let me restate the problem: we need {a} {op} {b}."
    if kind == "verify_step":
        return f"Wait, let me verify that step: {inverse}."
    if kind == "other_route":
        if op == "+":
            return f"Wait, let me add in the other order: {b} + {a} = {ans}."
        if op == "-":
            return f"Wait, let me check by adding back: {ans} + {b} = {a}."
        places = [int(d) * 10 ** i for i, d in enumerate(reversed(str(a)))]  # B times each digit of A
        return (f"Wait, let me multiply in the other order: {b} * {a} = " + " + ".join(f"{b} * {m}" for m in places)
                + " = " + " + ".join(str(b * m) for m in places) + f" = {ans}.")
    if kind == "estimate":
        ra, rb = _round1(a), _round1(b)
        return f"Wait, let me estimate: {ra} {op} {rb} = {answer_of(ra, op, rb)}, so {ans} is plausible."
    if kind == "final_check":
        return f"Wait, let me do a final check: {a} {op} {b} = {ans}. Yes."
    raise ValueError(f"unknown redundant kind {kind!r}")


def minimal_solution(a: int, op: str, b: int) -> str:
    """The necessary steps and the answer line: the solution with zero redundant steps."""
    return "\n".join([line for line, _, _ in necessary_steps(a, op, b)] + [answer_line(a, op, b)])


def verbose_solution(a: int, op: str, b: int, rng: np.random.Generator, max_redundant: int, min_redundant: int = 1,
                     probs: dict[str, float] = KIND_PROBS, independent: bool = False) -> tuple[str, list[str]]:
    """A worked solution with between min_redundant and max_redundant redundant steps; returns (text, kinds used).

    Each slot (restate first, a verify after each necessary step, the end checks) is included with its kind's
    probability, and the draw is repeated until the count is in range: the count and kinds vary while the likely
    kinds stay likely (the module docstring says why that keeps greedy decoding verbose). independent: one draw,
    the slots independent of each other (version 2; the count range is then not enforced)."""
    steps = necessary_steps(a, op, b)
    slots = ["restate"] + ["verify_step"] * len(steps) + list(END_KINDS)
    lo, hi = max(0, min_redundant), min(max_redundant, len(slots))
    if lo > hi:
        raise DataError(f"testbed: min_redundant {min_redundant} > max_redundant {max_redundant}")
    p = np.array([probs[k] for k in slots])
    for _ in range(1 if independent else 10_000):
        mask = rng.random(len(slots)) < p
        if independent or lo <= int(mask.sum()) <= hi:
            break
    else:  # only with extreme probabilities: take the likeliest slots instead
        mask = np.zeros(len(slots), dtype=bool)
        mask[np.argsort(-p, kind="stable")[:lo]] = True
    lines = [redundant_line("restate", a, op, b)] if mask[0] else []
    for i, (line, _, inverse) in enumerate(steps):
        lines.append(line)
        if mask[1 + i]:
            lines.append(redundant_line("verify_step", a, op, b, inverse))
    for j, kind in enumerate(END_KINDS):
        if mask[1 + len(steps) + j]:
            lines.append(redundant_line(kind, a, op, b))
    lines.append(answer_line(a, op, b))
    return "\n".join(lines), [k for k, m in zip(slots, mask) if m]


def modal_path(completions: list[str]) -> list[tuple[str, float]]:
    """The solution shape a perfectly fitted model would decode greedily, line by line: from the empty prefix, the
    likeliest next line kind among the solutions sharing the prefix so far, with its share (ties: first seen).
    Its redundant kinds are what greedy decoding keeps after SFT (testbed.json `sft_modal_path`)."""
    shapes = [line_kinds(c) for c in completions]
    path: list[tuple[str, float]] = []
    while True:
        prefix = [k for k, _ in path]
        nxt: dict[str, int] = {}
        for s in shapes:
            if len(s) > len(prefix) and s[:len(prefix)] == prefix:
                nxt[s[len(prefix)]] = nxt.get(s[len(prefix)], 0) + 1
        if not nxt:
            return path
        kind = max(nxt, key=nxt.get)
        path.append((kind, nxt[kind] / sum(nxt.values())))
        if kind == "answer":
            return path


# ------------------------------------------------------------------------------------------------ the files

def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    # Response tokens as training and eval count them: the text's tokens plus the EOS that ends it.
    if not texts:
        return []
    return [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _stats(xs) -> dict:
    xs = np.asarray(list(xs), dtype=float)
    if not len(xs):
        return {"n": 0}
    return {"n": int(len(xs)), "mean": float(xs.mean()), "median": float(np.median(xs)), "min": float(xs.min()),
            "max": float(xs.max())}


def _fewer_than_modal(counts: list[int], completions: list[str]) -> float | None:
    if not counts:
        return None
    modal = sum(1 for k, _ in modal_path(completions) if k in REDUNDANT_KINDS)
    return float(np.mean([c < modal for c in counts]))


def problem_row(split: str, i: int, a: int, op: str, b: int, difficulty: int, minimal_tokens: int) -> dict:
    return {"id": f"testbed-{split}-{i}", "problem": problem_text(a, op, b), "answer": str(answer_of(a, op, b)),
            "testbed": {"a": a, "op": op, "b": b, "difficulty": difficulty},
            "necessary_steps": len(necessary_steps(a, op, b)), "minimal_tokens": minimal_tokens}


def generate(out: str | Path, tokenizer, *, seed: int = 0, difficulty: int = DEFAULT_DIFFICULTY, sft: int = 2800,
             train: int = 1000, heldout: int = 200, max_redundant: int = DEFAULT_MAX_REDUNDANT,
             min_redundant: int = DEFAULT_MIN_REDUNDANT, probs: dict[str, float] = KIND_PROBS,
             independent: bool = False, reasoner: dict | None = None) -> dict:
    """Write `sft.jsonl` (prompt, completion), `train.jsonl` and `heldout.jsonl` (id, problem, answer, testbed,
    necessary_steps, minimal_tokens) and `testbed.json` (the settings and measured token statistics) into `out`.

    The three splits are disjoint (commuted pairs included) and fixed by (seed, difficulty, sizes). An SFT `prompt`
    is the problem text, as in the RL files: `algorithm.name: sft` (rl/data/sft.py) renders it through the chat template
    with the config's data.system_prompt exactly as RL renders a problem, so one config's data section serves SFT,
    RL and eval alike. `tokenizer` (the model to fine-tune) counts minimal_tokens. Returns the testbed.json content.

    reasoner: {"width", "layers"} to build the tiny reasoner (rl/data/reasoner.py) into `out/reasoner`, its
    vocabulary taken from these files; it is then the tokenizer that counts (pass tokenizer=None)."""
    if min(sft, train, heldout) < 0 or max_redundant < 0:
        raise DataError("testbed sizes and --max-redundant must be >= 0")
    problems = sample_problems(difficulty, sft + train + heldout, seed)
    splits = {"sft": problems[:sft], "train": problems[sft:sft + train], "heldout": problems[sft + train:]}
    rng = np.random.default_rng([int(seed) & (2**64 - 1), difficulty, 0x501])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sft_rows, kinds, counts = [], {}, []
    for a, op, b in splits["sft"]:
        text, used = verbose_solution(a, op, b, rng, max_redundant, min_redundant, probs, independent)
        sft_rows.append({"prompt": problem_text(a, op, b), "completion": text})
        counts.append(len(used))
        for k in used:
            kinds[k] = kinds.get(k, 0) + 1
    reasoner_summary = None
    if reasoner is not None:
        from rl.data.reasoner import build_reasoner, load_reasoner_tokenizer

        every = [problem_text(*p) for p in problems] + [r["completion"] for r in sft_rows]
        # Every digit with and without its space, so any number a sampled response writes has tokens.
        every += [V2_SYSTEM_PROMPT, " ".join("0123456789") + "0123456789"]
        reasoner_summary = build_reasoner(out / "reasoner", every, **reasoner)
        tokenizer = load_reasoner_tokenizer(out / "reasoner")
    minimal = {name: _token_counts(tokenizer, [minimal_solution(*p) for p in ps]) for name, ps in splits.items()}
    verbose = _token_counts(tokenizer, [r["completion"] for r in sft_rows])
    write_atomic(out / "sft.jsonl", "".join(json.dumps(r) + "\n" for r in sft_rows))
    for name in ("train", "heldout"):
        rows = [problem_row(name, i, a, op, b, difficulty, m)
                for i, ((a, op, b), m) in enumerate(zip(splits[name], minimal[name]))]
        write_atomic(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    ratio = [v / m for v, m in zip(verbose, minimal["sft"])]
    summary = {
        "settings": {"seed": seed, "difficulty": difficulty, "operations": DIFFICULTIES[difficulty],
                     "sft": sft, "train": train, "heldout": heldout, "max_redundant": max_redundant,
                     "min_redundant": min_redundant, "kind_probs": probs, "independent": independent,
                     "tokenizer": getattr(tokenizer, "name_or_path", None)},
        "space": space_size(difficulty),
        "tokens": {"minimal": _stats(minimal["sft"] + minimal["train"] + minimal["heldout"]),
                   "sft_completion": _stats(verbose), "sft_over_minimal": _stats(ratio),
                   "sft_at_least_twice_minimal": float(np.mean([r >= 2 for r in ratio])) if ratio else None},
        "sft_redundant_steps": {"distribution": {str(k): counts.count(k) for k in sorted(set(counts))},
                                "kinds": kinds, "mean": float(np.mean(counts)) if counts else None},
        "sft_modal_path": [[k, round(p, 3)] for k, p in modal_path([r["completion"] for r in sft_rows])],
        # The share of SFT solutions with fewer redundant steps than the modal (greedy) path: what sampling offers
        # a compression method to select.
        "sft_fewer_redundant_than_modal": _fewer_than_modal(counts, [r["completion"] for r in sft_rows]),
        "files": ["sft.jsonl", "train.jsonl", "heldout.jsonl"],
    }
    if reasoner_summary is not None:
        summary["reasoner"] = {**reasoner_summary, "folder": "reasoner"}
    write_atomic(out / "testbed.json", json.dumps(summary, indent=2) + "\n")
    return summary


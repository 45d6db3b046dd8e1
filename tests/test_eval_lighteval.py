"""The `lighteval` grading (issue 27): lighteval 0.13's math metric rebuilt from math-verify's parse/verify with
lighteval's settings (rewards/answers.py), and, where lighteval is installed, the cross-check against lighteval's own
metric on the saved responses of a small eval (bench/lighteval_crosscheck.py).

lighteval 0.13 cannot be installed beside reasonrl (it pins latex2sympy2_extended 1.0.6, math-verify 0.9 needs
1.11), so it is no test extra: the cross-check test looks for a venv that has it ($REASONRL_LIGHTEVAL_PYTHON, else
/tmp/lighteval-venv/bin/python, the one bench/lighteval_crosscheck.py's docstring installs) and is skipped without.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import math_verify.parser as math_verify_parser
import pytest

from eval.benchmarks import load_benchmark
from eval.rescore import rescore
from eval.runner import EvalSettings
from rewards.answers import _lighteval_boxed_content, split_think
from rewards.math import math_verify
from tests.shared_data import DATA, needs_shared_data

ROOT = Path(__file__).resolve().parents[1]


def grade(texts, gold, **kwargs):
    return math_verify(None, texts, [gold] * len(texts), **kwargs)


def test_boxes_are_kept_together_only_as_lighteval_s_latex2sympy_keeps_them():
    """lighteval 0.13 (latex2sympy2_extended 1.0.6) keeps an earlier box only when nothing but `,`/and/or stands
    between it and the last one; math-verify 0.9 (1.11) also joins boxes a few words apart."""
    assert _lighteval_boxed_content(r"\boxed{0} or rather \boxed{5}") == "5"
    assert _lighteval_boxed_content(r"\boxed{2}, \boxed{3}") == "2,3"
    assert _lighteval_boxed_content(r"\boxed{2} and \boxed{3}") == "2,3"
    assert _lighteval_boxed_content(r"First \boxed{3}, no: \boxed{\frac{14}{3}}") == r"\frac{14}{3}"
    assert _lighteval_boxed_content(r"cut \boxed{\frac{1}{") == r"{\frac{1}{"  # unbalanced: the rest, as 1.0.6
    assert _lighteval_boxed_content("no box") == "no box"
    cases = [  # (response, gold, math_verify extraction, lighteval extraction)
        (r"\boxed{0} or rather \boxed{5}", "5", 0.0, 1.0),
        (r"First \boxed{3}, no: \boxed{\frac{14}{3}}", r"\frac{14}{3}", 0.0, 1.0),
        (r"\boxed{2} and \boxed{3}", "2, 3", 1.0, 1.0),
        ("the final answer is 42", "42", 1.0, 1.0),
    ]
    for text, gold, joined, last in cases:
        assert grade([text], gold, extraction="math_verify") == [joined], text
        assert grade([text], gold, extraction="lighteval") == [last], text
    # The 1.0.6 rule is switched on only inside a lighteval parse: math-verify's own function otherwise.
    assert grade([r"\boxed{0} or rather \boxed{5}"], "0, 5", extraction="math_verify") == [1.0]
    assert math_verify_parser.normalize_latex.__name__ == "_normalize_latex_rule_aware"


def test_golds_are_read_as_lighteval_s_math500_task_reads_them():
    """lighteval's MATH-500 gold is "ANSWER: " + the solution, i.e. the boxed answer; a bare `3\\sqrt{13}` would be
    read as 3 by lighteval's targets. A gold that does not parse is compared as a string (never vacuously true)."""
    assert grade([r"\boxed{3\sqrt{13}}", r"\boxed{3}"], r"3\sqrt{13}", extraction="lighteval") == [1.0, 0.0]
    assert grade([r"\boxed{10,080}", r"\boxed{10080}"], r"10,\!080", extraction="lighteval") == [1.0, 1.0]
    assert grade([r"\boxed{@@}", r"\boxed{##}"], "@@", extraction="lighteval") == [1.0, 0.0]
    assert grade([""], "", extraction="lighteval") == [0.0]


def test_think_tags_are_cut_as_lighteval_s_pipeline_cuts_them():
    assert split_think("a<think>x</think>b<think>y</think>c", "tags") == "abc"
    assert split_think(r"draft \boxed{7}</think> \boxed{6}", "tags") == r"draft \boxed{7}</think> \boxed{6}"
    assert split_think("a<think>unfinished", "tags") == "a<think>unfinished"
    text = r"<think>so \boxed{7}.</think> The answer is \boxed{6}."
    assert grade([text], "6", extraction="lighteval", think="tags") == [1.0]
    assert grade([text], "7", extraction="lighteval", think="tags") == [0.0]


def _lighteval_python() -> str | None:
    for candidate in (os.environ.get("REASONRL_LIGHTEVAL_PYTHON"), "/tmp/lighteval-venv/bin/python"):
        if candidate and Path(candidate).is_file() and subprocess.run(
                [candidate, "-c", "import lighteval.metrics.metrics"], capture_output=True).returncode == 0:
            return candidate
    return None


LIGHTEVAL_PYTHON = _lighteval_python()


@needs_shared_data
@pytest.mark.skipif(LIGHTEVAL_PYTHON is None, reason="lighteval 0.13 is not installed (it cannot share reasonrl's "
                    "venv): set REASONRL_LIGHTEVAL_PYTHON to a venv's python that has it, see "
                    "bench/lighteval_crosscheck.py")
def test_verdicts_equal_lighteval_s_own_metric_on_the_saved_responses_of_a_small_eval(tmp_path):
    """A small lighteval-protocol eval folder (5 responses each, written in the forms models write them, on the
    first 6 MATH-500 and 3 AIME24 problems), rescored here; lighteval's own metric, run in its venv on the same saved responses, gives
    the same verdict for each but the one known case (a wrong `\\text{Evelyn}1`, which lighteval 0.13's grader
    simplifies to Evelyn: listed in docs/results.md)."""
    folder = tmp_path / "eval"
    (folder / "samples").mkdir(parents=True)
    benchmarks = {"math500": load_benchmark("math500", DATA, 6)[0], "aime24": load_benchmark("aime24", DATA, 3)[0]}
    assert "test/algebra/1349.json" in [r["id"] for r in benchmarks["math500"]]  # the known case (docstring)
    meta = {"model": "m", "seed": 0, "verifier": "math_verify", "benchmarks": {b: {} for b in benchmarks},
            **dataclasses.asdict(EvalSettings.from_protocol("lighteval", samples_per_benchmark={}))}
    (folder / "eval_config.json").write_text(json.dumps(meta))
    for name, rows in benchmarks.items():
        records = []
        for r in rows:
            g = r["answer"]
            texts = [f"Therefore, the final answer is: $\\boxed{{{g}}}$. I hope it is correct",
                     f"<think>Maybe \\boxed{{0}}.</think> ANSWER: {g}", "The answer is \\boxed{" + g + "1}.",
                     f"\\boxed{{0}} or rather \\boxed{{{g}}}", f"\\boxed{{{g}}}, \\boxed{{0}}"]
            records += [{"problem_id": r["id"], "sample": i, "answer": g, "completion": t, "tokens": 9,
                         "finish_reason": "stop", "correct": False} for i, t in enumerate(texts)]
        (folder / "samples" / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    rescore(folder, timeout=120)
    out = tmp_path / "pairs.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "lighteval_crosscheck.py"), "--samples", str(folder), "--data-dir",
                           str(DATA), "--lighteval-python", LIGHTEVAL_PYTHON, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    rows = json.loads(out.read_text())
    assert len(rows) == 9 * 5 and proc.returncode == 1, proc.stdout + proc.stderr
    assert all(r["saved"] == bool(r["ours"]) for r in rows)  # the rescored folder holds our verdicts
    assert [(r["problem_id"], r["ours"], r["lighteval"]) for r in rows if r["ours"] != r["lighteval"]] == [
        ("test/algebra/1349.json", 0.0, 1.0)]
    assert 0 < sum(r["lighteval"] for r in rows) < len(rows)

"""The eval's verifier is the training reward (`rewards.resolve("math_verify")`); these are its verdicts on real
MATH500 gold answers, read from the shared data folder: equivalent forms pass, near misses fail."""
import json

import pytest

from eval.benchmarks import load_benchmark
from eval.runner import VERIFIER
from rewards import resolve
from tests.shared_data import DATA, needs_shared_data


CASES = {  # MATH500 problem id -> (responses that must be correct, responses that must be wrong)
    "test/algebra/2584.json": ([r"\boxed{14/3}", r"\boxed{\dfrac{14}{3}}", r"\boxed{4\frac{2}{3}}"],  # fractions
                               [r"\boxed{\frac{3}{14}}", r"\boxed{4.6667}"]),
    "test/precalculus/807.json": ([r"\boxed{(3, \frac{\pi}{2})}", r"\boxed{\left(3,\pi/2\right)}"],  # tuples
                                  [r"\boxed{(3, \pi)}"]),
    "test/precalculus/927.json": ([r"\boxed{90}", r"\boxed{90^\circ}", r"\boxed{90^{\circ}}", r"\boxed{90 degrees}"],
                                  [r"\boxed{45}", r"\boxed{\frac{\pi}{2}}"]),  # degrees are not radians
    "test/prealgebra/1003.json": ([r"\boxed{\frac{270}{7}}", r"\boxed{\frac{270}{7}\text{ degrees}}"],
                                  [r"\boxed{38.57}"]),
    "test/algebra/1349.json": ([r"\boxed{Evelyn}", r"\boxed{\text{Evelyn}}", r"\boxed{\textbf{Evelyn}}"],  # text
                               [r"\boxed{Angela}"]),
    "test/prealgebra/105.json": ([r"\boxed{east}", r"\boxed{\text{East}}"], [r"\boxed{west}"]),
    "test/intermediate_algebra/558.json": ([r"\boxed{(3,4]}", r"\boxed{(3, 4]}"],  # intervals: ends matter
                                           [r"\boxed{[3,4]}", r"\boxed{(3,4)}"]),
    "test/intermediate_algebra/1992.json": ([r"\boxed{(0,9)\cup(9,36)}", r"\boxed{(9,36) \cup (0,9)}"],
                                            [r"\boxed{(0,36)}"]),
    "test/algebra/2043.json": ([r"\boxed{(-\infty,2)\cup(3,\infty)}"], [r"\boxed{(-\infty, 2]\cup(3,\infty)}"]),
    "test/algebra/2036.json": ([r"\boxed{\sqrt{117}}", r"\boxed{3\sqrt{13}}"], [r"\boxed{3\sqrt{12}}"]),
}


@pytest.fixture(scope="module")
def gold():
    rows, _ = load_benchmark("math500", DATA)
    return {r["id"]: r["answer"] for r in rows}


@needs_shared_data
@pytest.mark.parametrize("pid", sorted(CASES))
def test_math500_equivalences(gold, pid):
    verify = resolve(VERIFIER)
    right, wrong = CASES[pid]
    responses = [f"Working it out, the answer is {r}." for r in right + wrong]
    scores = verify([""] * len(responses), responses, answer=[gold[pid]] * len(responses))
    assert scores == [1.0] * len(right) + [0.0] * len(wrong), (gold[pid], list(zip(right + wrong, scores)))


@needs_shared_data
def test_only_the_last_box_counts_and_an_unboxed_answer_is_wrong(gold):
    verify = resolve(VERIFIER)
    answer = gold["test/algebra/2584.json"]  # 14/3
    responses = [r"First \boxed{3} but no: \boxed{\frac{14}{3}}", r"\boxed{\frac{14}{3}}, no wait, \boxed{3}",
                 r"The answer is 14/3."]
    assert verify([""] * 3, responses, answer=[answer] * 3) == [1.0, 0.0, 0.0]


@needs_shared_data
def test_every_math500_gold_answer_verifies_against_itself():
    """No gold answer is unparseable (it would score every response 0 and make the benchmark harder than it is)."""
    rows = [json.loads(line) for line in (DATA / "math500.jsonl").read_text().splitlines()]
    verify = resolve(VERIFIER)
    scores = verify([""] * len(rows), [f"\\boxed{{{r['answer']}}}" for r in rows], answer=[r["answer"] for r in rows])
    failing = [r["answer"] for r, s in zip(rows, scores) if s != 1.0]
    assert failing == []

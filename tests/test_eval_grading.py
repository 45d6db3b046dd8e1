"""Grading against every benchmark file in shared/data (issue 27): each gold, boxed, is right against itself under
both extraction modes; hand-written right and wrong answers per benchmark (e-notation, Python-expression golds,
multi-answer golds, units, thousands separators); the two extraction modes and `</think>` splitting; maj@k votes by
equivalence. math-verify runs for real (this process's main thread)."""
import pytest

from eval.benchmarks import BENCHMARKS, load_benchmark
from eval.metrics import majority_correct
from rewards.answers import normalize_gold, same_answer
from rewards.math import math_verify
from tests.shared_data import DATA, needs_shared_data

MODES = ("last_box", "math_verify")


@pytest.fixture(scope="module")
def golds():
    return {name: {r["id"]: r["answer"] for r in load_benchmark(name, DATA)[0]} for name in BENCHMARKS}


@needs_shared_data
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_gold_boxed_scores_correct_against_itself(golds, name):
    answers = list(golds[name].values())
    for mode in MODES:
        scores = math_verify(None, [f"The answer is $\\boxed{{{g}}}$." for g in answers], answers, extraction=mode)
        assert [g for g, s in zip(answers, scores) if s != 1.0] == [], mode


# benchmark -> problem id -> (responses that must score 1, responses that must score 0), under both modes.
CASES = {
    "minerva": {
        "minerva-1": ([r"\boxed{4.5\times10^{33}}", r"\boxed{4.5 \times 10^{33}}", r"\boxed{4.5\cdot10^{33}}",
                       r"\boxed{45 \times 10^{32}}"],  # gold 4.5e33 (it parsed as 4.5*e*33)
                      [r"\boxed{4.5}", r"\boxed{4.5\times10^{32}}", r"\boxed{4.4\times10^{33}}"]),
        "minerva-38": ([r"\boxed{-1/3}", r"\boxed{-\frac{1}{3}}", r"\boxed{-0.333333}"],  # gold -1./3
                       [r"\boxed{-1}", r"\boxed{1/3}", r"\boxed{-0.33}"]),
        "minerva-49": ([r"\boxed{-3/2}", r"\boxed{-1.5}"], [r"\boxed{-3}", r"\boxed{3/2}"]),  # gold -3./2
        "minerva-5": ([r"\boxed{\arcsin(10/13)}", r"\boxed{\sin^{-1}\left(\frac{10}{13}\right)}"],  # np.arcsin(10/13)
                      [r"\boxed{\arcsin(13/10)}", r"\boxed{\arccos(10/13)}"]),
        "minerva-44": ([r"\boxed{10^{-5}}", r"\boxed{1\times10^{-5}}", r"\boxed{0.00001}"],  # gold 1e-5
                       [r"\boxed{10^{5}}", r"\boxed{10^{-4}}"]),
        "minerva-50": ([r"\boxed{2.7778\times10^{-6}}"], [r"\boxed{2.7778\times10^{6}}", r"\boxed{2.7778}"]),
        "minerva-201": ([r"\boxed{361}", r"\boxed{3.61\times10^{2}}"], [r"\boxed{3.61}", r"\boxed{36.1}"]),
        "minerva-67": ([r"\boxed{1+\sqrt{3} i}", r"\boxed{1+i\sqrt{3}}"], [r"\boxed{1-\sqrt{3} i}"]),
        "minerva-111": ([r"\boxed{\frac{1}{s+a}}", r"\boxed{1/(a+s)}"], [r"\boxed{\frac{1}{s-a}}"]),
        "minerva-121": ([r"\boxed{0.1}", r"\boxed{0.10}"], [r"\boxed{0.01}"]),
        "minerva-148": ([r"\boxed{2}", r"\boxed{+2}"], [r"\boxed{-2}"]),
        # A multi-answer symbolic gold: math-verify cannot parse `E_{1},E_{2}` and compares it as a string, so
        # only the literal form matches (`E_1, E_2` scores 0: a known miss, README "Grading").
        "minerva-269": ([r"\boxed{E_{1},E_{2}}"], [r"\boxed{E_{1}}", r"\boxed{E_1, E_2}"]),
    },
    "math500": {
        "test/intermediate_algebra/1388.json": ([r"\boxed{1,-2}", r"\boxed{-2, 1}"], [r"\boxed{1}", r"\boxed{1,2}"]),
        "test/intermediate_algebra/428.json": ([r"\boxed{3, 5, 7}", r"\boxed{7,5,3}"], [r"\boxed{3, 5}"]),
        "test/intermediate_algebra/956.json": ([r"\boxed{(6,31,-1)}"], [r"\boxed{(6,31,1)}", r"\boxed{(31,6,-1)}"]),
        "test/counting_and_probability/508.json": ([r"\boxed{10,080}", r"\boxed{10080}", r"\boxed{10,\!080}"],
                                                   [r"\boxed{10,800}", r"\boxed{1008}"]),
        "test/number_theory/417.json": ([r"\boxed{11,111,111,100}", r"\boxed{11111111100}"],
                                        [r"\boxed{1,111,111,100}"]),
        "test/intermediate_algebra/183.json": ([r"\boxed{(2,\infty)}"], [r"\boxed{[2,\infty)}", r"\boxed{(2, 5)}"]),
    },
    "aime24": {
        "aime2024-I-1": ([r"\boxed{204}", r"\boxed{204.0}", r"\boxed{0204}", r"\boxed{204 \text{ minutes}}"],
                         [r"\boxed{240}", r"\boxed{20.4}", r"\boxed{2040}"]),
        "aime2024-I-2": ([r"\boxed{25}", r"\boxed{025}"], [r"\boxed{52}", r"\boxed{2.5}"]),
        "aime2024-I-15": ([r"\boxed{721}"], [r"\boxed{712}", r"\boxed{72.1}"]),
    },
    "aime25": {
        "aime2025-I-1": ([r"\boxed{70}", r"\boxed{070}", r"\boxed{7\times10^{1}}"], [r"\boxed{7}", r"\boxed{700}"]),
        "aime2025-I-2": ([r"\boxed{588}"], [r"\boxed{585}", r"\boxed{58.8}"]),
        "aime2025-I-7": ([r"\boxed{821}"], [r"\boxed{812}"]),
    },
    "amc23": {
        "amc23-0": ([r"\boxed{27}", r"\boxed{27.0}"], [r"\boxed{72}", r"\boxed{2.7}"]),
        "amc23-3": ([r"\boxed{3159}", r"\boxed{3,159}"], [r"\boxed{3195}", r"\boxed{315.9}"]),
        "amc23-5": ([r"\boxed{7}", r"\boxed{\frac{14}{2}}"], [r"\boxed{-7}", r"\boxed{1/7}"]),
    },
    "gsm8k": {
        "gsm8k-test-0": ([r"\boxed{18}", r"\boxed{\$18}", r"\boxed{18.00}", r"\boxed{18 \text{ dollars}}"],
                         [r"\boxed{16}", r"\boxed{1.8}"]),
        "gsm8k-test-2": ([r"\boxed{70000}", r"\boxed{70,000}", r"\boxed{7\times10^{4}}"],
                         [r"\boxed{7000}", r"\boxed{700,00}"]),
        "gsm8k-test-3": ([r"\boxed{540}"], [r"\boxed{504}", r"\boxed{54}"]),
    },
}


@needs_shared_data
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_hand_written_right_and_wrong_answers(golds, name, mode):
    for pid, (right, wrong) in CASES[name].items():
        gold = golds[name][pid]
        responses = [f"So the final answer is {r}." for r in right + wrong]
        scores = math_verify(None, responses, [gold] * len(responses), extraction=mode)
        assert scores == [1.0] * len(right) + [0.0] * len(wrong), (pid, gold, list(zip(right + wrong, scores)))


def test_gold_normalisation_is_idempotent_and_leaves_latex_alone():
    for gold in ["4.5e33", "-1./3", "np.arcsin(10/13)", r"(1 - 3e^{-2t} + 2e^{-5t}) u(t)", r"\frac{1}{2}", "3.14"]:
        assert normalize_gold(normalize_gold(gold)) == normalize_gold(gold)
    assert normalize_gold("4.5e33") == r"4.5\times10^{33}"
    assert normalize_gold("-1./3") == "-1/3"
    assert normalize_gold(r"(1 - 3e^{-2t} + 2e^{-5t}) u(t)") == r"(1 - 3e^{-2t} + 2e^{-5t}) u(t)"  # Euler's e stays
    assert normalize_gold(r"so \boxed{1./3}") == r"so \boxed{1./3}"  # a worked solution is not rewritten


def test_extraction_modes_differ_where_lighteval_and_the_strict_box_differ():
    cases = [  # (response, gold, last_box verdict, math_verify verdict)
        (r"\boxed{2} and \boxed{3}", "2, 3", 0.0, 1.0),  # math-verify's parse joins several boxes
        ("the answer is 42", "42", 0.0, 1.0),  # no box: lighteval's answer patterns still find it
        # math-verify joins every box: {3, 14/3} is not 14/3, so a corrected draft scores 0 (lighteval 0.13's own
        # extraction scores it 1: any box may match; bench/lighteval_crosscheck.py).
        (r"First \boxed{3}, no: \boxed{\frac{14}{3}}", r"\frac{14}{3}", 1.0, 0.0),
        (r"cut off in the box \boxed{\frac{14}{", r"\frac{14}{3}", 0.0, 0.0),
    ]
    for text, gold, strict, lighteval in cases:
        assert math_verify(None, [text], [gold]) == [strict], text
        assert math_verify(None, [text], [gold], extraction="math_verify") == [lighteval], text


def test_think_split_scores_only_the_answer_after_the_thinking():
    text = r"<think>maybe \boxed{5}? no, 6</think> The answer is \boxed{6}."
    draft_only = r"<think>so it is \boxed{6}</think> I am not sure."
    for mode in MODES:
        assert math_verify(None, [text, draft_only], ["6", "6"], extraction=mode, think="split")[0] == 1.0
        assert math_verify(None, [draft_only], ["6"], extraction=mode, think="split") == [0.0]
        assert math_verify(None, [draft_only], ["6"], extraction=mode, think="keep") == [1.0]
    # No </think> at all (a model that does not think): the whole response counts.
    assert math_verify(None, [r"\boxed{6}"], ["6"], think="split") == [1.0]


def test_relative_tolerance_is_qwen_s_numeric_fallback():
    response, gold = r"\boxed{0.8776}", normalize_gold("np.arcsin(10/13)")  # asin(10/13) = 0.877636...
    assert math_verify(None, [response], [gold]) == [0.0]  # math-verify rounds to 6 places
    assert math_verify(None, [response], [gold], rel_tol=1e-4) == [1.0]
    assert math_verify(None, [r"\boxed{0.87}"], [gold], rel_tol=1e-4) == [0.0]
    with pytest.raises(ValueError, match="extraction"):
        math_verify(None, ["x"], ["1"], extraction="first_box")


def test_majority_vote_groups_equivalent_answers():
    def votes(*pairs):
        return [{"extracted": e, "correct": c} for e, c in pairs]

    # \frac12 and 0.5 are one answer with two votes: they beat 7's two votes only if grouped (tie -> first seen).
    assert majority_correct(votes((r"\frac12", True), ("7", False), ("0.5", True), ("7", False), (r"\frac{1}{2}", True)))
    assert not majority_correct(votes(("7", False), (r"\frac12", True), ("7", False), ("0.5", True)))  # 2 vs 2: 7 first
    assert same_answer(r"4.5\times10^{33}", "4.5e33") and not same_answer("2", "3")

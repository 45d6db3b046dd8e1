"""Eval statistics on hand-made records: avg@k, the unbiased pass@k estimator, maj@k, token statistics, ACT,
bootstrap coverage on synthetic data, and the paired comparison (`reasonrl compare`) on hand-made eval folders."""
import itertools
import json
import math

import numpy as np
import pytest

from eval.compare import compare
from eval.metrics import benchmark_metrics, k_values, majority_correct
from eval.stats import bootstrap_ci, paired_difference_ci, paired_ratio_ci, pass_at_k


def rec(pid, sample, correct, tokens=10, extracted="x", finish="stop"):
    return {"problem_id": pid, "sample": sample, "correct": correct, "tokens": tokens, "extracted": extracted,
            "finish_reason": finish, "answer": "1", "completion": ""}


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_pass_at_k_equals_enumeration_over_subsets(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            exact = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_benchmark_metrics_on_hand_made_records():
    # p1: 3/4 correct, p2: 0/4, p3: 4/4 (one truncated). Tokens chosen so the means are easy to check.
    pattern = {"p1": [True, True, False, True], "p2": [False] * 4, "p3": [True] * 4}
    records = []
    for pid, outcomes in pattern.items():
        for s, ok in enumerate(outcomes):
            records.append(rec(pid, s, ok, tokens=100 if ok else 300, extracted="7" if ok else "8",
                               finish="length" if (pid, s) == ("p3", 3) else "stop"))
    m = benchmark_metrics(records, n_boot=2000)
    assert m["num_problems"] == 3 and m["samples_per_problem"] == 4
    assert m["accuracy"] == pytest.approx((0.75 + 0 + 1) / 3)  # avg@4: mean of per-problem accuracies
    assert m["pass_at_k"]["1"] == pytest.approx(m["accuracy"])  # pass@1 is avg@k
    assert m["pass_at_k"]["4"] == pytest.approx(2 / 3)  # p1 and p3 have a correct sample
    assert m["pass_at_k"]["2"] == pytest.approx((1 - math.comb(1, 2) / math.comb(4, 2) + 0 + 1) / 3)
    assert m["maj_at_k"]["4"] == pytest.approx(2 / 3)  # p1's majority "7" is correct
    assert m["tokens"]["mean"] == pytest.approx((7 * 100 + 5 * 300) / 12)
    assert m["tokens"]["median"] == 100
    assert m["tokens_correct"] == {"mean": 100.0, "median": 100.0, "n": 7}
    assert m["tokens_incorrect"] == {"mean": 300.0, "median": 300.0, "n": 5}
    assert m["truncation_rate"] == pytest.approx(1 / 12)
    assert m["act"] == pytest.approx(100 * m["accuracy"] / (m["tokens"]["mean"] / 100))
    lo, hi = m["accuracy_ci"]
    assert 0 <= lo < m["accuracy"] < hi <= 1


def test_act_matches_the_fgo_paper_definition():
    # FGO Table 1: 68.6% at 441 tokens -> ACT 15.6 (accuracy in % per 100 tokens).
    records = [rec(f"p{i}", 0, i < 686, tokens=441) for i in range(1000)]
    assert benchmark_metrics(records, n_boot=200)["act"] == pytest.approx(15.56, abs=0.01)


def test_unequal_sample_counts_are_rejected():
    with pytest.raises(ValueError, match="same number of samples"):
        benchmark_metrics([rec("a", 0, True), rec("a", 1, True), rec("b", 0, False)])


def test_majority_vote():
    votes = lambda *pairs: [rec("p", i, ok, extracted=e) for i, (e, ok) in enumerate(pairs)]  # noqa: E731
    assert majority_correct(votes(("5", True), (" 5 ", True), ("7", False)))
    assert not majority_correct(votes(("7", False), ("5", True), ("7", False)))
    assert not majority_correct(votes(("7", False), ("5", True)))  # a tie goes to the answer seen first
    assert majority_correct(votes((None, False), (None, False), ("5", True)))  # no answer: no vote
    assert not majority_correct(votes((None, False), (None, False)))
    assert k_values(1) == [1] and k_values(4) == [1, 2, 4] and k_values(6) == [1, 2, 4, 6]


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(123)
    p, n, trials = 0.3, 80, 400
    hits = 0
    for t in range(trials):
        lo, hi = bootstrap_ci(rng.random(n) < p, n_boot=1000, seed=t)
        hits += lo <= p <= hi
    assert 0.90 <= hits / trials <= 0.985, hits / trials
    # ...and a 50% interval covers far less often: the coverage above is not an artefact of wide intervals.
    narrow = sum(lo <= p <= hi for lo, hi in (bootstrap_ci(rng.random(n) < p, confidence=0.5, n_boot=1000, seed=t)
                                             for t in range(trials)))
    assert 0.35 <= narrow / trials <= 0.65, narrow / trials


def test_paired_difference_cancels_shared_problem_difficulty():
    rng = np.random.default_rng(0)
    difficulty = rng.random(200)
    a = difficulty + rng.normal(0, 0.02, 200)
    b = difficulty + 0.05 + rng.normal(0, 0.02, 200)
    d, lo, hi = paired_difference_ci(a, b)
    assert d == pytest.approx(np.mean(b - a))
    assert lo < 0.05 < hi and lo > 0  # the shift is detected...
    ua, ub = bootstrap_ci(a), bootstrap_ci(b)
    assert (hi - lo) < 0.25 * ((ua[1] - ua[0]) + (ub[1] - ub[0]))  # ...far more precisely than unpaired intervals
    assert paired_difference_ci([0.5, 0.2, 1.0], [0.6, 0.3, 1.1]) == pytest.approx((0.1, 0.1, 0.1))


def test_paired_token_ratio():
    assert paired_ratio_ci([100, 200, 300], [60, 120, 180]) == pytest.approx((0.6, 0.6, 0.6))
    rng = np.random.default_rng(1)
    a = rng.uniform(100, 1000, 300)
    b = 0.6 * a * rng.uniform(0.8, 1.2, 300)
    r, lo, hi = paired_ratio_ci(a, b)
    assert r == pytest.approx(b.sum() / a.sum()) and lo < 0.6 < hi and hi - lo < 0.05
    with pytest.raises(ValueError):
        paired_ratio_ci([1, 2], [1])


def _eval_folder(path, records, **settings):
    (path / "samples").mkdir(parents=True)
    meta = {"model": path.name, "samples": 2, "greedy": False, "temperature": 0.6, "top_p": 1.0,
            "max_new_tokens": 512, "system_prompt": "s", "prompt_suffix": "", "verifier": "math_verify",
            "benchmarks": {"math500": {}}, **settings}
    (path / "eval_config.json").write_text(json.dumps(meta))
    (path / "samples" / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_compare_on_hand_made_eval_folders(tmp_path):
    """B answers the same problems as A with 40% fewer tokens and one more correct sample out of 40."""
    a, b = [], []
    for p in range(20):
        for s in range(2):
            ok = (p + s) % 3 == 0
            a.append(rec(f"p{p}", s, ok, tokens=200 + 10 * p))
            b.append(rec(f"p{p}", s, ok or (p, s) == (1, 0), tokens=int(0.6 * (200 + 10 * p))))
    b.append(rec("extra", 0, True))  # only B has it: not paired
    b.append(rec("extra", 1, True))
    _eval_folder(tmp_path / "base", a)
    _eval_folder(tmp_path / "fgo", b, max_new_tokens=1024)
    res = compare(tmp_path / "base", tmp_path / "fgo", tmp_path / "cmp", n_boot=2000)
    r = res["benchmarks"]["math500"]
    assert r["problems"] == 20
    assert r["accuracy_diff"] == pytest.approx(1 / 40)
    assert r["token_ratio"] == pytest.approx(sum(x["tokens"] for x in b[:40]) / sum(x["tokens"] for x in a))
    assert r["token_ratio_ci"][0] <= r["token_ratio"] <= r["token_ratio_ci"][1]
    assert r["verdict"].startswith("math500: B is 40% shorter") and "accuracy +2.5 pts" in r["verdict"]
    assert "(no significant difference)" in r["verdict"]  # one sample in 40 is within noise
    assert any("max_new_tokens differs" in w for w in res["warnings"])  # unlike settings are reported
    assert any("paired on the 20 problems" in w for w in res["warnings"])
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["benchmarks"]["math500"]["verdict"] == r["verdict"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| math500 | 20 |" in md and r["verdict"] in md
    for png in ("tokens_math500.png", "accuracy_vs_tokens_math500.png"):
        assert (tmp_path / "cmp" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_needs_eval_folders(tmp_path):
    from rl.data.loading import DataError

    with pytest.raises(DataError, match="not an eval folder"):
        compare(tmp_path, tmp_path)

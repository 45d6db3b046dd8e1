"""The accuracy-vs-budget frontier (eval/budget.py) on hand-made records: the grid, what counts at a budget B (finished
with EOS within B tokens and correct), its place in metrics.json, and the per-benchmark plot of `reasonrl compare`."""
import json

import pytest

from eval.budget import accuracy_at_budget, budget_grid
from eval.compare import compare
from eval.metrics import benchmark_metrics
from eval.runner import write_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def rec(pid, sample, correct, tokens, finish="stop"):
    return {"problem_id": pid, "sample": sample, "correct": correct, "tokens": tokens, "extracted": "1",
            "finish_reason": finish, "answer": "1", "completion": ""}


def test_budget_grid_doubles_from_64_and_ends_at_the_budget():
    assert budget_grid(2048) == [64, 128, 256, 512, 1024, 2048]
    assert budget_grid(1000) == [64, 128, 256, 512, 1000]
    assert budget_grid(64) == [64]
    assert budget_grid(40) == [40]
    assert budget_grid(320, per_doubling=4) == [64, 76, 91, 108, 128, 152, 181, 215, 256, 304, 320]


def test_a_response_counts_only_if_it_finished_within_the_budget_and_is_correct():
    records = [rec("a", 0, True, 50),     # counts from 64 on
               rec("b", 0, True, 64),     # exactly 64 tokens (EOS included): finished within 64
               rec("c", 0, True, 65),     # from 128 on
               rec("d", 0, True, 300, finish="length"),  # cut off at the budget: never counts, though correct
               rec("e", 0, False, 20),    # wrong: never counts
               rec("f", 0, True, 300)]    # finished at 300 <= 300
    acc = accuracy_at_budget(records, budget=300)
    assert acc == {"64": pytest.approx(2 / 6), "128": pytest.approx(3 / 6), "256": pytest.approx(3 / 6),
                   "300": pytest.approx(4 / 6)}
    m = benchmark_metrics(records, n_boot=200, budget=300)
    assert m["accuracy"] == pytest.approx(5 / 6)  # the truncated correct answer counts here, not at any budget
    assert m["accuracy_at_budget"] == acc
    # Never above the accuracy, never decreasing in B.
    values = list(acc.values())
    assert values == sorted(values) and values[-1] <= m["accuracy"]


def test_samples_are_averaged_per_problem_like_accuracy():
    records = [rec("p", 0, True, 100), rec("p", 1, True, 10), rec("q", 0, False, 10), rec("q", 1, True, 200)]
    acc = accuracy_at_budget(records, budget=256)
    assert acc == {"64": pytest.approx(0.25), "128": pytest.approx(0.5), "256": pytest.approx(0.75)}


def test_without_a_budget_the_longest_response_ends_the_grid():
    acc = accuracy_at_budget([rec("p", 0, True, 100), rec("q", 0, True, 150)])
    assert list(acc) == ["64", "128", "150"] and acc["150"] == 1.0
    assert accuracy_at_budget([]) == {}


def test_metrics_json_holds_string_keys(tmp_path):
    m = benchmark_metrics([rec("p", 0, True, 70), rec("q", 0, False, 10)], n_boot=100, budget=128)
    write_metrics(tmp_path, {"math500": m})
    saved = json.loads((tmp_path / "metrics.json").read_text())["benchmarks"]["math500"]["accuracy_at_budget"]
    assert saved == {"64": 0.0, "128": 0.5}
    assert "redundancy_rate" not in m  # no testbed step counts in these records: no redundancy metrics


def _eval_folder(path, records, max_new_tokens):
    (path / "samples").mkdir(parents=True)
    meta = {"model": path.name, "samples": 1, "greedy": True, "temperature": 0.6, "top_p": 1.0,
            "max_new_tokens": max_new_tokens, "system_prompt": "s", "prompt_suffix": "", "verifier": "math_verify",
            "benchmarks": {"math500": {}, "aime24": {}}}
    (path / "eval_config.json").write_text(json.dumps(meta))
    for name in meta["benchmarks"]:
        (path / "samples" / f"{name}.jsonl").write_text("".join(json.dumps(dict(r, benchmark=name)) + "\n"
                                                                for r in records))


def test_compare_draws_one_frontier_per_benchmark_with_both_models(tmp_path):
    """B is as accurate as A at the full budget but finishes sooner, so it is ahead at every smaller budget."""
    a = [rec(f"p{i}", 0, i % 2 == 0, 400 + i) for i in range(10)]
    b = [rec(f"p{i}", 0, i % 2 == 0, 90 + i) for i in range(10)]
    _eval_folder(tmp_path / "base", a, 512)
    _eval_folder(tmp_path / "short", b, 512)
    res = compare(tmp_path / "base", tmp_path / "short", tmp_path / "cmp", n_boot=500)
    for name in ("math500", "aime24"):
        r = res["benchmarks"][name]
        assert r["a"]["accuracy_at_budget"] == {"64": 0.0, "128": 0.0, "256": 0.0, "512": 0.5}
        assert r["b"]["accuracy_at_budget"] == {"64": 0.0, "128": 0.5, "256": 0.5, "512": 0.5}
        png = tmp_path / "cmp" / f"accuracy_at_budget_{name}.png"
        assert png.read_bytes()[:8] == PNG and str(png) in res["plots"]
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["benchmarks"]["math500"]["b"]["accuracy_at_budget"]["128"] == 0.5

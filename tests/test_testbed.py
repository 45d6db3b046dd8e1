"""The verbose-reasoner testbed: generated solutions, the step counter on them and on malformed responses, the files
`reasonrl testbed` writes (seeded, disjoint, math_verify-correct), and the redundancy columns of the eval."""
import json
from collections import Counter

import numpy as np
import pytest

from eval.metrics import benchmark_metrics, markdown_table
from eval.redundancy import record_fields, redundancy_metrics
from rewards import resolve
from rewards.math import math_verify
from rewards.testbed import count_steps, line_kinds, necessary_steps, parse_problem
from rl.data.loading import load_rows
from rl.data.testbed import (DIFFICULTIES, KIND_PROBS, generate, minimal_solution, modal_path, problem_text,
                        redundant_line, sample_problems, space_size, verbose_solution)


class WordTokenizer:
    """Stands in for a tokenizer in the generator: one token per whitespace-separated word."""
    name_or_path = "words"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_every_generated_step_is_counted_as_what_it_is(difficulty):
    rng = np.random.default_rng(difficulty)
    for a, op, b in sample_problems(difficulty, 60, seed=3):
        expected = len(necessary_steps(a, op, b))
        minimal = count_steps(problem_text(a, op, b), minimal_solution(a, op, b))
        assert minimal["redundant"] == 0 and minimal["necessary"] == minimal["necessary_correct"] == expected
        assert minimal["necessary_missing"] == 0 and minimal["other_lines"] == 0 and minimal["correct"]
        text, kinds = verbose_solution(a, op, b, rng, max_redundant=4)
        c = count_steps({"testbed": {"a": a, "op": op, "b": b}}, text)
        assert 1 <= c["redundant"] == len(kinds) <= 4, text
        assert c["redundant_kinds"] == dict(Counter(kinds)), text
        assert c["necessary"] == c["necessary_correct"] == expected and c["other_lines"] == 0 and c["correct"]
        assert c["redundancy_rate"] == pytest.approx(len(kinds) / (len(kinds) + expected))
        assert math_verify([""], [text], [str(eval(f"{a} {op} {b}"))]) == [1.0]  # noqa: S307 (digits and an op)


def test_redundant_checks_are_arithmetically_true():
    """Every verify / other-route / final-check line states true equations (they are redundant, not wrong)."""
    import re

    for difficulty in sorted(DIFFICULTIES):
        for a, op, b in sample_problems(difficulty, 30, seed=5):
            lines = [redundant_line(k, a, op, b) for k in ("other_route", "final_check")]
            lines += [redundant_line("verify_step", a, op, b, inv) for _, _, inv in necessary_steps(a, op, b)]
            for line in lines:
                body = line.split(":", 1)[1].split(". Yes")[0].rstrip(".")
                parts = [p.strip() for p in body.split("=")]
                values = [eval(p.replace("/", "//")) for p in parts if re.fullmatch(r"[\d +\-*/]+", p)]  # noqa: S307
                assert len(values) == len(parts) and len(set(values)) == 1, line


def test_the_counter_reads_malformed_and_partial_responses():
    p = "What is 47 * 38?"
    assert parse_problem(p) == (47, "*", 38)
    empty = count_steps(p, "")
    assert empty["necessary"] == empty["redundant"] == 0 and empty["redundancy_rate"] == 0.0 and not empty["correct"]
    junk = count_steps(p, "I think it is about 1800.\n\\boxed{1800}")
    assert junk["other_lines"] == 1 and junk["answer_lines"] == 1 and not junk["correct"]
    wrong = "Partial: 47 * 8 = 376.\nPartial: 47 * 30 = 1420.\nSum: 376 + 1420 = 1796.\nThe answer is \\boxed{1796}."
    c = count_steps(p, wrong)
    assert (c["necessary"], c["necessary_correct"], c["necessary_missing"]) == (3, 1, 2) and not c["correct"]
    # Repeats, other check phrasings, bullets and spacing.
    text = ("- Partial: 47*8 = 376\n- Partial: 47 * 8 = 376.\nDouble-check: 8 * 47 = 376.\nWait, I made no error.\n"
            "2. Partial: 47 * 30 = 1410.\nSum: 376 + 1410 = 1786.\nfinal check: 47 * 38 = 1786\nSo \\boxed{1,786}.")
    c = count_steps(p, text)
    assert c["necessary"] == c["necessary_correct"] == 3
    assert c["redundant_kinds"] == {"repeat": 1, "other_check": 2, "final_check": 1} and c["correct"]
    assert c["redundancy_rate"] == pytest.approx(4 / 7)
    # A subtraction column that adds 10 but claims no borrow matches no reference step.
    c = count_steps("What is 52 - 18?", "Ones: 2 - 0 - 8 + 10 = 4, borrow 0.\nTens: 5 - 1 - 1 = 3, borrow 0.")
    assert (c["necessary"], c["necessary_correct"]) == (2, 1)
    with pytest.raises(ValueError):
        count_steps("What is the capital of France?", "Paris")


def test_verbosity_is_the_mode_of_the_sft_data():
    """Greedy decoding keeps what is likely at each slot: the kinds above 0.5 must appear in most solutions, and
    every solution must hold at least one redundant step (else "no check" wins everywhere)."""
    rng = np.random.default_rng(0)
    kinds, counts = Counter(), Counter()
    for a, op, b in sample_problems(3, 500, seed=1):
        _, used = verbose_solution(a, op, b, rng, max_redundant=4)
        kinds.update(set(used))
        counts[len(used)] += 1
    assert min(counts) >= 1 and max(counts) <= 4 and len(counts) == 4  # the number varies, 1..4
    for kind, p in KIND_PROBS.items():
        if p > 0.5:
            assert kinds[kind] > 250, (kind, kinds)
    assert set(kinds) == set(KIND_PROBS)  # every kind occurs


def test_the_greedy_shape_of_the_sft_data_keeps_three_redundant_steps():
    rng = np.random.default_rng(0)
    texts = [verbose_solution(a, op, b, rng, 4)[0] for a, op, b in sample_problems(3, 1000, seed=2)]
    path = [k for k, _ in modal_path(texts)]
    assert path == ["restate", "necessary:partial", "necessary:partial", "necessary:sum", "other_route",
                    "final_check", "answer"]
    assert line_kinds("Partial: 1 * 2 = 2.\nhello\nSo \\boxed{2}") == ["necessary:partial", "other", "answer"]


def test_generate_writes_disjoint_seeded_files(tmp_path):
    summary = generate(tmp_path / "a", WordTokenizer(), seed=7, difficulty=3, sft=300, train=100, heldout=50)
    generate(tmp_path / "b", WordTokenizer(), seed=7, difficulty=3, sft=300, train=100, heldout=50)
    for name in ("sft.jsonl", "train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    sft = [json.loads(x) for x in (tmp_path / "a" / "sft.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()]
    assert (len(sft), len(train), len(held)) == (300, 100, 50)
    assert set(sft[0]) == {"prompt", "completion"} and sft[0]["prompt"].startswith("What is ")
    pairs = [{frozenset(parse_problem(r["prompt"])[::2])} for r in sft]
    keys = lambda rows: {frozenset((r["testbed"]["a"], r["testbed"]["b"])) for r in rows}  # noqa: E731
    sft_keys = set().union(*pairs)
    assert not (sft_keys & keys(train)) and not (sft_keys & keys(held)) and not (keys(train) & keys(held))
    row = held[0]
    assert set(row) >= {"id", "problem", "answer", "testbed", "minimal_tokens", "necessary_steps"}
    assert row["minimal_tokens"] == len(minimal_solution(*parse_problem(row)).split()) + 1  # + EOS
    assert summary["tokens"]["sft_over_minimal"]["mean"] > 1.5 and summary["space"] == space_size(3)
    assert json.loads((tmp_path / "a" / "testbed.json").read_text())["settings"]["seed"] == 7
    # The documented default: 4-6 redundant steps per SFT solution (DEFAULT_MIN/MAX_REDUNDANT), counted on the file.
    steps = [count_steps(r["prompt"], r["completion"]) for r in sft]
    counts = Counter(c["redundant"] for c in steps)
    assert set(counts) <= {4, 5, 6} and len(counts) > 1 and all(c["correct"] for c in steps), counts
    assert summary["sft_redundant_steps"]["distribution"] == {str(k): n for k, n in sorted(counts.items())}
    # Another seed at the same difficulty and sizes: other problems, other solutions (not just another summary).
    generate(tmp_path / "c", WordTokenizer(), seed=8, difficulty=3, sft=300, train=100, heldout=50)
    for name in ("sft.jsonl", "train.jsonl", "heldout.jsonl"):
        a, c = ((tmp_path / d / name).read_text().splitlines() for d in ("a", "c"))
        assert len(a) == len(c) and sum(x != y for x, y in zip(a, c)) > 0.9 * len(a), name
    with pytest.raises(ValueError, match="only 4095 distinct problems"):
        generate(tmp_path / "d", WordTokenizer(), difficulty=3, sft=4000, train=100, heldout=0)


def test_held_out_file_loads_as_a_benchmark_and_feeds_the_redundancy_columns(tmp_path):
    generate(tmp_path, WordTokenizer(), seed=0, difficulty=1, sft=10, train=10, heldout=6)
    rows, _ = load_rows(str(tmp_path / "heldout.jsonl"))
    assert len(rows) == 6 and rows[0]["testbed"]["op"] in "+-"
    records = []
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        a, op, b = parse_problem(row)
        text = minimal_solution(a, op, b) if i % 2 else verbose_solution(a, op, b, rng, 2, min_redundant=2)[0]
        fields = record_fields(row, text)
        assert fields["necessary_steps"] == row["necessary_steps"] and fields["redundant_steps"] == 2 * (1 - i % 2)
        records.append({"problem_id": row["id"], "sample": 0, "correct": True, "tokens": 2 * row["minimal_tokens"],
                        "finish_reason": "stop", "extracted": row["answer"], **fields})
    assert record_fields({"problem": "What is 2 + 2?", "answer": "4"}, "4") == {}  # only testbed rows get them
    m = benchmark_metrics(records, n_boot=100, budget=256)
    assert m["redundancy_rate"] == pytest.approx(np.mean([2 / 6 if i % 2 == 0 else 0 for i in range(6)]))
    assert m["redundant_steps_mean"] == 1.0 and m["necessary_steps_mean"] == 4.0 and m["tokens_over_minimal"] == 2.0
    table = markdown_table({"heldout": m})
    assert "| heldout | 16.7 | 1.00 / 4.00 | 4.00 | 2.00 |" in table
    assert redundancy_metrics([{"tokens": 1}]) == {}


def test_redundancy_metric_reward_for_training_logs():
    fn = resolve("testbed_redundancy")
    tb = {"a": 47, "op": "*", "b": 38}
    text = "Partial: 47 * 8 = 376.\nWait, let me verify that step: 376 / 8 = 47.\nThe answer is \\boxed{1786}."
    assert fn(["p", "p"], [text, text], testbed=[tb, None]) == [0.5, None]
    assert fn(["p"], ["x"]) == [None]


def test_reasonrl_testbed_command(tmp_path, capsys):
    from launch.cli import main

    assert main(["testbed", "--out", str(tmp_path), "--sft", "40", "--train", "10", "--heldout", "5",
                 "--model", "tiny:llama", "--difficulty", "4", "--max-redundant", "2",
                 "--min-redundant", "1"]) == 0
    out = capsys.readouterr().out
    assert "sft_over_minimal_mean" in out and "testbed in" in out
    summary = json.loads((tmp_path / "testbed.json").read_text())
    assert summary["settings"]["difficulty"] == 4 and max(map(int, summary["sft_redundant_steps"]["distribution"])) <= 2
    assert main(["testbed", "--out", str(tmp_path), "--difficulty", "9"]) == 2


@pytest.mark.slow
def test_reasonrl_eval_on_the_held_out_file_reports_redundancy_and_the_frontier(tmp_path):
    """The real eval path (Ray rollout + verifier workers, tiny model): testbed rows give step counts per record,
    `redundancy_rate` and `accuracy_at_budget` per benchmark, and the second results table."""
    import ray

    from launch.cli import main

    generate(tmp_path / "tb", WordTokenizer(), seed=0, sft=5, train=5, heldout=3)
    try:
        assert main(["eval", "--model", "tiny:llama", "--benchmarks", str(tmp_path / "tb" / "heldout.jsonl"),
                     "--greedy", "--max-new-tokens", "70", "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    finally:
        ray.shutdown()
    records = [json.loads(x) for x in (tmp_path / "ev" / "samples" / "heldout.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert all({"redundant_steps", "necessary_steps", "minimal_tokens"} <= set(r) for r in records)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["benchmarks"]["heldout"]
    # The metrics are those of the saved records, whose step counts the counter gives on the saved responses.
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "tb" / "heldout.jsonl").read_text().splitlines())}
    rates = []
    for r in records:
        c = count_steps(rows[r["problem_id"]], r["completion"])
        assert (r["redundant_steps"], r["necessary_steps"]) == (c["redundant"], c["necessary"])
        rates.append(c["redundancy_rate"])
    assert m["redundancy_rate"] == pytest.approx(np.mean(rates))
    assert m["accuracy"] == pytest.approx(np.mean([bool(r["correct"]) for r in records]))
    assert list(m["accuracy_at_budget"]) == ["64", "70"]
    assert "redundancy rate %" in (tmp_path / "ev" / "results.md").read_text()

"""End to end on the tiny model: `reasonrl eval` through Ray rollout/reward workers, resume, compare, and the
in-training benchmark eval. Slow: they start Ray actors for real."""
import json
from pathlib import Path

import pytest
import ray

from launch.cli import main
from tests.shared_data import DATA, needs_shared_data

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"benchmark", "problem_id", "sample", "answer", "completion", "tokens", "finish_reason", "extracted",
          "correct", "score"}

pytestmark = [pytest.mark.slow, needs_shared_data]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    ray.shutdown()


def _eval(out: Path, *extra: str) -> int:
    return main(["eval", "--model", "tiny:llama", "--benchmarks", "math500", "--limit", "3", "--samples", "2",
                 "--max-new-tokens", "12", "--data-dir", str(DATA), "--out", str(out), "--chunk-problems", "1",
                 "--no-progress", *extra])


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_eval_writes_every_output_resumes_and_compares(tmp_path, capsys):
    out = tmp_path / "base"
    assert _eval(out) == 0
    for name in ("eval_config.json", "metrics.json", "results.md", "samples/math500.jsonl"):
        assert (out / name).is_file(), name
    samples = out / "samples" / "math500.jsonl"
    records = [json.loads(line) for line in _lines(samples)]
    assert len(records) == 6 and all(set(r) == FIELDS for r in records)
    gold = {json.loads(line)["id"]: json.loads(line)["answer"] for line in (DATA / "math500.jsonl").open()}
    assert [(r["problem_id"], r["sample"]) for r in records] == [(p, s) for p in list(gold)[:3] for s in (0, 1)]
    assert all(r["answer"] == gold[r["problem_id"]] for r in records)
    assert all(1 <= r["tokens"] <= 12 and r["finish_reason"] in ("stop", "length") for r in records)
    assert records[0]["completion"] != records[1]["completion"]  # sampled, not greedy
    metrics = json.loads((out / "metrics.json").read_text())["benchmarks"]["math500"]
    assert metrics["num_problems"] == 3 and metrics["samples_per_problem"] == 2
    assert metrics["tokens"]["mean"] == pytest.approx(sum(r["tokens"] for r in records) / 6)
    assert metrics["truncation_rate"] == pytest.approx(sum(r["finish_reason"] == "length" for r in records) / 6)
    assert set(metrics["pass_at_k"]) == set(metrics["maj_at_k"]) == {"1", "2"}
    settings = json.loads((out / "eval_config.json").read_text())
    assert settings["verifier"] == "math_verify" and settings["system_prompt"]  # the training template's default
    assert "| math500 | 3 x 2 |" in (out / "results.md").read_text()

    # Interrupted after two problems (the third's lines lost, one cut mid-write): the rerun regenerates only the
    # third, with the same seed, so the file ends up identical.
    full = _lines(samples)
    samples.write_text("\n".join(full[:4]) + "\n" + full[4][:20])
    assert _eval(out) == 0
    assert _lines(samples) == full
    # A smaller --limit re-scores from the file (nothing to generate) and keeps the third problem's samples.
    assert _eval(out, "--limit", "2") == 0
    assert json.loads((out / "metrics.json").read_text())["benchmarks"]["math500"]["num_problems"] == 2
    assert _lines(samples) == full
    # Other sampling settings would mix two setups in one folder: refused, naming the setting.
    capsys.readouterr()
    assert _eval(out, "--temperature", "0.9") == 2
    assert "temperature (0.6 there, 0.9 now)" in capsys.readouterr().err

    short = tmp_path / "short"
    assert _eval(short, "--max-new-tokens", "4", "--num-workers", "2", "--chunk-problems", "3") == 0  # data-parallel
    assert len(_lines(short / "samples" / "math500.jsonl")) == 6
    assert main(["compare", str(out), str(short), "--n-boot", "500"]) == 0
    cmp = short / "compare_vs_base"
    result = json.loads((cmp / "results.json").read_text())["benchmarks"]["math500"]
    base_tokens = metrics["tokens"]["mean"]
    short_tokens = json.loads((short / "metrics.json").read_text())["benchmarks"]["math500"]["tokens"]["mean"]
    assert result["token_ratio"] == pytest.approx(short_tokens / base_tokens)
    assert "B is" in result["verdict"] and "shorter" in result["verdict"]
    for name in ("compare.md", "tokens_math500.png", "accuracy_vs_tokens_math500.png"):
        assert (cmp / name).is_file(), name


def test_in_training_benchmark_eval_is_logged_beside_training_metrics(tmp_path):
    """The run's policy is tests/answer_model.py (every response \\boxed{4} or \\boxed{5}, drawn per sample), so
    the eval of a third benchmark, whose answers are 4, 5.0 and 7, is right on some samples and wrong on others:
    accuracy, its interval and pass@k are then recomputed from the saved samples with something to get wrong (on
    the random tiny model they are all 0, which a scorer marking everything wrong would reproduce)."""
    import math

    from eval.compare import compare
    from eval.stats import bootstrap_ci
    from launch.run import train_run  # builds the benchmark eval hook the trainer runs
    from rl.config.schema import load_config
    from tests.answer_model import save_answer_model

    out = tmp_path / "run"
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"Question {i}?", "answer": a}) + "\n"
                               for i, a in enumerate(["4", "5.0", "7"])))
    benches = ("math500", "amc23", "answers")
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"model.path={save_answer_model(tmp_path / 'model')}",
        f"trainer.output_dir={out}", "trainer.eval_every=1", f"trainer.eval_benchmarks=[math500, amc23, {answers}]",
        "trainer.eval_limit=3", f"trainer.eval_data_dir={DATA}", "trainer.eval_samples=4", "trainer.eval_greedy=false",
        "trainer.eval_at_start=false", "trainer.eval_at_end=false", "logging.progress=false", "logging.plots=false",
        "trainer.save_every=0"])
    train_run(cfg)
    rows = [json.loads(line) for line in _lines(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for bench in benches:
            assert 0 <= r[f"eval/{bench}/accuracy"] <= 1
            assert 1 <= r[f"eval/{bench}/tokens_mean"] <= cfg.rollout.max_new_tokens
        assert "loss" in r and "time_eval" in r
    events = [json.loads(line) for line in _lines(out / "events.jsonl")]
    evals = [e for e in events if e["event"] == "benchmark_eval"]
    assert [(e["step"], e["benchmark"]) for e in evals] == [(s, b) for s in (1, 2) for b in benches]
    step1, step2 = out / "eval" / "step-000001", out / "eval" / "step-000002"
    assert len(_lines(step1 / "samples" / "math500.jsonl")) == 12  # 3 problems x 4 samples
    # Every logged number is that of the saved samples of its step (not just a plausible number).
    for r, folder in zip(rows, (step1, step2)):
        for bench in benches:
            records = [json.loads(line) for line in _lines(folder / "samples" / f"{bench}.jsonl")]
            tokens = [x["tokens"] for x in records]
            assert r[f"eval/{bench}/tokens_mean"] == pytest.approx(sum(tokens) / len(tokens))
            by_problem: dict = {}
            for x in records:
                by_problem.setdefault(x["problem_id"], []).append(bool(x["correct"]))
            assert [len(v) for v in by_problem.values()] == [4, 4, 4]
            # accuracy: avg@4, per problem, then over problems; its interval resamples problems (eval seed: 0)
            per_problem = [sum(v) / len(v) for v in by_problem.values()]
            assert r[f"eval/{bench}/accuracy"] == pytest.approx(sum(per_problem) / 3)
            lo, hi = bootstrap_ci(per_problem, seed=cfg.trainer.seed)
            assert (r[f"eval/{bench}/accuracy_lo"], r[f"eval/{bench}/accuracy_hi"]) == (pytest.approx(lo),
                                                                                        pytest.approx(hi))
            # pass@4 of 4 samples: the share of problems with at least one right sample
            assert r[f"eval/{bench}/pass@4"] == pytest.approx(sum(map(any, by_problem.values())) / 3)
            if bench == "answers":
                # the verdicts themselves, from each saved response: its box holds the gold (5 equals 5.0)
                assert all(x["completion"] in ("\\boxed{4}", "\\boxed{5}") for x in records)
                assert [x["correct"] for x in records] == [float(x["extracted"]) == float(x["answer"])
                                                           for x in records]
                right = sum(map(sum, by_problem.values()))
                assert 0 < right < 8 and not any(by_problem["q2"])  # right, wrong and never right (7)
                assert lo <= r[f"eval/{bench}/accuracy"] < hi  # an interval with width, not [0, 0]
                assert r[f"eval/{bench}/pass@4"] > r[f"eval/{bench}/accuracy"]
    # The saved evals are `reasonrl eval` folders: compare works on them directly.
    res = compare(step1, step2, tmp_path / "cmp", n_boot=200, plots=False)
    assert set(res["benchmarks"]) == set(benches) and res["benchmarks"]["amc23"]["problems"] == 3

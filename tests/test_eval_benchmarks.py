"""Benchmarks by name (local data folder and the hub code path), bad input, resume bookkeeping and re-scoring."""
import dataclasses
import json
from pathlib import Path

import pytest

from eval import benchmarks
from eval.benchmarks import BENCHMARKS, load_benchmark, parse_benchmarks, slug
from eval.rescore import rescore
from eval.runner import complete_problems, locate_model, read_samples
from rl.config.schema import ConfigError
from rl.data.loading import DataError
from tests.shared_data import DATA, needs_shared_data

SIZES = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "minerva": 272, "gsm8k": 1319}


@needs_shared_data
@pytest.mark.parametrize("name", sorted(SIZES))
def test_named_benchmarks_load_from_the_data_folder(name):
    rows, stats = load_benchmark(name, DATA)
    assert len(rows) == SIZES[name] and stats["skipped_no_answer"] == 0
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["problem"].strip() and r["answer"].strip() for r in rows)
    assert load_benchmark(name, DATA, limit=3)[0] == rows[:3]


@needs_shared_data
def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv(benchmarks.DATA_DIR_ENV, str(DATA))
    assert benchmarks.data_dir_from(None) == DATA
    monkeypatch.setenv(benchmarks.DATA_DIR_ENV, str(DATA / "missing"))
    with pytest.raises(DataError, match="REASONRL_DATA_DIR"):
        benchmarks.data_dir_from(None)


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(DataError, match="unknown benchmark 'math5000'; known: math500, aime24, aime25, amc23, "
                                        "minerva, gsm8k"):
        parse_benchmarks("math500,math5000")
    assert parse_benchmarks(" math500, aime24,math500 ,x.jsonl,org/set:dev") == ["math500", "aime24", "x.jsonl",
                                                                                   "org/set:dev"]
    assert [slug(n) for n in ("math500", "data/x.jsonl", "org/set:dev")] == ["math500", "x", "org__set__dev"]


def test_missing_file_in_data_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="aime25.jsonl does not exist"):
        load_benchmark("aime25", tmp_path)


def test_hub_path_offline_fails_with_the_dataset_and_a_hint():
    # conftest sets HF_DATASETS_OFFLINE: the real `datasets.load_dataset` call is made and refused.
    with pytest.raises(DataError, match=r"HuggingFaceH4/MATH-500.*--data-dir"):
        load_benchmark("math500")


def test_hub_benchmark_goes_through_datasets_with_its_columns(tmp_path, monkeypatch):
    # A folder laid out like a hub repo is resolved by datasets.load_dataset as a hub id is; gsm8k's spec maps
    # `question` and takes the answer after '####'.
    repo = tmp_path / "openai__gsm8k"
    repo.mkdir()
    rows = [{"question": "2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
            {"question": "Big?", "answer": "so\n#### 1,234"}, {"question": "None?", "answer": None}]
    (repo / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setitem(BENCHMARKS, "gsm8k", dataclasses.replace(BENCHMARKS["gsm8k"], hub=str(repo), config=None))
    got, stats = load_benchmark("gsm8k")
    assert [(r["problem"], r["answer"]) for r in got] == [("2 + 2?", "4"), ("Big?", "1234")]
    assert stats["skipped_no_answer"] == 1 and stats["source"].endswith(":test")


def test_any_jsonl_with_problem_and_answer_works_and_rows_without_answer_are_counted(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"problem": "a?", "answer": "1"}, {"problem": "b?", "answer": ""},
                                                        {"problem": "c?", "answer": 3}]))
    rows, stats = load_benchmark(str(path))
    assert [r["answer"] for r in rows] == ["1", "3"] and stats["skipped_no_answer"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "a?", "answer": "1"}))
    with pytest.raises(DataError, match="no column 'problem'"):
        load_benchmark(str(bad))


@needs_shared_data
def test_model_that_does_not_load_fails_before_any_generation(tmp_path, capsys):
    import ray

    from launch.cli import main

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no tokenizer, no weights
    rc = main(["eval", "--model", str(tmp_path / "broken"), "--benchmarks", "aime24", "--data-dir", str(DATA),
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "does not load" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


def test_resume_keeps_only_complete_problems(tmp_path):
    path = tmp_path / "s.jsonl"
    lines = [json.dumps({"problem_id": p, "sample": s}) for p, s in [("a", 0), ("a", 1), ("b", 0), ("c", 1), ("c", 0)]]
    path.write_text("\n".join(lines) + '\n{"problem_id": "d", "sam')  # a crash mid-line
    records = read_samples(path)
    assert len(records) == 5
    done = complete_problems(records, 2, ["a", "b", "c", "d"])
    assert sorted(done) == ["a", "c"] and [r["sample"] for r in done["c"]] == [0, 1]


def test_locate_model_finds_the_run_config(tmp_path):
    run = tmp_path / "runs" / "fgo"
    model = run / "checkpoints" / "step-000004" / "model"
    model.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {path: tiny:llama}\n")
    (run / "checkpoint-final").symlink_to(model)
    assert locate_model(str(run)) == (str(run / "checkpoint-final"), run / "config.yaml")
    assert locate_model(str(run / "checkpoint-final"))[1] == run / "config.yaml"
    assert locate_model(str(model))[1] == run / "config.yaml"
    assert locate_model("tiny:llama") == ("tiny:llama", None)


def test_rescore_reverifies_saved_responses_without_generating(tmp_path):
    out = tmp_path / "ev"
    (out / "samples").mkdir(parents=True)
    (out / "eval_config.json").write_text(json.dumps({"model": "m", "seed": 0, "benchmarks": {"math500": {}}}))
    recs = [{"problem_id": "p", "sample": 0, "answer": "0.5", "completion": r"so \boxed{\frac{1}{2}}", "tokens": 9,
             "finish_reason": "stop", "extracted": None, "correct": False},
            {"problem_id": "q", "sample": 0, "answer": "3", "completion": r"\boxed{4}", "tokens": 5,
             "finish_reason": "stop", "extracted": None, "correct": True}]
    (out / "samples" / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    metrics = rescore(out)
    after = read_samples(out / "samples" / "math500.jsonl")
    assert [(r["correct"], r["extracted"]) for r in after] == [(True, r"\frac{1}{2}"), (False, "4")]
    assert metrics["math500"]["accuracy"] == 0.5
    assert json.loads((out / "metrics.json").read_text())["benchmarks"]["math500"]["accuracy"] == 0.5


def test_rescore_keeps_the_eval_s_own_verifier(tmp_path):
    """An eval run with --verifier exact_match is re-scored with it: a boxed copy of the sum is not an answer."""
    from eval.runner import EvalSettings

    out = tmp_path / "ev"
    (out / "samples").mkdir(parents=True)
    meta = {"model": "m", "seed": 0, "benchmarks": {"heldout": {}}, "verifier": "exact_match"}
    (out / "eval_config.json").write_text(json.dumps(meta))
    recs = [{"problem_id": "p", "sample": 0, "answer": "5", "completion": r"\boxed{2 + 3}", "tokens": 7,
             "finish_reason": "stop", "extracted": None, "correct": True},
            {"problem_id": "q", "sample": 0, "answer": "5", "completion": r"\boxed{5}", "tokens": 5,
             "finish_reason": "stop", "extracted": None, "correct": False}]
    (out / "samples" / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert rescore(out)["heldout"]["accuracy"] == 0.5
    assert [r["correct"] for r in read_samples(out / "samples" / "heldout.jsonl")] == [False, True]
    meta["verifier"] = "math_verify"  # the same responses under math_verify: the expression simplifies to 5
    (out / "eval_config.json").write_text(json.dumps(meta))
    assert rescore(out)["heldout"]["accuracy"] == 1.0
    assert EvalSettings(verifier="exact_match").verifier == "exact_match"
    with pytest.raises(ConfigError, match=r"--verifier: .*exact_mach"):
        EvalSettings(verifier="exact_mach")


def test_in_training_eval_keys_are_validated_with_the_config():
    from launch.run import load_training_config
    from rl.config.schema import ConfigError, load_config

    # The benchmark names are eval's to know: checked where a training config is loaded, above rl/.
    with pytest.raises(ConfigError, match=r"'trainer.eval_benchmarks': unknown benchmark 'mat500'; known: math500"):
        load_training_config(None, ["trainer.eval_benchmarks=[mat500]"])
    with pytest.raises(ConfigError, match=r"'trainer.eval_samples': 4 greedy responses would be identical"):
        load_config(None, ["trainer.eval_samples=4"])
    cfg = load_config(None, ["trainer.eval_samples=4", "trainer.eval_greedy=false", "trainer.eval_every=5"])
    assert (cfg.trainer.eval_samples, cfg.trainer.eval_every, cfg.trainer.eval_benchmarks) == (4, 5, ["math500"])



def test_eval_sampling_skips_logits_without_changing_the_tokens():
    """Eval generation does not keep per-step logits (GBs at a 2048-token budget); the tokens are the same."""
    from eval.runner import EvalSettings
    from rl.models import resolve_model
    from rl.rollout.worker import RolloutWorker

    worker = RolloutWorker(resolve_model("tiny:llama"))
    params = EvalSettings(samples=2, max_new_tokens=8, temperature=0.9).sampling()
    assert params.logprobs is False and params.top_k == 0
    lean = worker.generate(["What is 2 + 2?", "Name a colour."], params, seed=5)
    full = worker.generate(["What is 2 + 2?", "Name a colour."], dataclasses.replace(params, logprobs=True), seed=5)
    assert lean.response_ids == full.response_ids and lean.finish_reason == full.finish_reason
    assert lean.logprobs == [[]] * 4 and [len(x) for x in full.logprobs] == [len(x) for x in full.response_ids]

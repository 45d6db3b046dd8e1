"""`reasonrl experiment`: methods from the same start (and over seeds), tables and figures.

The report tests build finished run folders by hand (config.yaml as the experiment would write it, metrics.jsonl and
events.jsonl with a few problems) and check every number against what the definitions give on that data."""
import json
from pathlib import Path

import pytest
import ray

import eval.plots
from eval.stats import bootstrap_ci, paired_difference_ci, paired_ratio_ci
from launch.cli import main
from launch.experiment import finished, load_configs, plan_runs
from launch.experiment_report import START, build_report, write_report
from rl.config.schema import ConfigError, dump_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [str(ROOT / "configs/compress_grpo.yaml"), str(ROOT / "configs/compress_fgo.yaml")]
TINY = ["model.path=tiny:llama", "data.arith.num_train=64", "data.arith.num_test=8", "data.eval_size=4",
        "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8", "trainer.max_steps=1",
        "learner.micro_batch_size=8", "logging.progress=false", "logging.tensorboard=false"]


def test_compress_configs_differ_only_in_method(tmp_path):
    cfgs = load_configs([*CONFIGS, str(ROOT / "configs/compress_kimi.yaml")], tmp_path, [])
    assert [c.algorithm.name for c in cfgs.values()] == ["grpo", "fgo", "grpo"]
    assert [len(c.reward.functions) for c in cfgs.values()] == [1, 1, 2]
    assert cfgs["compress_fgo"].trainer.output_dir == str((tmp_path / "compress_fgo").resolve())
    # only the first method evaluates the (shared) start policy
    assert [c.trainer.eval_at_start for c in cfgs.values()] == [True, False, False]


def test_configs_that_differ_beyond_the_method_are_rejected(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text((ROOT / "configs/compress_fgo.yaml").read_text().replace("max_new_tokens: 48",
                                                                              "max_new_tokens: 32"))
    with pytest.raises(ConfigError, match="rollout.max_new_tokens"):
        load_configs([CONFIGS[0], str(other)], tmp_path, [])


def test_seeds_train_seed_major_and_keep_the_own_seed_in_the_plain_folder(tmp_path):
    plain = load_configs(CONFIGS, tmp_path, [])
    plan = plan_runs(CONFIGS, tmp_path, [], seeds=[0, 3])
    assert [(r.method, r.seed, Path(r.cfg.trainer.output_dir).name) for r in plan] == [
        ("compress_grpo", 0, "compress_grpo"), ("compress_fgo", 0, "compress_fgo"),
        ("compress_grpo", 3, "compress_grpo-seed3"), ("compress_fgo", 3, "compress_fgo-seed3")]
    assert [r.cfg.trainer.seed for r in plan] == [0, 0, 3, 3]
    # one start evaluation per seed, by the first config; the own-seed runs exactly as without --seeds (reused)
    assert [r.cfg.trainer.eval_at_start for r in plan] == [True, False, True, False]
    assert [dump_config(r.cfg) for r in plan[:2]] == [dump_config(c) for c in plain.values()]
    assert [(r.method, r.seed) for r in plan_runs(CONFIGS, tmp_path, [])] == [("compress_grpo", 0),
                                                                               ("compress_fgo", 0)]
    # the own seed is the config's after --set: that one keeps DIR/<stem>
    moved = plan_runs(CONFIGS, tmp_path, ["trainer.seed=3"], seeds=[3, 0, 3])
    assert [Path(r.cfg.trainer.output_dir).name for r in moved] == [
        "compress_grpo", "compress_fgo", "compress_grpo-seed0", "compress_fgo-seed0"]


IDS = ["a", "b", "c", "d"]


def ev(correct, tokens, ids=IDS, truncated=None, redundancy=None):
    """An eval event's payload as rl.trainer.evaluate writes it; truncated/scores left out like older runs."""
    e = {"accuracy": sum(correct) / len(correct), "n": len(correct), "response_tokens_mean": sum(tokens) / len(tokens),
         "correct": correct, "tokens": tokens, "ids": ids}
    if truncated is not None:
        e["truncated"] = truncated
    if redundancy is not None:
        e["scores"] = {"last_number": [float(c) for c in correct], "testbed_redundancy": redundancy}
    return e


def write_run(cfg, end, start=None, generated=(1000, 1000), step1=(30.0, 0.25)):
    """A finished run folder: the config the experiment wants there, two steps of metrics, its evaluations."""
    run = Path(cfg.trainer.output_dir)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    rows = [{"step": 1, "zero_adv_groups": 0.5, "entropy": 1.0, "response_tokens_mean": step1[0], "accuracy": step1[1]},
            {"step": 2, "zero_adv_groups": 0.25, "entropy": 0.5, "response_tokens_mean": 20.0, "accuracy": 0.5}]
    for row, g in zip(rows, generated or ()):
        row["generated_tokens"] = g
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    events = [{"event": "eval", "step": 0, **start}] if start else []
    events.append({"event": "eval", "step": cfg.trainer.max_steps, **end})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


FAKE = ["trainer.max_steps=2", "rollout.max_new_tokens=200"]
GRID = (64, 76, 91, 108, 128, 152, 181, 200)  # the frontier's budgets up to 200: four per doubling


def at(*accuracy):
    """An accuracy_at_budget curve over GRID."""
    return dict(zip(map(str, GRID), accuracy))


def test_a_run_saved_before_a_schema_key_existed_is_still_finished(tmp_path):
    import yaml

    grpo, = plan_runs(CONFIGS[:1], tmp_path, FAKE)
    write_run(grpo.cfg, ev([1, 0, 0, 0], [5, 5, 5, 5]))
    path = Path(grpo.cfg.trainer.output_dir) / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    assert saved["algorithm"].pop("overlong_filter") is False  # as if written before the key was added
    path.write_text(yaml.safe_dump(saved))
    assert finished(grpo.cfg)
    saved["rollout"]["temperature"] = 0.5  # a real difference still means: train again
    path.write_text(yaml.safe_dump(saved))
    assert not finished(grpo.cfg)


def test_paired_differences_truncation_redundancy_and_gain_per_run(tmp_path):
    grpo, fgo = plan_runs(CONFIGS, tmp_path, FAKE)
    write_run(grpo.cfg, ev([1, 1, 0, 0], [50, 100, 150, 200], truncated=[False, False, False, True],
                           redundancy=[0.0, 0.5, None, 1.0]),
              start=ev([0, 0, 0, 1], [30, 30, 30, 30], truncated=[False] * 4), generated=(1000, 3000))
    # FGO evaluated c, b, a and a problem the reference lacks: pairs are matched by id, e is left out.
    write_run(fgo.cfg, ev([1, 1, 1, 0], [6, 4, 5, 100], ids=["c", "b", "a", "e"],
                          truncated=[True, False, False, True], redundancy=[0.5, None, 0.25, 0.0]),
              generated=(1500, 1000))
    assert finished(grpo.cfg) and finished(fgo.cfg)
    report = build_report([(r.method, r.cfg) for r in (grpo, fgo)])
    ref, r = report["runs"]
    assert report["reference"] == "compress_grpo" and ref["reference"] and not r["reference"]
    assert ref["acc_diff_vs_ref"] is None and ref["token_ratio_vs_ref"] is None
    # matched: a (1, 50→5 tokens), b (1, 100→4), c (0→1, 150→6): difference (0 + 0 + 1) / 3,
    # ratio (5 + 4 + 6) / (50 + 100 + 150)
    assert r["acc_diff_vs_ref"] == pytest.approx(1 / 3)
    assert r["acc_diff_vs_ref_ci"] == list(paired_difference_ci([1, 1, 0], [1, 1, 1])[1:])
    assert r["token_ratio_vs_ref"] == pytest.approx(15 / 300)
    assert r["token_ratio_vs_ref_ci"] == list(paired_ratio_ci([50, 100, 150], [5, 4, 6])[1:])
    assert ref["truncation_rate"] == 0.25 and r["truncation_rate"] == 0.5
    assert ref["redundancy_rate"] == pytest.approx(0.5) and r["redundancy_rate"] == pytest.approx(0.25)
    # both start from the reference's start evaluation (0.25), at 4000 and 2500 generated tokens
    assert ref["acc_start"] == r["acc_start"] == 0.25
    assert ref["generated_tokens"] == 4000 and r["generated_tokens"] == 2500
    assert ref["gain_per_million_tokens"] == pytest.approx((0.5 - 0.25) / 0.004)
    assert r["gain_per_million_tokens"] == pytest.approx((0.75 - 0.25) / 0.0025)
    assert ref["acc_end_ci"] == list(bootstrap_ci([1, 1, 0, 0]))
    # frontier: a counts from 64 on, b from 128; d (200) was cut off and c is wrong
    assert report["budget"] == 200
    # four budgets per doubling up to the 200-token budget; b (100 tokens, correct) counts from 108 on
    assert report["accuracy_at_budget"]["compress_grpo"] == at(0.25, 0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 0.5)
    assert report["accuracy_at_budget"][START] == at(0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25)
    assert report["accuracy_at_budget"]["compress_fgo"] == at(0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5)  # c (6) cut off
    table = write_report(report, tmp_path, "cmd")
    assert "| compress_grpo (grpo) | 0 |" in table and "| ref |" in table and "+0.333 [" in table
    assert "Pooled over seeds" not in table and "Same start, checked" in table  # one seed: no pooled table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][1]["token_ratio_vs_ref"] == pytest.approx(0.05) and "_end" not in saved["runs"][1]
    assert saved["accuracy_at_budget"] == report["accuracy_at_budget"]


def test_runs_without_truncated_scores_or_generated_tokens_report_a_dash(tmp_path):
    grpo, fgo = plan_runs(CONFIGS, tmp_path, FAKE)
    write_run(grpo.cfg, ev([1, 0, 1, 0], [50, 100, 200, 200]), generated=None)  # no start evaluation either
    write_run(fgo.cfg, ev([1, 1, 0, 0], [50, 100, 200, 200]), generated=(10, None))  # one step lacks it
    report = build_report([(r.method, r.cfg) for r in (grpo, fgo)])
    for r in report["runs"]:
        for key in ("truncation_rate", "redundancy_rate", "generated_tokens", "gain_per_million_tokens", "acc_start"):
            assert r[key] is None, key
    assert report["runs"][1]["acc_diff_vs_ref"] == 0.0
    assert START not in report["accuracy_at_budget"]
    # without `truncated` every response counts as finished: c (200 tokens, correct) counts at 200
    assert report["accuracy_at_budget"]["compress_grpo"] == at(0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.5)
    table = write_report(report, tmp_path, "cmd")
    row = next(line for line in table.splitlines() if line.startswith("| compress_fgo"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    # truncated, redundancy, generated tokens, gain per million tokens
    assert [cells[i] for i in (6, 7, 11, 12)] == ["–"] * 4 and cells[2].startswith("– →")
    assert (tmp_path / "accuracy_at_budget.png").stat().st_size > 0


def two_seeds(out):
    """Fake finished runs of both methods at seeds 0 and 1 (folders compress_*, compress_*-seed1)."""
    plan = plan_runs(CONFIGS, out, FAKE, seeds=[0, 1])
    data = {("compress_grpo", 0): (ev([1, 1, 0, 0], [50, 100, 150, 200], truncated=[False, False, False, True]),
                                   ev([0, 0, 0, 1], [30] * 4, truncated=[False] * 4), (1000, 1000)),
            ("compress_fgo", 0): (ev([1, 1, 1, 0], [40, 60, 100, 200], truncated=[False, False, False, True]),
                                  None, (1000, 1000)),
            ("compress_grpo", 1): (ev([1, 0, 0, 0], [60, 100, 150, 200], truncated=[False] * 4),
                                   ev([0, 0, 0, 0], [30] * 4, truncated=[False] * 4), (2000, 2000)),
            ("compress_fgo", 1): (ev([1, 1, 0, 0], [50, 50, 100, 200], truncated=[False] * 4), None, (3000, 1000))}
    for r in plan:
        end, start, generated = data[r.method, r.seed]
        write_run(r.cfg, end, start, generated)
    return plan


def test_pooled_over_seeds_matches_hand_computation(tmp_path):
    plan = two_seeds(tmp_path)
    report = build_report([(r.method, r.cfg) for r in plan])
    assert [r["run"] for r in report["runs"]] == ["compress_grpo", "compress_fgo", "compress_grpo-seed1",
                                                 "compress_fgo-seed1"]
    ref, p = report["pooled"]
    assert p["seeds"] == [0, 1] and p["n_seeds"] == 2 and ref["reference"] and ref["acc_diff_vs_ref"] is None
    assert p["acc_end"] == pytest.approx((0.75 + 0.5) / 2)
    assert p["acc_end_ci"] == list(bootstrap_ci([1, 1, 0.5, 0]))  # per-problem mean over the seeds
    assert p["tokens_end"] == pytest.approx(100) and p["tokens_end_ci"] == list(bootstrap_ci([45, 55, 100, 200]))
    # same-seed differences: seed 0 (0, 0, +1, 0), seed 1 (0, +1, 0, 0): per problem 0, .5, .5, 0
    assert p["acc_diff_vs_ref"] == pytest.approx(0.25) and p["acc_diff_vs_ref_ci"] == list(bootstrap_ci([0, .5, .5, 0]))
    assert p["token_ratio_vs_ref"] == pytest.approx(800 / 1010)
    assert p["token_ratio_vs_ref_ci"] == list(paired_ratio_ci([110, 200, 300, 400], [90, 110, 200, 400])[1:])
    assert p["truncation_rate"] == pytest.approx(0.125) and p["redundancy_rate"] is None
    # gains per seed against that seed's start: (.75 - .25) / .002 and (.5 - 0) / .004
    assert p["gain_per_million_tokens"] == pytest.approx((250 + 125) / 2)
    # frontier with the seeds' responses as samples of each problem: a, b count from 64 on, c once from 108
    assert report["accuracy_at_budget"]["compress_fgo"] == at(0.5, 0.5, 0.5, 0.625, 0.625, 0.625, 0.625, 0.625)
    assert report["accuracy_at_budget"][START] == at(0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125)
    # a method missing a seed is pooled over the seeds it has
    partial = build_report([(r.method, r.cfg) for r in plan[:3]])["pooled"][1]
    assert partial["seeds"] == [0] and partial["n_seeds"] == 1 and partial["acc_diff_vs_ref"] == pytest.approx(0.25)
    assert partial["acc_end"] == 0.75 and partial["gain_per_million_tokens"] == pytest.approx(250)


def test_experiment_with_seeds_reuses_finished_runs_and_writes_both_tables(tmp_path, monkeypatch, capsys):
    two_seeds(tmp_path)

    def no_training(cfg):
        raise AssertionError(f"{cfg.trainer.output_dir} is finished and must be reused")

    monkeypatch.setattr("launch.experiment.train_run", no_training)
    args = ["experiment", *CONFIGS, "--out", str(tmp_path), *[a for o in FAKE for a in ("--set", o)], "--seeds", "0",
            "1"]
    assert main(args) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == 4
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"reference", "seeds", "runs", "pooled", "budget", "accuracy_at_budget", "steps",
                          "redundancy_curves", "sampled"}
    assert saved["steps"] is None  # arith held-out rows: no step counts
    assert saved["sampled"] is None  # no --sampled, no samples in the folders
    assert saved["seeds"] == [0, 1] and len(saved["runs"]) == 4 and len(saved["pooled"]) == 2
    table = (tmp_path / "results.md").read_text()
    assert "--seeds 0 1" in table and "Pooled over seeds" in table and "| 0, 1 (2) |" in table
    assert "Seed 0: Same start, checked" in table and "Seed 1: Same start, checked" in table
    assert "10,000 resamples" in table
    for png in ("compression.png", "accuracy_at_budget.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_a_different_step1_at_one_seed_is_flagged(tmp_path):
    plan = plan_runs(CONFIGS, tmp_path, FAKE, seeds=[0, 1])
    for r in plan:
        odd = r.method == "compress_fgo" and r.seed == 1
        write_run(r.cfg, ev([1, 0, 0, 0], [50] * 4), step1=(31.0 if odd else 30.0, 0.25))
    table = write_report(build_report([(r.method, r.cfg) for r in plan]), tmp_path, "cmd")
    assert "Seed 0: Same start, checked" in table and "Seed 1: WARNING" in table


def test_accuracy_at_budget_plot_draws_every_curve(tmp_path, monkeypatch):
    drawn = []
    save = eval.plots._save_accuracy_plot

    def spy(fig, ax, title, path):
        drawn.append([(line.get_color(), line.get_marker(), line.get_linestyle()) for line in ax.get_lines()])
        return save(fig, ax, title, path)

    monkeypatch.setattr(eval.plots, "_save_accuracy_plot", spy)
    for n in (6, 12):
        curves = {f"m{i}": {"64": i / 20, "128": i / 15} for i in range(n)}
        eval.plots.accuracy_at_budget(curves, "x", tmp_path / f"{n}.png")
        assert len(drawn[-1]) == n and len(set(drawn[-1])) == n  # each line drawn and distinguishable


@pytest.mark.slow
def test_experiment_trains_reports_and_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["experiment", *CONFIGS, "--out", str(out), *[a for o in TINY for a in ("--set", o)]]
    try:
        assert main(args) == 0
        saved = json.loads((out / "results.json").read_text())
        results = {r["method"]: r for r in saved["runs"]}
        assert saved["reference"] == "compress_grpo" and saved["seeds"] == [0]
        assert [p["method"] for p in saved["pooled"]] == ["compress_grpo", "compress_fgo"]
        assert results["compress_grpo"]["acc_diff_vs_ref"] is None and results["compress_fgo"]["acc_diff_vs_ref"] == 0
        # The random tiny model is never right: GRPO's groups all carry zero advantage, FGO's none.
        assert results["compress_grpo"]["zero_adv_groups"] == 1.0
        assert results["compress_fgo"]["zero_adv_groups"] == 0.0
        for r in results.values():
            assert r["n_eval"] == 4 and r["acc_end"] == 0.0 and r["acc_end_ci"] == [0.0, 0.0]
            assert r["tokens_end_ci"][0] <= r["tokens_end"] <= r["tokens_end_ci"][1]
        table = (out / "results.md").read_text()
        assert "Same start, checked" in table and "compress_fgo (fgo)" in table
        assert results["compress_fgo"]["acc_start"] == results["compress_grpo"]["acc_start"] == 0.0
        assert (out / "compression.png").stat().st_size > 10_000
        assert set(saved["accuracy_at_budget"]) == {START, "compress_grpo", "compress_fgo"}
        assert (out / "accuracy_at_budget.png").stat().st_size > 10_000
        before = (out / "compress_fgo/metrics.jsonl").stat().st_mtime_ns
        capsys.readouterr()
        assert main(args) == 0  # a second call reuses both finished runs
        assert capsys.readouterr().out.count("reusing the finished run") == 2
        assert (out / "compress_fgo/metrics.jsonl").stat().st_mtime_ns == before
    finally:
        ray.shutdown()

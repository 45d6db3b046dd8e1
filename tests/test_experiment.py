"""`reasonrl experiment`: methods from the same start, one table and one figure."""
import json
from pathlib import Path

import pytest
import ray

from launch.cli import main
from launch.experiment import load_configs
from rl.config import ConfigError

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


@pytest.mark.slow
def test_experiment_trains_reports_and_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["experiment", *CONFIGS, "--out", str(out), *[a for o in TINY for a in ("--set", o)]]
    try:
        assert main(args) == 0
        results = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
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
        before = (out / "compress_fgo/metrics.jsonl").stat().st_mtime_ns
        capsys.readouterr()
        assert main(args) == 0  # a second call reuses both finished runs
        assert capsys.readouterr().out.count("reusing the finished run") == 2
        assert (out / "compress_fgo/metrics.jsonl").stat().st_mtime_ns == before
    finally:
        ray.shutdown()

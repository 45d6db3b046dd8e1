from pathlib import Path

import pytest
import yaml

from launch.cli import main
from rl.config.schema import Config, ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_configs_validate():
    for path in (ROOT / "configs").glob("*.yaml"):
        # The schema, not this machine: the GPU recipes (vllm) validate here too (their run would fail here).
        cfg = load_config(path, check_environment=False)
        assert cfg.trainer.output_dir == f"runs/{path.stem}"


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs/demo.yaml", ["trainer.max_steps=30", "rollout.temperature=0.8",
                                                   "learner.deepspeed={zero_optimization: {overlap_comm: true}}"])
    assert cfg.trainer.max_steps == 30 and cfg.rollout.temperature == 0.8
    assert cfg.learner.deepspeed == {"zero_optimization": {"overlap_comm": True}}
    assert Config().rollout.temperature == 1.0  # defaults untouched


def test_weight_sync_default_is_resolved_and_written_to_the_run_config():
    assert Config().weight_sync.mode == "collective"
    assert load_config(ROOT / "configs/demo.yaml", ["weight_sync.mode=object_store"]).weight_sync.mode == "object_store"
    assert yaml.safe_load(dump_config(Config()))["weight_sync"]["mode"] == "collective"


@pytest.mark.parametrize("override, key, hint", [
    ("rollout.temprature=0.8", "rollout.temprature", "did you mean 'temperature'"),
    ("learner.zero_stage=1", "learner.zero_stage", "0, 2 or 3"),
    ("rollout.group_size=many", "rollout.group_size", "integer"),
    ("reward.accuracy=exact_match", "reward.accuracy", "must be one of"),
    ("reward.functions=[{fn: nope}]", "reward.functions.0.fn", "known names: boxed_format"),
    ("reward.functions=[{fn: 'no/such/file.py:f'}]", "reward.functions.0.fn", "file not found"),
    ("reward.functions=[{fn: 'nosuchmodule:f'}]", "reward.functions.0.fn", "no module named"),
    ("algorithm.mini_batches=3", "algorithm.mini_batches", "must divide"),
    ("trainer.max_steps.x=1", "trainer.max_steps", "not a section"),
    ("nosuchsection.a=1", "nosuchsection", "unknown key"),
])
def test_bad_keys_name_the_dotted_path(override, key, hint):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/tiny.yaml", [override])
    assert f"'{key}'" in str(err.value) and hint in str(err.value)


def test_yaml_typo_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rollout": {"group_sise": 4}}))
    with pytest.raises(ConfigError, match=r"'rollout.group_sise'.*group_size"):
        load_config(bad)


def test_cli_rejects_bad_config_before_starting_ray(capsys):
    import ray

    assert main(["train", str(ROOT / "configs/tiny.yaml"), "rollout.temprature=0.8"]) == 2
    assert "rollout.temprature" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert main(["train", "does/not/exist.yaml"]) == 2


def test_cli_reports_input_errors_in_one_line(tmp_path, capsys):
    assert main(["train", str(ROOT / "configs/tiny.yaml"), f"data.train={tmp_path}/missing.jsonl",
                 f"trainer.output_dir={tmp_path}/run"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["train", str(ROOT / "configs/tiny.yaml"), f"model.path={tmp_path}",
                 f"trainer.output_dir={tmp_path}/run"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2


def test_existing_run_folder_is_never_mixed_into(tmp_path, capsys):
    from rl.trainer import prepare_output_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"trainer.output_dir={run}"])
    with pytest.raises(FileExistsError, match="--resume"):
        prepare_output_dir(cfg, resume=False)
    assert main(["train", str(ROOT / "configs/tiny.yaml"), f"trainer.output_dir={run}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    cfg.trainer.overwrite = True
    assert prepare_output_dir(cfg, resume=False) == run and not (run / "metrics.jsonl").exists()
    (moved,) = tmp_path.glob("run.old-*")
    assert (moved / "metrics.jsonl").read_text() == '{"step": 1}\n'  # moved aside, not deleted


def test_resume_refuses_another_seed_before_starting_anything(tmp_path, capsys):
    import ray

    from rl.store import checkpoint

    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"trainer.output_dir={run}"])
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    checkpoint.commit(checkpoint.begin(run, 1), 1, {"sampler": {}, "seed": 0}, keep=2)
    assert main(["train", "--resume", str(run), "trainer.seed=5"]) == 2
    assert "trainer.seed" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_fgo_defaults_and_std_scaling_resolution():
    from rl.config.schema import load_config

    assert load_config(None, []).algorithm.scale_by_std is True  # GRPO
    fgo = load_config(None, ["algorithm.name=fgo"]).algorithm
    assert (fgo.scale_by_std, fgo.fgo.alpha, fgo.fgo.beta, fgo.fgo.entropy) == (False, 0.01, 1.0, "sampled_token_sum")
    assert load_config(None, ["algorithm.name=fgo", "algorithm.scale_by_std=true"]).algorithm.scale_by_std is True
    with pytest.raises(ConfigError, match="algorithm.fgo.entropy"):
        load_config(None, ["algorithm.name=fgo", "algorithm.fgo.entropy=full"])
    with pytest.raises(ConfigError, match=r"algorithm.fgo.alpah.*did you mean 'alpha'"):
        load_config(None, ["algorithm.fgo.alpah=1"])


def test_vllm_speculative_config_is_refused_where_the_update_reads_rollout_logprobs():
    """vLLM's speculative decoding returns wrong log-probs for some drafted tokens (tests/test_vllm_speculative.py),
    so it is passed through only where the learner's own log-probs are pi_old."""
    base = ["rollout.backend=vllm", "rollout.vllm={speculative_config: {method: ngram, num_speculative_tokens: 3}}"]
    cfg = load_config(ROOT / "configs/tiny.yaml", base, check_environment=False)
    assert cfg.rollout.vllm["speculative_config"]["method"] == "ngram"  # on-policy grpo: passed through
    for extra, why in (("trainer.max_staleness=1", "trainer.max_staleness"), ("algorithm.mini_batches=2",
                       "algorithm.mini_batches > 1"), ("algorithm.tis_cap=2.0", "algorithm.tis_cap"),
                       ("algorithm.name=fgo", "fgo")):
        with pytest.raises(ConfigError) as err:
            load_config(ROOT / "configs/tiny.yaml", [*base, extra], check_environment=False)
        assert "'rollout.vllm.speculative_config'" in str(err.value) and why in str(err.value)

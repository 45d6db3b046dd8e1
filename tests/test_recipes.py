"""The GPU recipes (configs/recipe_*_math.yaml) and `reasonrl train --dry-run`: both recipes load and validate here,
the dry run prints the config and the placement plan without starting Ray or downloading anything, turns what this
machine lacks (vllm, GPUs) into warnings, and a real run still fails on them. Also data.train_limit."""
import importlib.util
import json
from pathlib import Path

import pytest

from launch.cli import main
from launch.dry_run import placement_plan, run_roles
from rl.config.schema import ConfigError, dump_config, load_config
from rl.cluster.placement import reservations

ROOT = Path(__file__).resolve().parent.parent
RECIPES = [ROOT / "configs" / "recipe_fgo_math.yaml", ROOT / "configs" / "recipe_grpo_math.yaml"]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_dry_run_of_the_recipe(recipe, capsys, monkeypatch, tmp_path):
    import ray
    import torch
    from huggingface_hub import constants

    work, hub = tmp_path / "cwd", tmp_path / "hub"
    work.mkdir()
    monkeypatch.chdir(work)  # nothing may be written: the run folder is relative to here
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # an empty hub cache: the model is not in it
    assert main(["train", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not ray.is_initialized() and not any(work.iterdir()) and not hub.exists()
    # What this machine lacks, as warnings: the two GPUs (where it has none) and the model not yet downloaded.
    gpu = "warning: the run needs 2 GPU(s) and this machine has 0: a real run here would wait for resources"
    assert (gpu in out) == (torch.cuda.device_count() < 2), out
    assert "warning: model.path 'Qwen/Qwen2.5-Math-1.5B' is not in the local hub cache: a real run downloads it " \
           "first" in out
    # With the model in the hub cache (its layout: refs/main names a snapshot holding config.json) that one goes.
    cached = hub / "models--Qwen--Qwen2.5-Math-1.5B"
    (cached / "snapshots" / "abc123").mkdir(parents=True)
    (cached / "snapshots" / "abc123" / "config.json").write_text("{}")
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("abc123")
    assert main(["train", str(recipe), "--dry-run"]) == 0
    again = capsys.readouterr().out
    assert "hub cache" not in again and (gpu in again) == (gpu in out)
    assert "path: Qwen/Qwen2.5-Math-1.5B" in out and "train_limit: 3200" in out  # the resolved config
    assert f"algorithm: {recipe.stem.split('_')[1]}; steps: 800 x 4 prompts x 8 samples of <= 2048 tokens" in out
    assert "DeepSpeed ZeRO-2, bf16=True, lr 1e-05" in out
    assert "roles started: rollout, reward, learner" in out
    assert 'rollout: 1 actor(s), each num_cpus 2, num_gpus 1; placement group of 1 x {"CPU": 2.0, "GPU": 1.0}' in out
    assert 'learner: 1 actor(s), each num_cpus 2, num_gpus 1; placement group of 1 x {"CPU": 2.0, "GPU": 1.0}' in out
    assert "colocation: off; GPUs in all: 2" in out and "math500, aime24, amc23, minerva" in out
    if not HAS_VLLM:
        assert "warning: rollout.backend: vllm is not installed here" in out


@pytest.mark.skipif(HAS_VLLM, reason="with vllm installed this would start a real run")
def test_a_real_run_of_the_recipe_still_fails_without_vllm(capsys):
    assert main(["train", str(RECIPES[0])]) == 2
    assert "rollout.backend': vllm is not installed here" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="vllm is not installed"):
        load_config(RECIPES[0])
    load_config(RECIPES[0], check_environment=False)  # the same file is valid apart from this machine


def test_the_two_recipes_differ_only_in_the_algorithm():
    fgo, grpo = (load_config(p, check_environment=False).model_dump() for p in RECIPES)
    assert fgo["algorithm"]["name"] == "fgo" and grpo["algorithm"]["name"] == "grpo"
    for cfg in (fgo, grpo):
        cfg.pop("algorithm")
        cfg["trainer"].pop("output_dir")  # runs/<config name>
    assert fgo == grpo
    assert fgo["trainer"]["eval_benchmarks"] == ["math500", "aime24", "amc23", "minerva"]
    assert (fgo["rollout"]["group_size"], fgo["rollout"]["prompts_per_step"], fgo["learner"]["zero_stage"]) == (8, 4, 2)


def test_dry_run_of_the_cpu_demo_has_no_placement_groups_and_no_warnings(capsys):
    assert main(["train", str(ROOT / "configs" / "demo.yaml"), "--dry-run", "trainer.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "held-out accuracy on arith" in out
    assert out.count("no placement group (empty bundle") == 3
    assert "# environment: nothing missing here" in out and "warning:" not in out


def test_placement_plan_with_colocation_and_custom_resources():
    cfg = load_config(None, ["placement.colocate=true", "learner.num_ranks=2", "rollout.num_workers=2",
                             "learner.num_gpus_per_rank=1", "rollout.num_gpus=0.5", "placement.reward.num_cpus=1",
                             "placement.reward.resources={node_b: 0.01}", "placement.reward.strategy=SPREAD"])
    roles, _ = run_roles(cfg)
    assert reservations(cfg, roles) == {"reward": {"CPU": 1.0, "node_b": 0.01}, "learner": {"GPU": 1.5}}
    plan = placement_plan(cfg, roles)
    assert plan["colocate"] and plan["total_gpus"] == 3  # each learner bundle holds its rollout worker too
    assert plan["roles"]["rollout"]["placement_group"].startswith("in the learner's bundles")
    assert plan["roles"]["reward"]["placement_group"] == {"bundles": 1, "bundle": {"CPU": 1.0, "node_b": 0.01},
                                                          "strategy": "SPREAD"}
    json.dumps(plan)  # plain data


def test_config_errors_still_fail_a_dry_run(capsys):
    assert main(["train", str(RECIPES[0]), "--dry-run", "rollout.temprature=1"]) == 2
    assert "did you mean 'temperature'" in capsys.readouterr().err


def test_train_limit_takes_the_first_rows(tmp_path):
    from rl.data.prompts import prepare_prompts

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"problem": f"q{i}", "answer": str(i)}) + "\n" for i in range(10)))

    class Tok:  # render_prompt without a chat template, and a token count per prompt
        chat_template = None

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    cfg = load_config(None, [f"data.train={data}", "data.train_limit=4"])
    rows, stats = prepare_prompts(cfg, Tok(), cfg.data.train, "train", limit=cfg.data.train_limit)
    assert [r["answer"] for r in rows] == ["0", "1", "2", "3"] and stats["limited_to"] == 4
    # The wiring: what a run's step draws from (Step.items, as rl/trainer.py calls it) takes the limit from the
    # config, for the policy-gradient steps and for SFT (whose examples are prompt/completion rows).
    from rl.models import load_tokenizer, resolve_model
    from rl.steps import make_step

    for extra in ([], ["algorithm.dynamic_sampling=true"]):
        rows, stats = make_step(load_config(None, [f"data.train={data}", "data.train_limit=4", *extra])).items(Tok())
        assert [r["answer"] for r in rows] == ["0", "1", "2", "3"] and stats["limited_to"] == 4
        rows, _ = make_step(load_config(None, [f"data.train={data}", *extra])).items(Tok())
        assert len(rows) == 10
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(10)))
    tok = load_tokenizer(resolve_model("tiny:llama"))
    for limit, n in (("data.train_limit=3", 3), ("data.train_limit=null", 10)):
        examples, _ = make_step(load_config(None, ["algorithm.name=sft", f"data.train={sft}", f"data.eval={sft}",
                                                   limit])).items(tok)
        assert len(examples) == n
    assert "train_limit: 4" in dump_config(cfg)
    with pytest.raises(ConfigError, match="data.train_limit"):
        load_config(None, ["data.train_limit=0"])


def test_dry_run_names_a_model_folder_that_does_not_exist_yet(capsys, monkeypatch, tmp_path):
    # The testbed RL configs start from an SFT checkpoint that a dry run may precede: a warning, not a hub lookup.
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(ROOT / "configs" / "testbed_grpo.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "warning: model.path 'runs/testbed_sft/checkpoint-final' does not exist yet" in out
    assert "hub cache" not in out

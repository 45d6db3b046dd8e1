"""TODO / DPO end to end on the tiny model with 2 DeepSpeed ranks: offline (preference file, checkpoint, resume,
`pref-eval` agreeing with the in-training evaluation) and online (pairs built from verifier-scored rollouts)."""
import json
from pathlib import Path

import pytest
import ray

from rl.config.schema import load_config
from rl.trainer import train

ROOT = Path(__file__).resolve().parent.parent
ODD = str(ROOT / "tests/fixtures/preference_rewards.py") + ":odd_length"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    ray.shutdown()


def _write_pairs(path: Path, n: int, start: int) -> str:
    rows = []
    for i in range(start, start + n):
        prompt = f"What is {i} + {i}?"
        if i % 3 == 2:  # a tie: two equally good answers
            rows.append({"prompt": prompt, "chosen": f"It is {2 * i}.", "rejected": f"{2 * i}", "tie": True})
        else:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": f"{i} + {i} = {2 * i}"}],
                         "rejected": [{"role": "assistant", "content": f"{i} + {i} = {2 * i + 1}"}], "tie": False})
    rows.append({"prompt": "broken row", "chosen": "x", "tie": False})  # no `rejected`: skipped and counted
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(path: Path, event: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows if event is None else [r for r in rows if r.get("event") == event]


def _offline(tmp_path: Path, out: Path, *extra: str):
    return load_config(ROOT / "configs/tiny.yaml", [
        f"trainer.output_dir={out}", "algorithm.name=todo", "algorithm.todo.beta=0.5",
        f"algorithm.todo.train_data={_write_pairs(tmp_path / 'train.jsonl', 6, 0)}",
        f"algorithm.todo.eval_data={_write_pairs(tmp_path / 'eval.jsonl', 4, 100)}",
        "algorithm.todo.pairs_per_step=3", "learner.num_ranks=2", "learner.zero_stage=2",
        "learner.micro_batch_size=2", "learner.lr=1e-3", "logging.progress=false", *extra])


def test_offline_todo_two_ranks_and_pref_eval(tmp_path):
    from launch.preference_tools import pref_eval

    out = tmp_path / "run"
    cfg = _offline(tmp_path, out, "trainer.max_steps=2", "data.eval_size=2")
    summary = train(cfg)
    assert summary["data"]["skipped_no_rejected"] == 1 and summary["data"]["ties"] == 2
    assert "eval_start" in summary and "eval_end" in summary  # task accuracy through the rollout workers

    start, end = summary["pref_eval_start"], summary["pref_eval_end"]
    # policy = reference at the start: every margin is 0, and 0 is never a correct prediction
    assert abs(start["mu_mean"]) < 1e-6 and start["tobt_acc"] == 0.0 and start["sign_acc"] == 0.0
    assert abs(end["mu_mean"]) > 1e-4 and end["pairs"] == 4 and end["ties"] == 1

    metrics = _rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["pairs"] == 3 and m["loss"] > 0 and m["grad_norm"] > 0
    assert abs(metrics[1]["margin"]) > 0  # step 2 trains a policy that already moved away from the reference

    # The CLI's Ray-free evaluation of checkpoint-final reproduces the in-training one.
    local = pref_eval(str(out))
    for key in ("mu_mean", "tobt_acc", "sign_acc", "tobt_acc_tie"):
        assert local[key] == pytest.approx(end[key], rel=1e-4, abs=1e-6), key

    assert (out / "checkpoint-final").exists()


def test_offline_resume_continues_the_pair_order(tmp_path):
    """1 step, then resumed to 2: the pair order goes on, and step 2 trains from the saved weights and optimizer
    state: its metrics are those of the same 2 steps run in one go (a resume from the start weights differs)."""
    full = tmp_path / "full"
    train(_offline(tmp_path, full, "trainer.max_steps=2", "data.eval_size=0", "trainer.save_every=0"))
    out = tmp_path / "run"
    train(_offline(tmp_path, out, "trainer.max_steps=1", "data.eval_size=0", "trainer.save_every=1"))
    resumed = train(load_config(out / "config.yaml", [f"trainer.output_dir={out}", "trainer.max_steps=2"]),
                    resume=True)
    assert resumed["start_step"] == 1 and "pref_eval_start" not in resumed
    metrics, reference = _rows(out / "metrics.jsonl"), _rows(full / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [m["step"] for m in reference] == [1, 2]
    for key in ("loss", "grad_norm", "margin", "pairs"):
        assert [m[key] for m in metrics] == pytest.approx([m[key] for m in reference], rel=1e-4, abs=1e-6), key
    assert abs(reference[1]["margin"]) > 0  # step 2's policy had moved from the reference: the weights matter
    state = json.loads((out / "checkpoints/step-000002/trainer_state.json").read_text())
    assert state["step"] == 2 and state["sampler"] == {"epoch": 1, "position": 0, "num_rows": 6}  # 2 x 3 pairs


def test_online_todo_two_ranks_zero3_builds_pairs_from_the_verifier(tmp_path):
    out = tmp_path / "online"
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"trainer.output_dir={out}", "algorithm.name=todo", "algorithm.todo.online=true", "algorithm.todo.beta=0.5",
        "algorithm.todo.pairs_per_group=3", f"algorithm.todo.eval_data={_write_pairs(tmp_path / 'eval.jsonl', 3, 50)}",
        f"reward.functions=[{{fn: '{ODD}'}}]", f"reward.accuracy={ODD}", "rollout.group_size=4",
        "learner.num_ranks=2", "learner.zero_stage=3", "learner.micro_batch_size=2", "learner.lr=1e-3",
        "trainer.eval_at_start=false", "logging.progress=false"])
    train(cfg)
    metrics = _rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    kinds = ("pairs/preference", "pairs/shorter", "pairs/tie_correct", "pairs/tie_incorrect")
    for m in metrics:
        assert sum(m[k] for k in kinds) == m["pairs_total"] == m["pairs"]
        assert 0 < m["pairs_total"] <= 2 * 3  # 2 prompts x at most pairs_per_group
        assert m["loss"] > 0 and m["grad_norm"] > 0
    assert "pref_eval/tobt_acc" in metrics[-1]
    evals = _rows(out / "events.jsonl", "pref_eval")
    assert [e["step"] for e in evals] == [0, 2] and abs(evals[0]["mu_mean"]) < 1e-6


def test_offline_todo_reserves_its_placement_before_any_actor(tmp_path, monkeypatch):
    """Offline TODO goes through the same lifecycle as GRPO, so `placement.*` binds it too: a learner placement the
    cluster cannot hold fails naming the role, and no actor or metrics row ever appears. (Roles pinned to nodes of
    a real two-node cluster: tests/test_cluster.py.)"""
    from rl.config.schema import ConfigError

    monkeypatch.setattr("rl.cluster.placement.READY_TIMEOUT_S", 5.0)  # the cluster has no such resource: no need to wait
    out = tmp_path / "run"
    cfg = _offline(tmp_path, out, "trainer.max_steps=1", "data.eval_size=0",
                   "placement.learner.resources={no_such_node: 1}")
    with pytest.raises(ConfigError, match="placement.learner"):
        train(cfg)
    assert not (out / "metrics.jsonl").exists()

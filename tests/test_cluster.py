"""`reasonrl submit` on a real two-node Ray cluster (both nodes on this machine, on loopback): placement, collective
weight sync across nodes, a dead rollout worker, a dead learner rank and resume, and the watchdog.

One cluster serves the module (starting it takes ~30 s); every job is the tiny config.
"""
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import ray.job_submission  # noqa: F401  (imported here, Ray's log handler binds to the session's stderr)
import yaml

from launch.cli import main
from launch.submit import client, wait
from rl.store import checkpoint
from tests.ray_cluster import LocalCluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests/fixtures/rewards.py"
# Learner on node_a; rollout and reward workers on node_b, weights broadcast between them over gloo.
PINNED = ["placement.learner.resources={node_a: 0.01}", "placement.rollout.resources={node_b: 0.01}",
          "placement.reward.resources={node_b: 0.01}", "weight_sync.mode=collective"]
QUIET = ["logging.progress=false", "logging.plots=false", "logging.tensorboard=false", "trainer.eval_at_start=false",
         "trainer.eval_at_end=false"]


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster([{"node_a": 1}, {"node_b": 1}])
    try:
        yield c.start()
    finally:
        c.remove()


def _submit(cluster, capsys, *args) -> str:
    assert main(["submit", *args, "--address", cluster.dashboard_url]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def _run_args(out: Path, *extra: str) -> list[str]:
    return [str(ROOT / "configs/tiny.yaml"), f"trainer.output_dir={out}",
            f"reward.functions=[{{fn: '{FIXTURE}:char_length'}}]", f"reward.accuracy={FIXTURE}:char_length",
            *QUIET, *extra]


def _events(out: Path, name: str) -> list[dict]:
    path = out / "events.jsonl"
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == name]


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _kill_after_step(cluster, job_id: str, out: Path, role: str, step: int) -> int:
    """SIGKILL the first actor of `role` (pid from the run's actor map) once `step` is logged; returns the pid."""
    jc = client(cluster.dashboard_url)
    deadline = time.monotonic() + 600
    while not (_steps(out) and _steps(out)[-1] >= step):
        status = str(jc.get_job_status(job_id).value)
        assert status not in ("SUCCEEDED", "FAILED", "STOPPED"), (status, jc.get_job_logs(job_id)[-3000:])
        assert time.monotonic() < deadline, "the job never reached the step"
        time.sleep(0.2)
    pid = _events(out, "actors")[-1][role][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_submit_places_roles_on_their_nodes_and_survives_a_dead_rollout_worker(cluster, tmp_path, capsys):
    out = tmp_path / "run"
    job = _submit(cluster, capsys, *_run_args(out, "trainer.max_steps=6", "trainer.save_every=3", *PINNED))
    _kill_after_step(cluster, job, out, "rollout", 1)
    jc = client(cluster.dashboard_url)
    assert wait(jc, job) == 0
    logs = jc.get_job_logs(job)
    assert _steps(out) == [1, 2, 3, 4, 5, 6]  # the step with the dead worker completed, and the rest
    assert "re-issuing its request" in logs or "died during weight sync" in logs
    assert "weight sync: gloo group of learner rank 0 + 1 rollout workers" in logs

    nodes = cluster.node_ids()
    actors = _events(out, "actors")[0]
    assert [a["node"] for a in actors["learner"]] == [nodes["node_a"]]
    assert [a["node"] for a in actors["rollout"]] == [nodes["node_b"]]
    assert [a["node"] for a in actors["reward"]] == [nodes["node_b"]]
    assert "node_b" in actors["nodes"][nodes["node_b"]]["resources"]  # the map names what it refers to

    assert main(["status", job, "--address", cluster.dashboard_url]) == 0
    assert f"{job} SUCCEEDED run_dir={out}" in capsys.readouterr().out


def test_dead_learner_rank_stops_cleanly_then_submit_resume_continues_without_replay(cluster, tmp_path, capsys):
    out = tmp_path / "run"
    job = _submit(cluster, capsys, *_run_args(out, "trainer.max_steps=6", "trainer.save_every=1"))
    _kill_after_step(cluster, job, out, "learner", 2)
    jc = client(cluster.dashboard_url)
    assert wait(jc, job) == 3  # the driver's exit code: a worker died
    logs = jc.get_job_logs(job)
    assert "stopped because a worker died" in logs and f"--resume {out}" in logs
    last = checkpoint.latest(out)
    assert last is not None and _steps(out)[-1] < 6
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(last / "model")  # intact

    assert main(["submit", "--resume", str(out), "--wait", "--address", cluster.dashboard_url]) == 0
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    # Resume restored the data order: exactly the prompts of an uninterrupted run, none replayed, none skipped.
    from rl.data.loading import PromptSampler, load_rows

    cfg = yaml.safe_load((out / "config.yaml").read_text())  # names the staged reward module: not loadable here
    rows, _ = load_rows("arith", "train", arith=cfg["data"]["arith"])
    sampler = PromptSampler(rows, seed=cfg["trainer"]["seed"], shuffle=cfg["data"]["shuffle"])
    expected = [[r["id"] for r in sampler.next_batch(cfg["rollout"]["prompts_per_step"])] for _ in range(6)]
    logged = {e["step"]: e["ids"] for e in _events(out, "prompts")}
    assert [logged[s] for s in range(1, 7)] == expected


def test_watchdog_fails_a_run_whose_reward_never_returns(cluster, tmp_path, capsys):
    stuck = ROOT / "tests/fixtures/cluster_rewards.py"
    args = [str(ROOT / "configs/tiny.yaml"), f"trainer.output_dir={tmp_path / 'run'}",
            f"reward.functions=[{{fn: '{stuck}:sleep_forever'}}]", f"reward.accuracy={stuck}:sleep_forever",
            "reward.timeout_seconds=null", "trainer.watchdog_seconds=30", *QUIET, *PINNED]
    assert main(["submit", *args, "--wait", "--address", cluster.dashboard_url]) == 4
    text = capsys.readouterr().out
    assert "watchdog: reward worker 0 made no progress in score for 30 s" in text
    assert "stopped by the watchdog" in text
    # The stack was taken on node_b, where the reward worker runs: it shows the worker waiting in `score` and,
    # in the worker's reward process, the frame only the stuck fixture has (the words above appear without one).
    assert "py-spy dump" in text or "faulthandler" in text
    stack = text.split("its stack:", 1)[1]
    assert "score" in stack
    # A frame, as py-spy (`    sleep_forever (file.py:8)`) or faulthandler (`line 8 in sleep_forever`) prints it.
    assert re.search(r"^\s+sleep_forever \(|line \d+ in sleep_forever$", stack, re.M), stack[:3000]


def test_offline_todo_honours_placement(cluster, tmp_path, capsys):
    """The offline preference step runs in the one lifecycle, so its actors are placed like every other run's:
    the learner pinned to node_a, the rollout and reward workers of its held-out task eval to node_b."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}",
                                         "rejected": f"{2 * i + 1}", "tie": False}) + "\n" for i in range(4)))
    out = tmp_path / "todo"
    args = [str(ROOT / "configs/tiny.yaml"), f"trainer.output_dir={out}", "algorithm.name=todo",
            f"algorithm.todo.train_data={pairs}", "algorithm.todo.pairs_per_step=2", "trainer.max_steps=1",
            "data.eval_size=2", "logging.progress=false", "logging.plots=false", "logging.tensorboard=false", *PINNED]
    assert main(["submit", *args, "--wait", "--address", cluster.dashboard_url]) == 0
    nodes = cluster.node_ids()
    actors = _events(out, "actors")[0]
    assert [a["node"] for a in actors["learner"]] == [nodes["node_a"]]
    assert [a["node"] for a in actors["rollout"]] == [nodes["node_b"]]
    assert [a["node"] for a in actors["reward"]] == [nodes["node_b"]]
    assert _steps(out) == [1]

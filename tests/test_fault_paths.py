"""Fault paths, each made to happen: the watchdog's stack of a hung reward, a weight sync that delivered other
bytes, a worker that dies more often than it may restart, a reward that hangs inside a run, several reward workers
with a group-relative reward, and placements (unsatisfiable; colocated).

The first test needs no Ray; the others run on one local Ray cluster on the tiny model (slow: about a minute each).
Two-node versions of the placement and restart paths: tests/test_cluster.py.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.processes import wait_for_pid_file

ROOT = Path(__file__).resolve().parent.parent
FAULTS = str(ROOT / "tests/fixtures/fault_paths.py")
QUIET = ["logging.progress=false", "logging.plots=false", "logging.tensorboard=false", "trainer.eval_at_start=false",
         "trainer.eval_at_end=false"]


def _cfg(out: Path, *overrides: str):
    from rl.config.schema import load_config

    return load_config(ROOT / "configs/tiny.yaml", [f"trainer.output_dir={out}", *QUIET, *overrides])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _events(out: Path, name: str) -> list[dict]:
    return [e for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["event"] == name]


# ------------------------------------------------------------------------------------------- watchdog stack
def test_watchdog_stack_shows_the_frame_of_a_reward_hanging_in_the_worker_child(tmp_path, monkeypatch):
    """A reward hangs in the reward worker's child process, not in the worker: the stack the watchdog takes
    (rl.cluster.watchdog._stack_of, on the worker's node) must reach it, with py-spy and with the faulthandler fallback."""
    from rl.cluster import watchdog

    pid_file = tmp_path / "reward-pid"
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from rl.cluster.watchdog import setup_worker
        setup_worker()  # what every Ray worker of a run does (worker_process_setup_hook)
        from rewards.isolation import IsolatedRewards
        IsolatedRewards([({FAULTS!r} + ":hang_and_report", {{"pid_file": {str(pid_file)!r}}})],
                        timeout=None).score(["p"], ["c"], {{}})
    """)])
    child = None
    try:
        child = wait_for_pid_file(pid_file, owner)
        # A frame, not a mention: py-spy also prints the owner's command line, which names the function.
        spied = watchdog._stack_of(owner.pid)
        assert spied.startswith("[py-spy dump") and re.search(r"^\s+hang_and_report \(fault_paths", spied, re.M), spied
        monkeypatch.setattr(watchdog.shutil, "which", lambda name: "/nonexistent/py-spy")  # py-spy cannot attach
        fallback = watchdog._stack_of(owner.pid)
        assert f"[faulthandler, pid {owner.pid}]" in fallback and f"[faulthandler, pid {child}]" in fallback
        assert re.search(r"fault_paths\.py\", line \d+ in hang_and_report$", fallback, re.M), fallback
    finally:
        owner.kill()
        owner.wait()
        for pid in (owner.pid, child):
            if pid is not None and os.path.exists(watchdog.STACK_FILE.format(pid=pid)):
                os.remove(watchdog.STACK_FILE.format(pid=pid))


def test_the_watchdog_stack_reaches_the_console_whole():
    """The console cuts long records (model output, rewards.isolation.CapMessages); a stack dump would lose its
    end, where the hung child's frames are (first seen in tests/test_cluster.py's watchdog run)."""
    import logging

    from rewards.isolation import CapMessages

    cap = CapMessages(limit=50)
    stack = "\n".join(f"    frame_{i} (file.py:{i})" for i in range(40)) + "\n    sleep_forever (r.py:8)"
    whole = logging.LogRecord("reasonrl", logging.ERROR, __file__, 1, "its stack:\n%s", (stack,), None)
    whole.uncapped = True  # what extra={"uncapped": True} sets
    assert cap.filter(whole) and whole.getMessage().endswith("sleep_forever (r.py:8)")
    cut = logging.LogRecord("reasonrl", logging.ERROR, __file__, 1, "its stack:\n%s", (stack,), None)
    assert cap.filter(cut) and "more characters]" in cut.getMessage()


# ---------------------------------------------------------------------------------------- local Ray paths
@pytest.fixture(scope="module")
def local_ray():
    import ray

    yield
    ray.shutdown()


def _listening(pid: int) -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


@pytest.mark.slow
def test_corrupted_weight_sync_is_caught_and_the_group_listens_on_loopback(local_ray, tmp_path, monkeypatch):
    """A rollout worker receives one element one ulp off: the driver's checksum comparison (rl.sync.owner) must
    stop the sync, naming the checksum. On the way: the learner's and the weight-sync rendezvous of an all-local
    run listen on loopback only (apart from Ray's own gRPC port, which the run's token guards)."""
    from ray._private import state

    from rl.cluster.session import init_ray, shutdown

    from rl.learner.group import LearnerGroup

    from rl.rollout.group import RolloutGroup
    from rl.models import resolve_model
    from rl.sync.owner import WeightSync
    from tests.fixtures.corrupt_sync import CorruptingRolloutWorker

    monkeypatch.setattr("rl.rollout.group.RolloutWorker", CorruptingRolloutWorker)
    cfg = _cfg(tmp_path, "weight_sync.mode=collective")
    path = resolve_model(cfg.model.path)
    init_ray(cfg)
    rollouts, learner = RolloutGroup(cfg, path), LearnerGroup(cfg, path)
    try:
        weights = WeightSync(cfg, rollouts, learner)
        weights.push(version=1)  # an honest sync passes the comparison
        assert rollouts.nodes()[0]["weights_version"] == 1

        rank0 = learner.ranks[0]
        ray_port = state.actors(actor_id=rank0._actor_id.hex())["Address"]["Port"]
        ours = {(ip, port) for ip, port in _listening(learner.nodes()[0]["pid"]) if port != ray_port}
        # DeepSpeed's group and the sync group: no wildcard listener (TCPStore's own), the sync store on loopback.
        assert ours and not any(ip in ("0.0.0.0", "::") for ip, _ in ours), ours
        assert weights.address[0] == "127.0.0.1" and weights.address in ours, (weights.address, ours)

        import ray

        ray.get(rollouts.workers[0].arm.remote())
        with pytest.raises(RuntimeError, match="rollout worker 0 received parameters with checksum"):
            weights.push(version=2)
        assert weights.version == 1  # the corrupted version is never recorded as synced
    finally:
        shutdown(rollouts, learner)


@pytest.mark.slow
def test_a_worker_dying_more_often_than_it_may_restart_ends_in_exit_3_naming_the_checkpoint(local_ray, tmp_path,
                                                                                            capsys):
    """Step 1 is scored and checkpointed; from step 2 on the reward kills its worker on every call. With
    placement.max_restarts=1 the recreated worker dies too: `reasonrl train` exits 3 and names step 1's checkpoint
    and the resume command."""
    import ray

    from launch.cli import main

    ray.shutdown()  # the CLI starts its own local cluster, as `reasonrl train` does
    out, counter = tmp_path / "run", tmp_path / "calls"
    killer = f"{FAULTS}:kill_worker_from_second_call"
    code = main(["train", str(ROOT / "configs/tiny.yaml"), f"trainer.output_dir={out}", *QUIET,
                 f"reward.functions=[{{fn: '{killer}', kwargs: {{counter: '{counter}'}}}}]",
                 f"reward.accuracy={killer}",
                 "placement.max_restarts=1", "trainer.max_steps=3", "trainer.save_every=1"])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    assert counter.read_text() == "3"  # step 1; step 2 killed the worker, and its one restart
    assert "stopped because a worker died" in err and f"{out / 'checkpoints' / 'step-000001'}" in err
    assert f"reasonrl train --resume {out}" in err
    assert [m["step"] for m in _metrics(out)] == [1]


@pytest.mark.slow
def test_a_reward_hanging_inside_a_colocated_run_scores_0_is_counted_and_the_run_completes(local_ray, tmp_path):
    """The reward hangs on the batch's first sample (tests/fixtures/fault_paths.py): that sample scores
    0 and is one `reward_timeouts`, the others are scored, and the run ends normally. The run is colocated
    (placement.colocate: the rollout worker rides in the learner rank's bundle of a placement group)."""
    import ray
    from ray.util import placement_group_table

    from rl.trainer import train

    out, counter = tmp_path / "run", tmp_path / "hangs"
    hang = f"{FAULTS}:hang_on_first_sample"
    cfg = _cfg(out, f"reward.functions=[{{fn: '{hang}', kwargs: {{counter: '{counter}'}}}}]",
               f"reward.accuracy={hang}", "reward.timeout_seconds=3", "trainer.max_steps=1", "trainer.save_every=0",
               "placement.colocate=true", "placement.learner.num_cpus=1", "placement.rollout.num_cpus=1")
    seen = {}

    def look(step, row):  # while the actors live: what the colocated placement reserved
        if row is None:
            seen["groups"] = [g for g in placement_group_table().values() if g["state"] == "CREATED"]

    train(cfg, step_callback=look)
    rows = _metrics(out)
    assert [m["step"] for m in rows] == [1]
    assert rows[0]["reward_timeouts"] == 1 and rows[0]["reward_failures"] == 1, rows[0]
    assert rows[0]["reward"] > 0  # the 7 other samples were scored (char lengths > 0)
    assert counter.read_text() == "1 1"  # the whole batch and sample 0 hung, nothing else
    failures = _events(out, "reward_failures")
    assert [e["step"] for e in failures] == [1] and any("sample 0: timed out" in x for x in failures[0]["errors"])
    assert (out / "checkpoint-final").exists()  # the run went on to its end
    groups = seen["groups"]
    assert [g["name"] for g in groups] == ["reasonrl-learner"]  # no group of the rollout role's own
    assert groups[0]["bundles"] == {0: {"CPU": 2.0}}  # the learner rank's CPU and the rollout worker's
    assert ray.is_initialized()


@pytest.mark.slow
def test_several_reward_workers_give_one_workers_group_relative_scores(local_ray, tmp_path):
    """kimi_length normalises lengths within a group: a group split over two workers would change its scores.
    5 groups of 4 over 2 workers (a per-sample split would cut group 2 in half) score exactly as on one worker
    and as the function on the whole batch; every worker call held whole groups."""
    from rewards.length import kimi_length
    from rl.cluster.session import init_ray, shutdown
    from rl.scoring.group import RewardGroup

    lengths = [3, 9, 4, 12, 7, 7, 2, 30, 5, 50, 20, 9, 8, 1, 16, 4, 10, 11, 12, 13]
    answers = [str(g) for g in range(5) for _ in range(4)]
    completions = [f"\\boxed{{{g if i % 3 else g + 1}}}" for i, g in enumerate(int(a) for a in answers)]
    prompts = [f"p{a}" for a in answers]
    columns = {"answer": answers, "completion_tokens": lengths, "group_id": [int(a) for a in answers]}
    expected = kimi_length(prompts, completions, **columns)
    assert len(set(expected)) > 3  # a real spread of scores, correct and incorrect

    log = tmp_path / "groups"
    record = f"{FAULTS}:record_groups"
    scores = {}
    for workers in (1, 2):
        cfg = _cfg(tmp_path, f"reward.num_workers={workers}", "reward.accuracy=kimi_length",
                   f"reward.functions=[{{fn: kimi_length}}, {{fn: '{record}', kwargs: {{log_file: '{log}'}}}}]")
        init_ray(cfg)
        group = RewardGroup(cfg)
        try:
            scores[workers] = group.score(prompts, completions, columns, group_size=4).scores["kimi_length"]
        finally:
            shutdown(group)
    assert scores[1] == scores[2] == expected
    calls = [list(map(int, line.split())) for line in log.read_text().splitlines()]
    assert sorted(map(len, calls)) == [8, 12, 20]  # one call of 20 samples, then 12 + 8 (3 + 2 whole groups)
    for ids in calls:
        assert all(ids.count(g) == 4 for g in set(ids)), ids


@pytest.mark.slow
def test_an_unsatisfiable_grpo_placement_fails_naming_the_role_before_any_actor(local_ray, tmp_path, monkeypatch):
    from ray._private import state

    from rl.cluster.session import init_ray
    from rl.config.schema import ConfigError
    from rl.trainer import train

    monkeypatch.setattr("rl.cluster.placement.READY_TIMEOUT_S", 2.0)  # no node has the resource: no need to wait long
    out = tmp_path / "run"
    cfg = _cfg(out, "placement.reward.resources={no_such_node: 1}")
    init_ray(cfg)
    before = len(state.actors())
    with pytest.raises(ConfigError, match=r"config key 'placement\.reward': cannot place 1 x"):
        train(cfg)
    assert len(state.actors()) == before  # not one actor was created, not even the roles placed before it
    assert not (out / "metrics.jsonl").exists()

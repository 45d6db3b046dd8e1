"""`reasonrl logs --follow` and `reasonrl stop` on a real Ray cluster that uses token authentication, so the same
job also shows the promise of rl/cluster/auth.py for a submitted / joined cluster: `ray.auth_mode: token` sends
the cluster's token (here RAY_AUTH_TOKEN) from the job client, and the job's driver joins the cluster with it
(rl.cluster.session.init_ray, address `auto`) and runs its workers there; without it the cluster refuses the
client, in one line.

The cluster test is slow: one single-node cluster on loopback (tests/ray_cluster.py) and one tiny training job.
"""
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray.job_submission  # noqa: F401  (imported here, Ray's log handler binds to the session's stderr)

from launch.cli import main
from launch.submit import client
from tests.ray_cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests/fixtures/rewards.py"
TOKEN = secrets.token_hex(32)


@pytest.fixture(scope="module")
def token_cluster():
    c = LocalCluster([{"node_a": 1}])
    c.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)  # every process of the cluster requires the token
    try:
        yield c.start()
    finally:
        c.remove()


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_token_cluster_job_logs_follow_and_stop(token_cluster, tmp_path, capsys, monkeypatch):
    url = token_cluster.dashboard_url
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)  # the submitting machine holds the cluster's token
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # restored afterwards (the job client exports its mode)
    out = tmp_path / "run"
    args = [str(ROOT / "configs/tiny.yaml"), f"trainer.output_dir={out}",
            f"reward.functions=[{{fn: '{FIXTURE}:char_length'}}]", f"reward.accuracy={FIXTURE}:char_length",
            "trainer.max_steps=500", "trainer.save_every=0", "logging.progress=false", "logging.plots=false",
            "logging.tensorboard=false", "trainer.eval_at_start=false", "trainer.eval_at_end=false"]

    # A submitted cluster's mode is what the config names (default `disabled`): without the token it is refused.
    capsys.readouterr()
    assert main(["submit", *args, "--address", url]) == 2
    assert "reasonrl submit:" in capsys.readouterr().err
    assert main(["submit", *args, "ray.auth_mode=token", "--address", url]) == 0
    job = capsys.readouterr().out.strip().splitlines()[-1]
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # status / logs / stop take the mode from the environment

    jc = client(url, "token")
    deadline = time.monotonic() + 900
    while not _steps(out):  # the driver joined with the token and its workers trained a step
        status = str(jc.get_job_status(job).value)
        assert status in ("PENDING", "RUNNING"), (status, jc.get_job_logs(job)[-3000:])
        assert time.monotonic() < deadline, "the job never trained a step"
        time.sleep(0.5)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    follow = subprocess.Popen([sys.executable, "-m", "launch.cli", "logs", job, "--follow", "--address", url],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)
        assert follow.poll() is None, follow.communicate()  # still following a running job
        assert main(["stop", job, "--address", url]) == 0
        assert capsys.readouterr().out.strip() == f"{job} stopping"
        stdout, stderr = follow.communicate(timeout=300)  # returns once the job has stopped
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode not in (0, None)
    assert f"reasonrl: job {job} STOPPED" in stderr
    logs = jc.get_job_logs(job)
    assert stdout and logs.startswith(stdout)  # the log as it grew, from its first line
    assert "weight sync:" in stdout  # the training driver's own output, followed live
    assert str(jc.get_job_status(job).value) == "STOPPED" and _steps(out)[-1] < 500

    assert main(["status", job, "--address", url]) == 0
    assert f"{job} STOPPED run_dir={out}" in capsys.readouterr().out
    assert main(["stop", job, "--address", url]) == 0
    assert capsys.readouterr().out.strip() == f"{job} was not running"



def test_a_refused_token_is_one_line_not_a_traceback(capsys):
    """What `reasonrl submit|status|logs|stop` print when a token cluster refuses the client (Ray raises its own
    AuthenticationError, not a ConnectionError): one line, exit 2. No cluster needed."""
    from ray.exceptions import AuthenticationError

    from launch.submit import _one_line_errors

    class Args:
        command = "status"

    def refused(args):
        raise AuthenticationError("Authentication failed: the cluster requires a token\nmore detail")

    assert _one_line_errors(refused)(Args()) == 2
    err = capsys.readouterr().err
    assert err.startswith("reasonrl status: ") and "the cluster requires a token" in err and err.count("\n") == 1

    def broken(args):
        raise KeyError("a bug")  # not the user's input: the traceback stays

    with pytest.raises(KeyError):
        _one_line_errors(broken)(Args())

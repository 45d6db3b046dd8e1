"""A quiet console: log lines are capped (math-verify logs whole adversarial answers), actors keep library progress
bars and DeepSpeed's accelerator probe off, and a `reasonrl train` run prints none of them: the fast tier's one
real training run (about a minute) is the last test here."""
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _capture(logger_level=logging.WARNING):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logger_level)
    return stream, lambda: (root.removeHandler(handler), root.setLevel(old))


def test_math_verify_parse_timeout_does_not_log_the_whole_answer():
    import math_verify

    import rewards.math  # noqa: F401  (installs the cap on math-verify's loggers)
    from rewards.isolation import MAX_LOG_CHARS

    huge = "$" + "1+" * 50_000 + "1$"  # 100,003 characters; sympy needs far more than the 1 s allowed
    stream, restore = _capture()
    try:
        assert math_verify.parse(huge, parsing_timeout=1) == []
    finally:
        restore()
    text = stream.getvalue()
    assert "Timeout during parsing" in text  # logged through math-verify's own logger...
    assert "more characters]" in text and max(map(len, text.splitlines())) <= MAX_LOG_CHARS + 100  # ...and cut


def test_cap_applies_to_formatted_arguments_and_leaves_short_messages_alone():
    from rewards.isolation import CapMessages, cap_log_messages

    logger = logging.getLogger("reasonrl.test_console")
    cap_log_messages(logger, limit=50)
    cap_log_messages(logger, limit=50)
    assert sum(isinstance(f, CapMessages) for f in logger.filters) == 1  # attached once
    stream, restore = _capture()
    try:
        logger.warning("reward %r: %s", "fn", "x" * 10_000)
        logger.warning("short %s", "message")
    finally:
        restore()
    first, second = stream.getvalue().splitlines()
    assert first.endswith("[... 9963 more characters]") and len(first) < 150
    assert second.endswith("short message")


def _recorded_job() -> tuple[dict, bytes]:
    """This driver's job as the GCS stores it (its job table: what the dashboard and `ray job` show to anyone who
    reaches the cluster): (its runtime_env, the whole record as stored)."""
    import ray
    from ray.core.generated import gcs_pb2

    table = ray._private.state.state._connect_and_get_accessor().get_job_table(
        skip_submission_job_info_field=True, skip_is_running_tasks_field=True)
    mine = [raw for raw in table
            if gcs_pb2.JobTableData.FromString(raw).job_id.hex() == ray.get_runtime_context().get_job_id()]
    assert len(mine) == 1, len(table)
    job = gcs_pb2.JobTableData.FromString(mine[0])
    return json.loads(job.config.runtime_env_info.serialized_runtime_env or "{}"), mine[0]


WORKER_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "DS_ACCELERATOR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


def test_actors_get_progress_bars_off_and_deepspeed_told_the_accelerator(monkeypatch, request):
    """Two real local Ray sessions started by init_ray (no actor: one task is enough to see a worker's environment)."""
    import ray

    import rl.cluster.session
    from rl.cluster.auth import apply_auth_mode
    from rl.config.schema import load_config

    @ray.remote
    def worker_env():
        return {k: os.environ.get(k) for k in WORKER_ENV}

    # init_ray switches this process's Ray to token auth; later modules start Ray in the session's own mode.
    before = os.environ.get("RAY_AUTH_MODE", "disabled")
    request.addfinalizer(lambda: apply_auth_mode(before))
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "DS_ACCELERATOR", "RAY_AUTH_MODE", "RAY_OVERRIDE_JOB_RUNTIME_ENV",
                 "RAY_USAGE_STATS_ENABLED", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(name, "")  # recorded, so the test's end restores (or removes) each one...
        monkeypatch.delenv(name)  # ...and absent, as for a user who set none of them
    assert not ray.is_initialized()
    rl.cluster.session.init_ray(load_config(ROOT / "configs/tiny.yaml"))
    try:
        seen = ray.get(worker_env.remote())
        recorded, record = _recorded_job()
    finally:
        ray.shutdown()
    assert seen["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and seen["DS_ACCELERATOR"] == "cpu"
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # the driver, should it import DeepSpeed
    # A local cluster defaults to token auth. The worker holds the run's token (inherited from the raylet, which the
    # driver started with it in its environment); the job's runtime_env, which the GCS stores and shows, does not.
    token = os.environ["RAY_AUTH_TOKEN"]
    assert seen["RAY_AUTH_MODE"] == os.environ["RAY_AUTH_MODE"] == "token" and len(token) == 64
    assert seen["RAY_AUTH_TOKEN"] == token
    assert recorded["env_vars"]["RAY_AUTH_MODE"] == "token" and recorded["env_vars"]["DS_ACCELERATOR"] == "cpu"
    assert token.encode() not in record

    # The user's choice wins; a run with a GPU role leaves DS_ACCELERATOR to each role's actor options
    # (rl.cluster.placement), so no worker of the job is told "cpu" wholesale. The job record is what the first
    # session's worker was started with (checked above), so it is read alone here: no worker is started.
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    rl.cluster.session.init_ray(load_config(ROOT / "configs/tiny.yaml", ["rollout.num_gpus=1"]))
    try:
        recorded, _ = _recorded_job()
    finally:
        ray.shutdown()
    assert recorded["env_vars"]["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
    assert "DS_ACCELERATOR" not in recorded["env_vars"] and "DS_ACCELERATOR" not in os.environ


# One reasonrl log line: "<date> <time> reasonrl[.module]: message" (launch/cli.py's format, our loggers only).
OWN_LOG = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} reasonrl(\.[\w.]+)?: ")
# The run's own progress bar (rl/trainer.py): unit "step", with the key numbers. A library bar has another unit.
OWN_BAR = re.compile(r"^\s*\d+%\|[^|]*\| \d+/\d+ \[[^\]]*(step/s|s/step)(, reward=[^\]]*)?\]$")


def test_reasonrl_train_one_real_step_with_a_quiet_console(tmp_path):
    """The fast tier's one real run: `reasonrl train` for 1 step of the tiny config (local Ray, a rollout worker, a
    reward worker, a DeepSpeed learner rank, the weight sync, a checkpoint, held-out eval at start and end), about a
    minute on 2 cores, so a change that breaks the loop fails `make test-fast`.

    The console: stdout is the three held-out accuracy lines; stderr holds only reasonrl's own log lines (two) and
    its progress bar; no line from a library logger, a Ray actor's forwarded output, or a library progress bar."""
    from transformers import AutoModelForCausalLM

    from rl.models import load_policy, resolve_model

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                                                             "DS_ACCELERATOR", "RAY_ADDRESS", "REASONRL_LOG")}
    script = Path(sys.executable).parent / "reasonrl"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "launch.cli"]
    fixture = ROOT / "tests/fixtures/rewards.py"
    run = tmp_path / "run"
    proc = subprocess.run([*cmd, "train", str(ROOT / "configs/tiny.yaml"), "trainer.max_steps=1",
                           "logging.plots=false", "logging.tensorboard=false", f"trainer.output_dir={run}",
                           # a dense reward: the random model's groups vary, so the one step really updates
                           f"reward.functions=[{{fn: '{fixture}:char_length'}}, {{fn: math_verify, weight: 0.0}}]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    # The loop ran: one metrics row with a real update, a checkpoint, final weights that moved from the start.
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["grad_norm"] > 0 and rows[0]["zero_adv_groups"] == 0.0
    assert rows[0]["reward"] > 0 and rows[0]["logprob_diff_mean"] < 1e-3
    state = json.loads((run / "checkpoints/step-000001/trainer_state.json").read_text())
    assert state["step"] == 1
    start = load_policy(resolve_model("tiny:llama")).state_dict()
    final = AutoModelForCausalLM.from_pretrained(run / "checkpoint-final").state_dict()
    assert start.keys() == final.keys()
    moved = [k for k in start if not torch.equal(start[k], final[k])]
    assert len(moved) > len(start) // 2, moved

    # The console, line by line (a progress bar redraw with \r is a line on a terminal).
    out = proc.stdout.splitlines()
    assert len(out) == 3, proc.stdout
    assert re.fullmatch(r"held-out accuracy at start: \d\.\d{3} \(n=4\)", out[0]), out
    assert re.fullmatch(r"held-out accuracy at end: \d\.\d{3} \(n=4\)", out[1]), out
    assert out[2].startswith("held-out accuracy: ") and out[2].endswith(f"({run})"), out
    logs, bars = [], []
    for line in re.split(r"[\r\n]", proc.stderr):
        # a log line may follow a bar redraw on the same terminal line
        for part in re.split(r"(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )", line):
            if not part.strip():
                continue
            if OWN_LOG.match(part):
                logs.append(part)
            else:
                assert OWN_BAR.match(part), f"a console line that is not reasonrl's: {part[:300]!r}"
                bars.append(part)
    assert len(logs) == 2, logs
    assert "training data" in logs[0] and "weight sync" in logs[1], logs
    assert 1 <= len(bars) <= 4 and bars[-1].lstrip().startswith("100%|"), bars

"""A quiet console: log lines are capped (math-verify logs whole adversarial answers), actors keep library progress
bars and DeepSpeed's accelerator probe off, and a `reasonrl train` run prints none of them (slow)."""
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_actors_get_progress_bars_off_and_deepspeed_told_the_accelerator(monkeypatch):
    import rl.cluster.session
    from rl.config.schema import load_config

    seen = []
    monkeypatch.setattr(rl.cluster.session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(rl.cluster.session.ray, "init", lambda **kw: seen.append(kw))
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "DS_ACCELERATOR", "RAY_AUTH_MODE", "RAY_OVERRIDE_JOB_RUNTIME_ENV",
                 "RAY_USAGE_STATS_ENABLED", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    rl.cluster.session.init_ray(load_config(ROOT / "configs/tiny.yaml"))
    env = seen[-1]["runtime_env"]["env_vars"]
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and env["DS_ACCELERATOR"] == "cpu"
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # the driver, should it import DeepSpeed
    # A local cluster defaults to token auth; the token is inherited from the driver's environment, never sent.
    assert env["RAY_AUTH_MODE"] == os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
    assert os.environ["RAY_AUTH_TOKEN"] not in repr(seen[-1])
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's choice wins
    rl.cluster.session.init_ray(load_config(ROOT / "configs/tiny.yaml", ["rollout.num_gpus=1"]))
    env = seen[-1]["runtime_env"]["env_vars"]
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "0" and "DS_ACCELERATOR" not in env  # placement sets it per role


@pytest.mark.slow
def test_reasonrl_train_console_is_quiet(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
                                                             "DS_ACCELERATOR", "RAY_ADDRESS")}
    script = Path(sys.executable).parent / "reasonrl"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "launch.cli"]
    proc = subprocess.run([*cmd, "train", str(ROOT / "configs/tiny.yaml"), "trainer.max_steps=2",
                           f"trainer.output_dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    for noise in ("Loading weights", "Writing model shards", "Setting ds_accelerator", "Setting accelerator to CPU"):
        assert noise not in text, noise
    # Progress bars redraw with \r: each redraw is a line on a terminal.
    longest = max(re.split(r"[\r\n]", text), key=len)
    assert len(longest) <= 600, longest[:300]

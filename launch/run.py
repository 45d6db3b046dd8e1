"""One training run as the launch layer starts it: `reasonrl train`, `reasonrl experiment`, a submitted job and
bench/grpo_vs_trl.py all come through here.

rl.trainer.train owns the run lifecycle but may not import eval/ (dependencies point launch -> eval -> rl ->
rewards), so what needs eval/ is added here: the config check of `trainer.eval_benchmarks` and the in-training
benchmark eval hook.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from eval.in_training import BenchmarkEval, check_eval_benchmarks
from rewards.isolation import cap_log_messages
from rl.config.schema import Config, load_config


def load_training_config(path: str | Path | None, overrides: list[str] = (), *, name: str | None = None,
                         check_environment: bool = True, presets: list[str] = ()) -> Config:
    """rl.config.schema.load_config plus the checks only the layers above rl can make (benchmark names). Every launch
    path that trains loads its config through here, so a typo fails in one line before anything starts.
    check_environment=False: for `train --dry-run`, which reports what this machine lacks as warnings."""
    return check_eval_benchmarks(load_config(path, list(overrides), name=name, check_environment=check_environment,
                                             presets=list(presets)))


def build_hooks(cfg: Config) -> list:
    """The trainer hooks a config asks for. Built before Ray starts: a hook checks its inputs when constructed."""
    hooks = []
    if cfg.trainer.eval_every:
        hooks.append(BenchmarkEval(cfg))
    return hooks


def quiet_console() -> None:
    """The driver's console carries the run's own progress bar and one line per event: no library progress bars,
    and no log line of any length (a handler filter on the root logger's handlers, e.g. the CLI's)."""
    cap_log_messages(*logging.getLogger().handlers)
    quiet_library_progress()


def quiet_library_progress() -> None:
    """Turn off transformers' own progress bars in this (the driver's) process: "Writing model shards" when a tiny or
    bundled model is converted and "Loading weights" would break up the run's progress bar. Hub downloads keep
    theirs (a multi-GB download needs one, and it happens before the run's bar starts). The actors get the same
    through rl.cluster.session.init_ray. A user who set HF_HUB_DISABLE_PROGRESS_BARS either way is obeyed."""
    if "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ:
        return
    import datasets
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging  # heavy; train_run imports it anyway

    hf_logging.disable_progress_bar()  # also switches the hub's bars off...
    enable_progress_bars()  # ...which downloads keep
    # datasets prints "Generating train split" bars for every local JSONL it reads (a hub dataset's download bar goes
    # with them; the run logs what it read, and datasets caches a download).
    datasets.disable_progress_bars()


def train_run(cfg: Config, resume: bool = False, step_callback=None) -> dict:
    """rl.trainer.train with the hooks the config asks for; returns its summary.

    Raises what train raises: rl.trainer.RunInterrupted after Ctrl-C / SIGTERM (every actor already shut down,
    every hook closed), input errors (ConfigError, DataError, ModelError, FileNotFoundError, FileExistsError)
    before any actor starts.
    """
    check_eval_benchmarks(cfg)  # a config built in code (bench, tests) gets the same check as a loaded one
    hooks = build_hooks(cfg)
    quiet_console()
    from rl.trainer import train  # torch, ray, deepspeed: imported once every input is known to be valid

    return train(cfg, resume=resume, step_callback=step_callback, hooks=hooks)

"""The registry of step kinds: `algorithm.name` -> what builds its step (rl/steps/base.py says what a step is).

Adding an algorithm: its step in a new file here, its loss as a pure tensor function in rl/algo/core.py (and, if
the learner computes something new, a named update in rl/learner/updates.py), and one line below.
"""
from __future__ import annotations

from typing import Callable

from rl.config.schema import Config, ConfigError
from rl.steps.adaptive import policy_step
from rl.steps.base import Draw, Run, Step
from rl.steps.preference import preference_step
from rl.steps.sft import SftStep

STEPS: dict[str, Callable[[Config], Step]] = {
    "grpo": policy_step,  # rl/steps/policy.py; rl/steps/adaptive.py when dynamic sampling or GDRO is on
    "fgo": policy_step,
    "todo": preference_step,  # online or offline by algorithm.todo.online
    "dpo": preference_step,
    "sft": SftStep,  # supervised cold start on data.train
}


def make_step(cfg: Config) -> Step:
    try:
        return STEPS[cfg.algorithm.name](cfg)
    except KeyError:
        raise ConfigError(f"config key 'algorithm.name': no step kind {cfg.algorithm.name!r} "
                          f"(known: {', '.join(sorted(STEPS))})") from None


__all__ = ["STEPS", "Draw", "Run", "Step", "make_step"]

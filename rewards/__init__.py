"""Reward functions: a name registry and resolution of reward specs.

Contract (same as TRL's): ``fn(prompts, completions, **columns) -> list[float | None]`` where ``prompts`` and
``completions`` are lists of str and every dataset column (e.g. ``answer``) arrives as a keyword list of the same
length. Functions must tolerate keywords they do not use (take ``**kwargs``).

A spec string names a function in one of three ways:
  * ``"math_verify"``               -- a name in ``REGISTRY`` (built-ins live in ``rewards.math``);
  * ``"my_pkg.my_rewards:score"``   -- ``module.path:attribute``, imported with importlib;
  * ``"path/to/file.py:score"``     -- a Python file, loaded under a unique module name (relative to the cwd).

Specs are strings (not function objects) so that a worker process can resolve them itself; see
``rewards.isolation``.
"""
from __future__ import annotations

from rewards.registry import REGISTRY, RewardSpecError, check_spec, register, resolve  # noqa: F401

__all__ = ["REGISTRY", "RewardSpecError", "check_spec", "register", "resolve"]

# Importing the built-ins fills REGISTRY (each registers its functions by name).
from rewards import length as _builtin_length  # noqa: E402,F401  (length-control baselines)
from rewards import math as _builtin_math  # noqa: E402,F401
from rewards import testbed as _builtin_testbed  # noqa: E402,F401  (testbed_redundancy, a metric)

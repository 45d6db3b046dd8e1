"""The reward registry and spec resolution (the package docstring, rewards/__init__.py, gives the contract).

Kept apart from the package's __init__ so the built-in reward modules can register themselves without importing
the package that imports them.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Callable

__all__ = ["REGISTRY", "RewardSpecError", "register", "resolve"]

REGISTRY: dict[str, Callable] = {}


class RewardSpecError(ValueError):
    """A reward spec string that cannot be turned into a callable."""


def register(name: str):
    """Decorator: ``@register("name")`` adds the function to ``REGISTRY`` and returns it unchanged."""

    def deco(fn: Callable) -> Callable:
        old = REGISTRY.get(name)
        # Re-registering the same function (e.g. a module re-import) is harmless; a different function under an
        # existing name is almost certainly a mistake that would silently change training.
        if old is not None and _qualname(old) != _qualname(fn):
            raise ValueError(f"reward name {name!r} is already registered to {_qualname(old)}")
        REGISTRY[name] = fn
        return fn

    return deco


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _load_file(path: str, spec: str):
    full = os.path.abspath(path)  # relative paths are taken against the current working directory
    if not os.path.isfile(full):
        raise RewardSpecError(f"reward spec {spec!r}: file not found: {full}")
    # A unique, stable name per file: two different files both called rewards.py must not collide in sys.modules,
    # and the module must be in sys.modules while it executes (dataclasses, pickling by reference need that).
    stem = os.path.splitext(os.path.basename(full))[0]
    name = f"_reasonrl_reward_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:12]}"
    mspec = importlib.util.spec_from_file_location(name, full)
    if mspec is None or mspec.loader is None:
        raise RewardSpecError(f"reward spec {spec!r}: cannot load {full} as a Python module")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise RewardSpecError(f"reward spec {spec!r}: error while executing {full}: {type(e).__name__}: {e}") from e
    return module


def _import_module(modname: str, spec: str):
    try:
        return importlib.import_module(modname)
    except Exception as e:  # ModuleNotFoundError, but also errors raised by the module's own top level
        raise RewardSpecError(
            f"reward spec {spec!r}: cannot import module {modname!r}: {type(e).__name__}: {e}"
        ) from e


def resolve(spec: str) -> Callable:
    """Turn a spec string (registry name, ``module:function`` or ``file.py:function``) into a callable."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        if spec in REGISTRY:
            return REGISTRY[spec]
        known = ", ".join(sorted(REGISTRY)) or "(none)"
        raise RewardSpecError(
            f"unknown reward {spec!r}; known names: {known} (or use 'module:function' / 'path/file.py:function')"
        )
    # rpartition: the attribute never contains ':', the target might (a Windows drive, in principle).
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise RewardSpecError(f"reward spec {spec!r}: expected 'module:function' or 'path/file.py:function'")
    module = _load_file(target, spec) if _is_file_target(target) else _import_module(target, spec)
    obj = module
    for part in attr.split("."):  # allow 'module:Class.method'
        if not hasattr(obj, part):
            raise RewardSpecError(f"reward spec {spec!r}: {module.__name__!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardSpecError(f"reward spec {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


def check_spec(spec: str) -> str:
    """Validate a spec cheaply; return it with file paths absolute. A file target is only checked to exist and a
    module target only located (`find_spec` imports its parent packages, not the module itself).

    Used when a config is loaded, so a typo fails before any actor starts; `resolve` runs later in the workers,
    whose working directory need not be the driver's (hence the absolute path).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        resolve(spec)  # registry lookup only
        return spec
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise RewardSpecError(f"reward spec {spec!r}: expected 'module:function' or 'path/file.py:function'")
    if _is_file_target(target):
        full = os.path.abspath(target)
        if not os.path.isfile(full):
            raise RewardSpecError(f"reward spec {spec!r}: file not found: {full}")
        return f"{full}:{attr}"
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise RewardSpecError(f"reward spec {spec!r}: no module named {target!r}")
    return spec

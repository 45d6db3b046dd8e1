"""Entrypoint of a job sent by `reasonrl submit`: `python -m launch.job CONFIG [overrides] | --resume RUN_DIR [...]`.

It runs on the cluster under whatever `python` the entrypoint names (`reasonrl submit --python`, default
`python`), which need not be the project's environment: `ray start` run from a venv without activating it gives the
job a system python. So, first and with the standard library only (nothing here or above it imports a third-party
package before the check), it makes sure this interpreter can import what the project needs at runtime; if not,
it prints one line (which interpreter, what is missing, how to fix it) and exits 2, so the job FAILS with that
line in its log instead of a ModuleNotFoundError traceback from deep inside the run.

Then it is `reasonrl train` on the config staged in the `reasonrl_job_files` package (launch/submit.py).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE = "reasonrl_job_files"  # the staged files' package (launch/submit.py sends it as a py_module)
MIN_PYTHON = (3, 10)
# pyproject.toml's runtime dependencies, distribution name -> the module the project imports. trl is left out: only
# bench/ and the tests import it (tests/test_launch.py keeps this table and pyproject.toml in step).
RUNTIME_PACKAGES = {
    "ray": "ray", "torch": "torch", "transformers": "transformers", "deepspeed": "deepspeed", "datasets": "datasets",
    "math-verify": "math_verify", "pydantic": "pydantic", "pyyaml": "yaml", "safetensors": "safetensors",
    "gguf": "gguf", "accelerate": "accelerate", "tensorboard": "tensorboard", "matplotlib": "matplotlib",
    "tqdm": "tqdm",
}


def missing_modules() -> list[str]:
    """The runtime modules this interpreter cannot import (located only, not imported: fast, and side-effect free)."""
    missing = []
    for module in RUNTIME_PACKAGES.values():
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):  # a broken install counts as missing
            found = None
        # A bare folder of that name (Ray's /tmp/ray when the job runs there) is a namespace package, not the library.
        if found is None or found.origin in (None, "namespace"):
            missing.append(module)
    return missing


def check_interpreter() -> None:
    """Exit 2 with one line on stderr if this interpreter cannot run the project."""
    # Plain syntax (no walrus, no match): an old interpreter must get as far as this message.
    problem, missing = None, missing_modules()
    if sys.version_info < MIN_PYTHON:
        problem = f"is Python {sys.version.split()[0]}, the project needs >= {'.'.join(map(str, MIN_PYTHON))}"
    elif missing:
        problem = f"cannot import {', '.join(missing)}"
    if problem is None:
        return
    print(f"reasonrl job: the cluster's Python {sys.executable} {problem}, so the project's packages are not "
          "installed for the interpreter that runs this job; fix: start Ray from the project's environment "
          "(`source .venv/bin/activate` before `ray start`), or resubmit with "
          "`reasonrl submit --python /path/to/venv/bin/python`", file=sys.stderr, flush=True)
    raise SystemExit(2)


def staged_argv(argv: list[str]) -> list[str]:
    """`reasonrl train` arguments: a staged config name becomes its path inside the unpacked job package."""
    if argv and argv[0] != "--resume":
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            print(f"reasonrl job: package {PACKAGE} missing from the job's runtime_env (submit with `reasonrl "
                  "submit`)", file=sys.stderr, flush=True)
            raise SystemExit(2)
        argv = [str(Path(list(spec.submodule_search_locations)[0]) / argv[0]), *argv[1:]]
    return ["train", *argv]


def main(argv: list[str] | None = None) -> int:
    check_interpreter()
    argv = staged_argv(list(sys.argv[1:] if argv is None else argv))
    # Only after the check: launch.cli imports pydantic and yaml (through rl.config.schema) at module level.
    from launch.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

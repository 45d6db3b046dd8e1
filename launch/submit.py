"""`reasonrl submit | status | logs | stop`: run a config as a job on a Ray cluster through the Ray Jobs API.

`submit` validates the config here (a typo fails before anything is sent), then submits
`python -m launch.job <config> ...` (launch/job.py: it first checks that the cluster's python can import the
project's packages) with a runtime_env that carries
- the working directory (this project, without .venv, runs, .git, caches), so the cluster runs this code;
- a small package `reasonrl_job_files` (py_modules) holding the resolved config and a copy of every local reward
  file it names; the config then names those rewards as `reasonrl_job_files.<module>:<fn>`, which imports on
  every node wherever Ray unpacked the package. Copies are also kept in ~/.cache/reasonrl/job_files, so
  `submit --resume` can send them again;
- the HF offline flags and RAY_AUTH_MODE (set explicitly: platform.md's auth-token gotcha).
The run folder (trainer.output_dir) is made absolute here and must be on a filesystem every node sees.
It returns the job id at once; `--wait` follows the logs and returns the driver's exit code.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from rl.config.schema import ConfigError, dump_config
from rl.cluster.auth import apply_auth_mode, resolve_auth_mode

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "reasonrl_job_files"  # the name launch/job.py looks for (it cannot import this module before its check)
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded: environments, run folders, VCS and caches (Ray limits a working_dir to a few hundred MiB).
EXCLUDES = [".venv", "venv", "runs", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".cache", "build",
            "*.pyc", "tb"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def cache_dir() -> Path:
    return Path(os.environ.get("REASONRL_CACHE", Path.home() / ".cache" / "reasonrl")) / "job_files"


def client(address: str | None, auth_mode: str | None = None):
    # Explicit auth mode: a token file left in ~/.ray must not decide whether the client sends a token.
    apply_auth_mode(auth_mode or os.environ.get("RAY_AUTH_MODE", "disabled"))
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)


# ------------------------------------------------------------------------------------------------- staging
def _stage_file(path: str, stage: Path) -> str:
    """Copy a reward file into the package (and the local cache); returns its module name there."""
    src = Path(path)
    data = src.read_bytes()
    name = f"r_{hashlib.sha256(data).hexdigest()[:12]}_{''.join(c if c.isalnum() else '_' for c in src.stem)}"
    (stage / f"{name}.py").write_bytes(data)
    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / f"{name}.py").write_bytes(data)
    return name


def _restage_module(module: str, stage: Path) -> None:
    cached = cache_dir() / f"{module}.py"
    if not cached.is_file():
        raise ConfigError(f"reward module {PACKAGE}.{module} was staged on another machine (not in {cache_dir()}); "
                          "resume from that machine, or on the cluster with `reasonrl train --resume`")
    shutil.copyfile(cached, stage / f"{module}.py")


def stage_rewards(functions: list[dict], stage: Path) -> list[dict]:
    """Reward specs with every local file replaced by its staged module (`reasonrl_job_files.<m>:<fn>`)."""
    out = []
    for f in functions:
        target, sep, attr = f["fn"].rpartition(":")
        if sep and (target.endswith(".py") or os.sep in target):
            f = dict(f, fn=f"{PACKAGE}.{_stage_file(target, stage)}:{attr}")
        elif sep and target.startswith(PACKAGE + "."):
            _restage_module(target[len(PACKAGE) + 1:], stage)
        out.append(f)
    return out


def _job_env(auth_mode: str) -> dict:
    from rl.cluster.session import FORWARDED_ENV  # rl.cluster.session imports ray and torch; `reasonrl --help` imports this module

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.update(RAY_AUTH_MODE=auth_mode, TOKENIZERS_PARALLELISM="false", RAY_OVERRIDE_JOB_RUNTIME_ENV="1")
    return env


def build_job(config: str | None, overrides: list[str], resume: str | None, python: str = "python",
              presets: list[str] = ()) -> dict:
    """Everything `submit_job` needs: entrypoint, runtime_env, metadata; and the staging folder to clean up.
    presets: merged under the config here (as `reasonrl train --preset`), so the staged config holds them."""
    if resume and presets:
        raise ConfigError("--preset applies to a fresh run; a resumed run's config.yaml already holds its preset")
    stage_root = Path(tempfile.mkdtemp(prefix="reasonrl-job-"))
    try:
        return _build_job(stage_root, config, overrides, resume, python, list(presets))
    except BaseException:
        shutil.rmtree(stage_root, ignore_errors=True)  # nothing is sent: no staging folder is left behind
        raise


def _build_job(stage_root: Path, config: str | None, overrides: list[str], resume: str | None, python: str,
               presets: list[str]) -> dict:
    stage = stage_root / PACKAGE
    stage.mkdir()
    (stage / "__init__.py").write_text('"""Files `reasonrl submit` sent along with a job."""\n')
    if resume:
        run_dir = Path(resume).resolve()
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {saved} does not exist here (the run folder must be visible to the "
                              "submitting machine, or resume on the cluster with `reasonrl train --resume`)")
        raw = yaml.safe_load(saved.read_text())
        stage_rewards(raw.get("reward", {}).get("functions", []), stage)  # restage the modules the run names
        args = ["--resume", str(run_dir), *overrides]
    else:
        if not config:
            raise ConfigError("reasonrl submit needs a config file (e.g. configs/demo.yaml) or --resume RUN_DIR")
        # launch.run imports the reward registry (math-verify, sympy); `reasonrl --help` imports this module.
        from launch.run import load_training_config

        # Validated here, before anything reaches the cluster. What THIS machine lacks (vllm, GPUs) is not checked:
        # the job runs on the cluster, whose launch/job.py loads the staged config with those checks.
        cfg = load_training_config(config, overrides, check_environment=False, presets=presets)
        cfg.trainer.output_dir = str(Path(cfg.trainer.output_dir).resolve())
        raw = yaml.safe_load(dump_config(cfg))
        old = [f["fn"] for f in raw["reward"]["functions"]]
        raw["reward"]["functions"] = stage_rewards(raw["reward"]["functions"], stage)
        renamed = dict(zip(old, (f["fn"] for f in raw["reward"]["functions"])))
        raw["reward"]["accuracy"] = renamed.get(raw["reward"]["accuracy"], raw["reward"]["accuracy"])
        run_dir = Path(cfg.trainer.output_dir)
        name = f"{Path(config).stem}.yaml"
        (stage / name).write_text(yaml.safe_dump(raw, sort_keys=False))
        args = [name]
    entrypoint = " ".join([python, "-m", "launch.job", *(shlex.quote(a) for a in args)])
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES, "py_modules": [str(stage)],
                   "env_vars": _job_env(resolve_auth_mode(raw.get("ray", {}).get("auth_mode"), local=False))}
    return {"entrypoint": entrypoint, "runtime_env": runtime_env, "metadata": {"run_dir": str(run_dir)},
            "stage": stage_root, "run_dir": run_dir}


# ------------------------------------------------------------------------------------------------ commands
def submit(args) -> int:
    job = build_job(args.config, args.overrides, args.resume, args.python, args.preset or [])
    auth = job["runtime_env"]["env_vars"]["RAY_AUTH_MODE"]
    try:
        jc = client(args.address, auth)
        job_id = jc.submit_job(entrypoint=job["entrypoint"], runtime_env=job["runtime_env"],
                               metadata=job["metadata"], submission_id=args.job_id)
    finally:
        shutil.rmtree(job["stage"], ignore_errors=True)  # Ray uploaded its own copy
    print(job_id, flush=True)
    print(f"reasonrl: submitted; run folder {job['run_dir']} (must be visible to every node); follow with "
          f"`reasonrl logs {job_id} --follow`", file=sys.stderr)
    return wait(jc, job_id) if args.wait else 0


def wait(jc, job_id: str, poll_s: float = 2.0) -> int:
    """Print the job's log as it grows until it ends; the driver's exit code (1 if it has none)."""
    shown = 0
    while True:
        status = str(jc.get_job_status(job_id).value)
        text = jc.get_job_logs(job_id)
        if len(text) > shown:
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
        if status in TERMINAL:
            info = jc.get_job_info(job_id)
            print(f"reasonrl: job {job_id} {status}", file=sys.stderr)
            if status == "SUCCEEDED":
                return 0
            code = getattr(info, "driver_exit_code", None)
            return code if code not in (None, 0) else 1
        time.sleep(poll_s)


def status(args) -> int:
    jc = client(args.address)
    info = jc.get_job_info(args.job_id)
    run_dir = (info.metadata or {}).get("run_dir", "?")
    code = getattr(info, "driver_exit_code", None)
    print(f"{args.job_id} {info.status.value} run_dir={run_dir}" + (f" exit_code={code}" if code is not None else "")
          + (f" message={info.message.splitlines()[0]!r}" if info.message else ""))
    return 0


def logs(args) -> int:
    jc = client(args.address)
    if not args.follow:
        sys.stdout.write(jc.get_job_logs(args.job_id))
        return 0
    return wait(jc, args.job_id)


def stop(args) -> int:
    jc = client(args.address)
    stopped = jc.stop_job(args.job_id)
    print(f"{args.job_id} {'stopping' if stopped else 'was not running'}")
    return 0


def _user_errors() -> tuple[type, ...]:
    """What a job command reports in one line: an unreachable cluster, an unknown job id, and a cluster that refuses
    the client's token (or its lack of one: Ray's AuthenticationError is none of the built-in kinds)."""
    from ray.exceptions import AuthenticationError  # imported when a command runs; `reasonrl --help` imports this module

    return ConnectionError, RuntimeError, ValueError, AuthenticationError


def _one_line_errors(fn):
    """An unreachable cluster, an unknown job id or a refused token is the user's input: one line, exit 2 (no
    traceback)."""
    def run_command(args) -> int:
        try:
            return fn(args)
        except Exception as err:
            if isinstance(err, ConfigError) or not isinstance(err, _user_errors()):
                raise
            print(f"reasonrl {args.command}: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}",
                  file=sys.stderr)
            return 2
    return run_command


def add_commands(sub) -> None:
    """The job subcommands of `reasonrl` (launch/cli.py)."""
    address = dict(metavar="URL", help=f"Ray dashboard / job API address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    p = sub.add_parser("submit", help="run a config as a job on a Ray cluster (Ray Jobs API)")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=200")
    p.add_argument("--address", **address)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (on the cluster's filesystem)")
    p.add_argument("--wait", action="store_true", help="follow the logs until the job ends; exit with its code")
    p.add_argument("--job-id", help="submission id (default: chosen by Ray)")
    p.add_argument("--preset", action="append", metavar="NAME", help="merge configs/presets/NAME.yaml (or a YAML "
                   "file) under the config, as `reasonrl train --preset`, e.g. --preset gpu")
    # Ray offers no documented way to name the interpreter its own processes run in an entrypoint, so the default
    # stays `python`; launch/job.py says in one line, and fails the job, when that python lacks the packages.
    p.add_argument("--python", default="python", help="python executable on the cluster, with the project's "
                   "packages installed (default: python, as the cluster's shell finds it)")
    p.set_defaults(handler=_one_line_errors(submit))
    for name, fn, text in (("status", status, "state of a submitted job"), ("logs", logs, "a job's log"),
                           ("stop", stop, "stop a running job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        p.add_argument("--address", **address)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        p.set_defaults(handler=_one_line_errors(fn))

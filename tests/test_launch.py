"""The launch layer: which way the packages import, the job entrypoint's interpreter check, the config checks every
training path makes, and Ctrl-C / SIGTERM in `reasonrl train` (the last one slow: a real run)."""
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs/tiny.yaml")
# package -> the packages it must never import: dependencies point launch -> eval -> rl -> rewards.
FORBIDDEN = {"rl": {"eval", "launch"}, "eval": {"launch"}, "rewards": {"rl", "eval", "launch"}, "launch": set()}


# ------------------------------------------------------------------------------------------ import direction
def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`: module level, inside functions, relative ones
    resolved, and importlib.import_module / __import__ calls with a literal name."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]  # `from eval import runner`
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if called in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    top = module.split(".")[0]
    return [f"{module}:{line} imports {name}" for line, name in imported_modules(source, module, is_package)
            if name.split(".")[0] in FORBIDDEN.get(top, set())]


def _modules(*packages: str):
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            is_package = rel.name == "__init__"
            parts = rel.parts[:-1] if is_package else rel.parts
            yield ".".join(parts), path, is_package


def test_layers_import_one_way():
    found = []
    for module, path, is_package in _modules(*FORBIDDEN):
        found += violations(path.read_text(), module, is_package)
    assert not found, "imports against the launch -> eval -> rl -> rewards direction:\n" + "\n".join(found)


def test_the_import_check_sees_function_level_relative_and_dynamic_imports():
    """The check above reads source, so it must catch every form (or it would pass for the wrong reason)."""
    assert violations("def f():\n    from eval.benchmarks import parse_benchmarks\n", "rl.config.schema")
    assert violations("import launch.cli\n", "eval.runner")
    assert ("rl.config", "rl.config.Config") == tuple(n for _, n in imported_modules("from .config import Config\n",
                                                                                     "rl.trainer"))
    assert "rewards.math" in {n for _, n in imported_modules("from . import math\n", "rewards", is_package=True)}
    assert violations("from rl import checkpoint\n", "rewards.math")
    assert violations("import importlib\nimportlib.import_module('eval.in_training')\n", "rl.trainer")
    assert not violations("from rl.config.schema import Config\nfrom eval.runner import VERIFIER\n", "launch.run")
    assert not violations("from . import register\n", "rewards.math")


def test_layers_import_without_cycles():
    """Within and across rl/, rewards/, eval/ and launch/ the import graph (function-level imports included) has
    no cycle."""
    layers = ("launch", "eval", "rl", "rewards")
    known = {m for m, _, _ in _modules(*layers)}
    graph = {}
    for module, path, is_package in _modules(*layers):
        names = {name for _, name in imported_modules(path.read_text(), module, is_package)}
        # `from pkg import sub` inside pkg/__init__.py reads as pkg importing pkg: a package loading its own
        # submodules is no cycle (the submodule's edge, if it imports the package back, is).
        graph[module] = {n for n in names if n in known and n != module}

    def visit(node, stack):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(node):], node]))
        for nxt in graph.get(node, ()):
            visit(nxt, [*stack, node])

    for module in graph:
        visit(module, [])


# --------------------------------------------------------------------------------------- the job entrypoint
def test_job_on_a_python_without_the_packages_fails_in_one_line():
    """`python -S` (no site-packages) stands in for a cluster whose `python` is not the project's environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    assert subprocess.run([sys.executable, "-S", "-c", "import ray"], env=env, cwd=ROOT,
                          capture_output=True).returncode != 0, "this interpreter still finds ray with -S"
    proc = subprocess.run([sys.executable, "-S", "-m", "launch.job", "tiny.yaml", "trainer.max_steps=1"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and not proc.stdout, proc.stderr
    line = lines[0]
    assert sys.executable in line and "ray" in line and "math_verify" in line and "torch" in line
    assert "ray start" in line and "reasonrl submit --python" in line


def test_job_checks_every_runtime_dependency_of_pyproject():
    tomllib = pytest.importorskip("tomllib")
    from launch.job import RUNTIME_PACKAGES, missing_modules

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower() for d in deps}
    assert names - {"trl"} == set(RUNTIME_PACKAGES)  # trl: bench/ and tests only
    assert missing_modules() == []  # the venv running the tests has them all


def test_submit_sends_the_job_entrypoint(tmp_path):
    from launch import job, submit

    assert submit.PACKAGE == job.PACKAGE
    built = submit.build_job(TINY, [f"trainer.output_dir={tmp_path / 'run'}"], None)
    try:
        assert built["entrypoint"] == "python -m launch.job tiny.yaml"
    finally:
        shutil.rmtree(built["stage"], ignore_errors=True)
    # Overrides are baked into the staged config; a resumed run passes its own.
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text(Path(TINY).read_text())
    built = submit.build_job(None, ["trainer.max_steps=3"], str(run), python="/opt/venv/bin/python")
    shutil.rmtree(built["stage"], ignore_errors=True)
    assert built["entrypoint"] == f"/opt/venv/bin/python -m launch.job --resume {run} trainer.max_steps=3"


def test_submit_merges_a_preset_into_the_staged_config_without_checking_this_machine(tmp_path):
    # --preset gpu names vllm and GPUs, which this CPU machine lacks: the job runs on the cluster, and its
    # `reasonrl train` (launch/job.py) checks the environment there; here the config is validated only.
    from launch import submit
    from rl.config.schema import ConfigError

    built = submit.build_job(TINY, [f"trainer.output_dir={tmp_path / 'run'}"], None, presets=["gpu"])
    try:
        staged = yaml.safe_load((Path(built["runtime_env"]["py_modules"][0]) / "tiny.yaml").read_text())
    finally:
        shutil.rmtree(built["stage"], ignore_errors=True)
    assert staged["rollout"]["backend"] == "vllm" and staged["model"]["dtype"] == "bfloat16"
    assert staged["placement"]["colocate"] is True and staged["weight_sync"]["mode"] == "object_store"
    with pytest.raises(ConfigError, match="--preset applies to a fresh run"):
        submit.build_job(None, [], str(tmp_path), presets=["gpu"])


# --------------------------------------------------------------------------------- config checks on every path
BAD = "trainer.eval_benchmarks=[math500, mat500]"
MESSAGE = "config key 'trainer.eval_benchmarks': unknown benchmark 'mat500'; known: math500"


def test_eval_benchmarks_are_checked_and_normalised_by_the_launch_layer():
    from launch.run import load_training_config
    from rl.config.schema import ConfigError

    with pytest.raises(ConfigError) as err:
        load_training_config(TINY, [BAD])
    assert str(err.value).startswith(MESSAGE) and "did you mean 'math500'?" in str(err.value)
    assert "\n" not in str(err.value)
    cfg = load_training_config(TINY, ["trainer.eval_benchmarks=[' math500', aime24, math500]"])
    assert cfg.trainer.eval_benchmarks == ["math500", "aime24"]


@pytest.mark.parametrize("argv", [
    ["train", TINY, BAD],
    ["experiment", TINY, "--out", "{tmp}/exp", "--set", BAD],
    ["submit", TINY, BAD, "--address", "http://127.0.0.1:9"],  # refused here: the cluster is never contacted
], ids=["train", "experiment", "submit"])
def test_every_training_path_refuses_a_bad_benchmark_in_one_line(argv, tmp_path, capsys):
    from launch.cli import main

    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"reasonrl: {MESSAGE}"), err
    assert not (tmp_path / "exp").exists()


def test_job_entrypoint_runs_reasonrl_train_on_the_staged_config(tmp_path, monkeypatch, capsys):
    from launch import job

    stage = tmp_path / job.PACKAGE
    stage.mkdir()
    (stage / "__init__.py").write_text("")
    raw = yaml.safe_load(Path(TINY).read_text())
    raw["trainer"]["eval_benchmarks"] = ["mat500"]
    (stage / "bad.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, job.PACKAGE, raising=False)  # one staged by an earlier test in this process
    assert job.main(["bad.yaml"]) == 2  # the staged file was found, handed to `reasonrl train` and checked
    assert f"reasonrl: {MESSAGE}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- Ctrl-C, SIGTERM
@pytest.mark.parametrize("name,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupted_run_is_one_line_with_the_signal_exit_code(name, code, capsys):
    from launch.cli import _interrupted

    ckpt = Path("/runs/x/checkpoints/step-000003")
    assert _interrupted(SimpleNamespace(step=3, checkpoint=ckpt, output_dir="/runs/x", signal_name=name)) == code
    assert capsys.readouterr().err == (f"reasonrl: interrupted ({name}) after step 3; last complete checkpoint: "
                                       f"{ckpt}; continue with: reasonrl train --resume /runs/x\n")
    _interrupted(SimpleNamespace(step=0, checkpoint=None, output_dir="/runs/x", signal_name=name))
    assert "after step 0; no checkpoint written yet; start it again with: reasonrl train /runs/x/config.yaml " \
           "trainer.overwrite=true" in capsys.readouterr().err


def _stat(pid: str) -> tuple[int, int]:
    """(parent pid, session id) from /proc/PID/stat (the command name may hold spaces: parse after its ')')."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[1]), int(fields[3])


def run_processes(driver_pid: int, *markers: str) -> list[str]:
    """Live processes of the run: in the driver's session (start_new_session), or naming one of `markers` (the
    run's folder, its private Ray temp dir) on their command line, and every descendant of those (Ray's `ray::`
    workers rename themselves)."""
    procs = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            procs[int(d.name)] = (*_stat(d.name), cmd)
        except (OSError, ValueError, IndexError):
            continue
    ours = {pid for pid, (_, sid, cmd) in procs.items()
            if cmd and (sid == driver_pid or any(m in cmd for m in markers))}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _, cmd) in procs.items() if ppid in ours and cmd and pid not in ours}
        grew, ours = bool(more), ours | more
    return [f"{pid} {procs[pid][2][:120]}" for pid in sorted(ours)]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_the_run_cleanly(sig, tmp_path):
    # A private Ray temp dir (short: Ray's socket paths must stay under 107 characters) marks the run's processes.
    ray_tmp = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    out = tmp_path / "run"
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    stdout, stderr = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    # A shell without job control starts background jobs with SIGINT ignored (`make test &`), the child inherits
    # that through exec and Python then leaves Ctrl-C ignored: a handler here (reset to the default by exec) makes
    # the run see the Ctrl-C a terminal would deliver, however the suite was started.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "train", TINY, "trainer.max_steps=50", "trainer.save_every=1",
             f"trainer.output_dir={out}", "trainer.eval_at_start=false", "trainer.eval_at_end=false",
             "logging.progress=false", "logging.plots=false", "logging.tensorboard=false"],
            cwd=ROOT, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 900
        while not _has_step(out / "metrics.jsonl"):
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training step within 15 minutes"
            time.sleep(1)
        # Ctrl-C in a terminal signals the whole foreground process group; a scheduler's SIGTERM, the driver.
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        code = proc.wait(timeout=300)
        err = (tmp_path / "stderr").read_text()
        assert code == 128 + sig, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("reasonrl: interrupted")]
        assert len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"reasonrl: interrupted ({signal.Signals(sig).name}) after step ")
        named = re.search(r"last complete checkpoint: (.+?); continue with: reasonrl train --resume (.+)$", lines[0])
        assert named, lines[0]
        assert Path(named.group(1)).is_dir() and Path(named.group(2)) == out.resolve()
        left = run_processes(proc.pid, ray_tmp, str(tmp_path))
        for _ in range(30):  # Ray's daemons notice their driver is gone within seconds
            if not left:
                break
            time.sleep(1)
            left = run_processes(proc.pid, ray_tmp, str(tmp_path))
        assert not left, "processes of the run left behind:\n" + "\n".join(left)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for line in run_processes(proc.pid, ray_tmp, str(tmp_path)):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        stdout.close(), stderr.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _has_step(path: Path) -> bool:
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            if "step" in json.loads(line):
                return True
        except ValueError:  # a line still being written
            continue
    return False


def test_eval_records_are_scored_through_rl_scoring(tmp_path):
    """eval.runner.generate_records on a real model and the real verifier, without Ray: the rollout worker and the
    reward worker (math-verify in its isolated child process) run in this process, behind the two calls the Ray
    groups make to them. The model answers \\boxed{4} or \\boxed{5} (tests/answer_model.py), so the verdicts mix
    right and wrong, and every number is recomputed from the saved sample file; a rescore of that file agrees."""
    import math

    from eval.metrics import benchmark_metrics
    from eval.rescore import rescore
    from eval.runner import SETTINGS_FILE, VERIFIER, EvalSettings, generate_records, read_samples, write_samples
    from eval.stats import bootstrap_ci
    from rewards.isolation import RewardResult
    from rl.rollout.worker import RolloutWorker
    from rl.scoring.worker import RewardWorker
    from tests.answer_model import save_answer_model

    class Rollouts:  # RolloutGroup.generate's signature over one worker (the group adds Ray and the weight check)
        def __init__(self, worker):
            self.worker, self.weights = worker, []

        def generate(self, prompts, params, seed, weights=None):
            self.weights.append(weights)
            return self.worker.generate(prompts, params, seed)

    class Rewards:  # RewardGroup.score's signature over one worker
        def __init__(self, worker):
            self.worker = worker

        def score(self, prompts, completions, columns, group_size):
            self.sizes = group_size
            return RewardResult(**self.worker.score(prompts, completions, columns))

    rollouts = Rollouts(RolloutWorker(save_answer_model(tmp_path / "model"), num_threads=1))
    rewards = Rewards(RewardWorker([{"fn": VERIFIER}], timeout=60))
    rows = [{"id": "a", "problem": "2+2", "answer": "4"}, {"id": "b", "problem": "10/2", "answer": "5.0"},
            {"id": "c", "problem": "3+4", "answer": "7"}]
    settings = EvalSettings(samples=4, max_new_tokens=12, temperature=1.0)
    try:
        records, fails = generate_records(rollouts, rewards, rows, ["p0", "p1", "p2"], settings.sampling(), 11,
                                          "mini", weights="W")
    finally:
        rewards.worker.rewards.close()
    assert rollouts.weights == ["W"] and fails == {"verifier_failures": 0, "verifier_timeouts": 0}
    assert rewards.sizes == [4, 4, 4]  # one group size per problem
    out = tmp_path / "eval"
    (out / "samples").mkdir(parents=True)
    write_samples(out / "samples" / "mini.jsonl", records)
    saved = read_samples(out / "samples" / "mini.jsonl")
    assert [(r["problem_id"], r["sample"]) for r in saved] == [(p, s) for p in "abc" for s in range(4)]
    assert all(r["completion"] in ("\\boxed{4}", "\\boxed{5}") and r["finish_reason"] == "stop" for r in saved)
    # math-verify's verdict, recomputed from each saved response: the box holds the gold (5 equals 5.0)
    assert [r["correct"] for r in saved] == [float(r["extracted"]) == float(r["answer"]) for r in saved]
    by_problem = [[r["correct"] for r in saved if r["problem_id"] == p] for p in "abc"]
    assert 0 < sum(map(sum, by_problem)) < 8 and not any(by_problem[2])  # right, wrong, and never right

    m = benchmark_metrics(records, seed=0)
    per_problem = [sum(c) / 4 for c in by_problem]
    assert m["accuracy"] == pytest.approx(sum(per_problem) / 3) and 0 < m["accuracy"] < 1
    assert m["accuracy_ci"] == list(bootstrap_ci(per_problem, seed=0))
    assert m["accuracy_ci"][0] < m["accuracy"] < m["accuracy_ci"][1]
    # unbiased pass@k: 1 - C(n - c, k) / C(n, k) per problem, averaged over problems
    for k in (1, 2, 4):
        expected = sum(1 - math.comb(4 - sum(c), k) / math.comb(4, k) for c in by_problem) / 3
        assert m["pass_at_k"][str(k)] == pytest.approx(expected), k
    assert m["pass_at_k"]["1"] == pytest.approx(m["accuracy"])
    assert m["tokens"]["mean"] == sum(r["tokens"] for r in saved) / 12 and m["truncation_rate"] == 0.0

    (out / SETTINGS_FILE).write_text(json.dumps({"model": "answer", "seed": 0, "benchmarks": {"mini": {}}}))
    rescored = rescore(out, timeout=60)["mini"]
    assert rescored["accuracy"] == m["accuracy"] and rescored["pass_at_k"] == m["pass_at_k"]
    assert [r["correct"] for r in read_samples(out / "samples" / "mini.jsonl")] == [r["correct"] for r in saved]



"""Run reward functions in a persistent child process, so a crash, hang or exception costs only the samples it hit.

Why a child process (spawn context) rather than threads or the caller's process:
  * math-verify's timeouts use ``signal.alarm`` and raise off the main thread; the child runs every function in
    ITS main thread, so they work there. The child resolves the spec strings itself (nothing unpicklable crosses).
  * a hang can only be stopped from outside: the parent waits with ``conn.poll(timeout)`` and SIGKILLs the child.
  * a segfault / ``os._exit`` in user code takes down the child, not the trainer.

Per function and chunk: one call for the whole chunk. If it raises, times out or kills the child, the chunk is
retried sample by sample under ONE shared extra budget of ``timeout`` seconds (each sample may burn at most half of
what is left, so a single hanging sample cannot starve the samples after it); samples that do not finish score 0.
A hang therefore costs about 2x timeout, plus the child restarts (which are not charged to the budget).
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import numbers
import os
import time
from dataclasses import dataclass, field

from rewards.registry import RewardSpecError

log = logging.getLogger("reasonrl.rewards")
MAX_LOG_CHARS = 500  # a log message longer than this is cut (see CapMessages)


class CapMessages(logging.Filter):
    """Cut a record's message to `limit` characters (with a note of how much was cut).

    Reward functions see model output, and libraries log it: math-verify's parse timeout logs the whole
    unparseable answer (100,000 characters of an adversarial completion), which Ray forwards line for line to the
    run's console. Attached to a logger it covers the records logged through that logger (not its children); to a
    handler, every record the handler writes. A record logged with `extra={"uncapped": True}` passes whole.
    """

    def __init__(self, limit: int = MAX_LOG_CHARS):
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "uncapped", False):  # the framework's own diagnostics (a watchdog stack dump), whole
            return True
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is logging's to report, not ours
            return True
        if len(msg) > self.limit:
            record.msg, record.args = f"{msg[:self.limit]} [... {len(msg) - self.limit} more characters]", None
        return True


def cap_log_messages(*targets: logging.Logger | logging.Handler | str, limit: int = MAX_LOG_CHARS) -> None:
    """Attach CapMessages to loggers (objects or names) and handlers, once each."""
    for target in targets:
        target = logging.getLogger(target) if isinstance(target, str) else target
        if not any(isinstance(f, CapMessages) for f in target.filters):
            target.addFilter(CapMessages(limit))


cap_log_messages(log)  # its failure messages quote what the reward function raised

_MAX_ERRORS = 20  # messages kept in RewardResult.errors
_STARTUP_TIMEOUT = 300.0  # child start + spec resolution; a config problem, not a reward timeout
_MAX_RESTARTS = 4  # per retry phase: a function that crashes on every sample must not respawn N times


@dataclass
class RewardResult:
    scores: dict[str, list[float]] = field(default_factory=dict)  # per function name (= spec string)
    failures: dict[str, int] = field(default_factory=dict)  # samples lost to exception/timeout/crash/bad value
    timeouts: dict[str, int] = field(default_factory=dict)  # samples lost to time (subset of failures)
    nones: dict[str, int] = field(default_factory=dict)  # samples the function returned None for (scored 0.0)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per function, retries included
    errors: list[str] = field(default_factory=list)  # first few failure messages, for logging


def merge_results(parts: list[RewardResult]) -> RewardResult:
    """Results of consecutive chunks of samples as one: scores concatenated in order, counts and seconds summed,
    error messages kept in order."""
    out = RewardResult()
    for part in parts:
        for name, vals in part.scores.items():
            out.scores.setdefault(name, []).extend(vals)
        for key in ("failures", "timeouts", "nones", "seconds"):
            totals = getattr(out, key)
            for name, v in getattr(part, key).items():
                totals[name] = totals.get(name, 0) + v
        out.errors.extend(part.errors)
    return out


def weighted_total(result: RewardResult, weights: dict[str, float] | None = None) -> list[float]:
    """Per-sample sum of ``weight * score`` over functions; a function missing from ``weights`` weighs 1.0."""
    weights = weights or {}
    unknown = set(weights) - set(result.scores)
    if unknown:  # a misspelt name would silently drop a reward term
        raise ValueError(f"weights for unknown reward functions {sorted(unknown)}; known: {sorted(result.scores)}")
    total: list[float] | None = None
    for name, scores in result.scores.items():
        w = float(weights.get(name, 1.0))
        total = [w * s for s in scores] if total is None else [t + w * s for t, s in zip(total, scores, strict=True)]
    return total or []


# ----------------------------------------------------------------------------------------------------- child side
def _normalize(out, n: int):
    """Make the result picklable and plain: list of float | None | str (a str marks a non-numeric value)."""
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__") or not hasattr(out, "__iter__"):
        return f"returned {type(out).__name__}, not a list"
    vals = list(out)
    if len(vals) != n:
        return f"returned {len(vals)} values for {n} samples"
    return [_plain(v) for v in vals]


def _plain(v):
    if v is None or isinstance(v, numbers.Real):
        return None if v is None else float(v)
    try:  # 0-d / one-element numpy arrays and torch tensors
        item = v.item()
        if isinstance(item, numbers.Real):
            return float(item)
    except Exception:
        pass
    return f"non-numeric {type(v).__name__}"


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this child when its parent dies, even mid-way through a hung reward call."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: EOF on the pipe still ends an idle child


def _stack_dump_on_sigusr1() -> None:
    """The watchdog's fallback stack dump (rl.cluster.watchdog, when py-spy cannot attach): its worker exports where
    faulthandler writes; a hanging reward's frame is in this process, not in the worker waiting for it."""
    pattern = os.environ.get("REASONRL_STACK_FILE")
    if pattern:
        import faulthandler
        import signal

        fh = open(pattern.format(pid=os.getpid()), "w")  # open for the process's life: faulthandler writes to it
        faulthandler.register(signal.SIGUSR1, file=fh, all_threads=True)


def _child_main(conn, specs) -> None:
    from rewards.registry import resolve  # importing it runs rewards/__init__.py, which registers the built-ins

    _die_with_parent()
    _stack_dump_on_sigusr1()
    try:
        fns = [(resolve(s), kw) for s, kw in specs]
    except Exception as e:
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # parent went away
            return
        if msg is None:
            return
        idx, prompts, completions, columns = msg
        fn, kw = fns[idx]
        try:
            out = fn(prompts, completions, **{**columns, **kw})
            conn.send(("ok", _normalize(out, len(completions))))
        except (Exception, SystemExit) as e:  # sys.exit() in user code is an error, not a reason to stop serving
            conn.send(("err", f"{type(e).__name__}: {e}"[:500]))


# ---------------------------------------------------------------------------------------------------- parent side
class IsolatedRewards:
    """Score (prompts, completions, columns) with reward functions given as (spec, kwargs), in a child process.

    ``timeout`` (seconds) limits each call; None waits forever (a crash is still caught). ``chunk_size`` splits a
    batch into calls of at most that many samples (None: one call per function), so the timeout is per chunk.
    Specs are resolved only in the child: a reward module that loads a model at import must not load it here too.
    One score() at a time per instance (one worker, one pipe); score() itself may run on any thread.
    """

    def __init__(self, specs: list[tuple[str, dict]], timeout: float | None, chunk_size: int | None = None):
        self.specs = [(str(s), dict(kw or {})) for s, kw in specs]
        self.names = []
        for s, _ in self.specs:  # the name is the spec string; the same spec twice (other kwargs) gets '#2', ...
            name, k = s, 2
            while name in self.names:
                name, k = f"{s}#{k}", k + 1
            self.names.append(name)
        self.timeout = timeout
        self.chunk_size = chunk_size
        self._proc = None
        self._conn = None

    # -- child management
    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, self.specs), daemon=True, name="reward-worker")
        self._proc.start()
        child.close()  # otherwise our copy keeps the pipe open and a dead child never reads as EOF
        self._conn = parent
        if not parent.poll(_STARTUP_TIMEOUT):
            self._kill()
            raise RuntimeError(f"reward worker did not start within {_STARTUP_TIMEOUT:.0f} s")
        try:
            kind, msg = parent.recv()
        except EOFError:
            code = self._kill()
            raise RuntimeError(f"reward worker died during startup (exit code {code})") from None
        if kind != "ready":
            self._kill()
            raise RewardSpecError(f"reward worker could not resolve reward specs: {msg}")

    def start(self) -> None:
        """Start the worker now (otherwise the first score() does): surfaces a bad spec at setup time."""
        if self._proc is None:
            self._start()

    def _kill(self):
        code = None
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()  # SIGKILL: a function stuck in C code ignores anything softer
            self._proc.join(5)
            code = self._proc.exitcode
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        return code

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
                self._proc.join(2)
            except (OSError, ValueError):
                pass
        self._kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _call(self, idx: int, prompts, completions, columns, limit: float | None):
        """One call in the child -> ('ok', values) | ('err', msg) | ('timeout', msg) | ('died', msg)."""
        if self._proc is None:
            self._start()
        try:
            self._conn.send((idx, prompts, completions, columns))
            ready = self._conn.poll(limit)
            if ready:
                return self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            return "died", f"worker died (exit code {self._kill()})"
        self._kill()
        return "timeout", f"timed out after {limit:.1f} s"

    # -- scoring
    def score(self, prompts, completions, columns: dict[str, list] | None = None) -> RewardResult:
        columns = dict(columns or {})
        n = len(completions)
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            raise ValueError(f"prompts, completions and every column must have {n} entries")
        res = RewardResult()
        step = self.chunk_size or max(n, 1)
        for idx, name in enumerate(self.names):
            t0 = time.perf_counter()
            res.scores[name] = [0.0] * n
            res.failures[name] = res.timeouts[name] = res.nones[name] = 0
            for lo in range(0, n, step):
                self._score_chunk(idx, name, list(range(lo, min(n, lo + step))), prompts, completions, columns, res)
            res.seconds[name] = time.perf_counter() - t0
        return res

    def _score_chunk(self, idx, name, ids, prompts, completions, columns, res: RewardResult) -> None:
        def take(i_list):
            return ([prompts[i] for i in i_list], [completions[i] for i in i_list],
                    {k: [v[i] for i in i_list] for k, v in columns.items()})

        kind, payload = self._call(idx, *take(ids), self.timeout)
        if kind == "ok":
            self._store(name, ids, payload, res)
            return
        self._fail(res, name, 0, f"{len(ids)} samples: {payload}; retrying one by one", count=False)
        # Retry phase: one shared budget; each sample may use at most half of what is left (the last one all).
        budget_end = None if self.timeout is None else time.monotonic() + self.timeout
        restarts = 0
        for k, i in enumerate(ids):
            if self._proc is None:  # killed by a timeout or crashed: respawn, but not forever
                if restarts >= _MAX_RESTARTS:
                    rest = ids[k:]
                    self._fail(res, name, len(rest), f"{len(rest)} samples: worker crashed/hung too often")
                    return
                restarts += 1
                t = time.monotonic()
                self._start()
                if budget_end is not None:  # the restart is not the function's time: don't charge it
                    budget_end += time.monotonic() - t
            left = None if budget_end is None else budget_end - time.monotonic()
            if left is not None and left <= 0:
                rest = ids[k:]
                self._fail(res, name, len(rest), f"{len(rest)} samples: retry budget exhausted", timeout=True)
                return
            limit = None if left is None else (left if k == len(ids) - 1 else left / 2)
            kind, payload = self._call(idx, *take([i]), limit)
            if kind == "ok":
                self._store(name, [i], payload, res)
            else:
                self._fail(res, name, 1, f"sample {i}: {payload}", timeout=kind == "timeout")

    def _store(self, name, ids, values, res: RewardResult) -> None:
        if isinstance(values, str):  # wrong type / wrong length: the whole call is unusable
            self._fail(res, name, len(ids), f"{len(ids)} samples: {values}")
            return
        for i, v in zip(ids, values):
            if v is None:
                res.nones[name] += 1  # "not applicable" (TRL semantics): 0.0, but not an error
            elif isinstance(v, str) or not math.isfinite(v):
                self._fail(res, name, 1, f"sample {i}: {v if isinstance(v, str) else 'non-finite ' + repr(v)}")
            else:
                res.scores[name][i] = v

    def _fail(self, res: RewardResult, name, k, msg, timeout=False, count=True) -> None:
        if count:
            res.failures[name] += k
            if timeout:
                res.timeouts[name] += k
        text = f"reward {name!r}: {msg}"
        log.warning(text)
        if len(res.errors) < _MAX_ERRORS:
            res.errors.append(text)

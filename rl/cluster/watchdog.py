"""Calls on a role's actors with fault handling: re-dispatch after a restart, and a watchdog against hangs.

`call_all` replaces a bare `ray.get([...])` on a group's actors. It waits with `ray.wait`, so it sees each call
finish (or fail) on its own:
- a call whose actor died (and that Ray is recreating: `max_restarts`) is issued again on the same handle, after an
  optional `before_retry(actor)` hook (a rollout worker comes back with its initial weights and must be resynced
  first); Ray's own task retries stay off, because only we know about that hook;
- a call still running after `watchdog_seconds` fails the run with `StuckError`, naming the role, the actor and
  the method, after its Python stack was dumped (py-spy on the actor's node, or faulthandler via SIGUSR1 when
  py-spy cannot attach) into the log and the error.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

import ray

from rl.contracts import StaleWeightsError  # noqa: F401  (raised by rollout workers; re-exported here)

log = logging.getLogger("reasonrl")
POLL_S = 1.0
STACK_FILE = os.path.join(tempfile.gettempdir(), "reasonrl-stack-{pid}.txt")
STACK_FILE_ENV = "REASONRL_STACK_FILE"


class StuckError(RuntimeError):
    """A role made no progress for watchdog_seconds; the message names role, actor index and method."""




def setup_worker() -> None:
    """Ray `worker_process_setup_hook` (set by rl.cluster.session.init_ray): SIGUSR1 writes every thread's stack to a
    per-process file, the fallback when py-spy cannot attach."""
    path = STACK_FILE.format(pid=os.getpid())
    fh = open(path, "w")  # kept open for the life of the process: faulthandler writes to its descriptor
    faulthandler.register(signal.SIGUSR1, file=fh, all_threads=True)
    # Inherited by the worker's own children (a reward worker's isolated reward process registers the same
    # dump, rewards.isolation): where a reward hangs is the child's stack, not the actor's.
    os.environ[STACK_FILE_ENV] = STACK_FILE


def dead(err: BaseException) -> bool:
    # Only the actor's death (seen directly, or by a recreated worker that lost its state) is re-dispatched; an
    # exception raised by the call itself is a bug to surface. Ray's task errors subclass the cause's class.
    return isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, StaleWeightsError))


def call_all(role: str, method: str, calls: Sequence[tuple], watchdog_seconds: float | None = None,
             max_retries: int = 0, before_retry: Callable[[object], None] | None = None) -> list:
    """Run `actor.method.remote(*args)` for each (actor, args) in `calls`; return the results in order.

    Raises StuckError if a call runs longer than `watchdog_seconds`, and the actor's error if it died more than
    `max_retries` times (or any other error of a call at once).
    """
    results: list = [None] * len(calls)
    pending: dict = {}
    started: dict[int, float] = {}
    attempts = [0] * len(calls)
    recovering: dict[int, float] = {}

    def submit(i: int) -> None:
        actor, args = calls[i]
        pending[getattr(actor, method).remote(*args)] = i
        started[i] = time.monotonic()

    for i in range(len(calls)):
        submit(i)
    while pending:
        timeout = POLL_S if watchdog_seconds is None else min(POLL_S, watchdog_seconds)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
        for ref in ready:
            i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
            except Exception as err:
                # "Restarting" (ActorUnavailableError) is the same death seen again while Ray recreates the
                # actor: it does not use up a restart, but it may not last longer than the watchdog allows.
                again = isinstance(err, ray.exceptions.ActorUnavailableError) and attempts[i] > 0
                if not dead(err) or (not again and attempts[i] >= max_retries):
                    _cancel(pending)
                    raise
                if not again:
                    attempts[i] += 1
                    recovering[i] = time.monotonic()
                    log.warning("%s worker %d died during %s (%s); re-issuing its request (restart %d of %d)", role,
                                i, method, type(err).__name__, attempts[i], max_retries)
                try:
                    _recover(calls[i][0], before_retry, recovering[i] + (watchdog_seconds or 600.0), role, i)
                except Exception:
                    _cancel(pending)
                    raise
                submit(i)
        if watchdog_seconds is not None:
            now = time.monotonic()
            stuck = sorted(i for i in pending.values() if now - started[i] > watchdog_seconds)
            if stuck:
                dumps = {i: dump_stack(calls[i][0]) for i in stuck}
                _cancel(pending)
                for i, stack in dumps.items():
                    # Whole: the console caps long records (model output), and the hung frame is at the end
                    # (the worker's own stack comes first, its child processes' after it).
                    log.error("watchdog: %s %d stuck in %s for more than %.0f s; its stack:\n%s", role, i, method,
                              watchdog_seconds, stack, extra={"uncapped": True})
                first = stuck[0]
                raise StuckError(f"watchdog: {role} {'rank' if role == 'learner' else 'worker'} {first} made no "
                                 f"progress in {method} for {watchdog_seconds:.0f} s (trainer.watchdog_seconds)\n"
                                 f"its stack:\n{dumps[first]}")
    return results


def _cancel(pending: dict) -> None:
    for ref in pending:
        try:
            ray.cancel(ref, force=False)
        except Exception:  # best effort: the run is failing anyway and shutdown kills the actors
            pass


def _recover(actor, before_retry, deadline: float, role: str, index: int) -> None:
    """Wait until Ray has recreated `actor`, then run the hook (calls to a restarting actor fail at once with
    ActorUnavailableError instead of queueing, and the actor table may still say ALIVE for a moment)."""
    from ray._private import state

    while True:
        info = state.actors(actor_id=actor._actor_id.hex()) or {}
        if info.get("State") == "DEAD":
            raise ray.exceptions.RayActorError(error_msg=f"{role} worker {index} is dead and will not be restarted "
                                               "(placement.max_restarts exhausted)")
        if info.get("State") == "ALIVE":
            try:
                if before_retry is not None:
                    before_retry(actor)
                return
            except ray.exceptions.ActorUnavailableError:
                pass
        if time.monotonic() > deadline:
            raise StuckError(f"watchdog: {role} worker {index} was not recreated in time (trainer.watchdog_seconds)")
        time.sleep(0.5)


def actor_location(actor) -> tuple[int | None, str | None]:
    """(pid, node id) of an actor's current process, from the GCS actor table (no dashboard needed)."""
    try:
        from ray._private import state

        info = state.actors(actor_id=actor._actor_id.hex())
        return info.get("Pid") or None, info.get("Address", {}).get("NodeID")
    except Exception as err:
        log.debug("actor table lookup failed: %s", err)
        return None, None


def dump_stack(actor) -> str:
    """The Python stack of the process behind `actor`, taken on its own node."""
    pid, node = actor_location(actor)
    if pid is None:
        return "(no stack: the actor's process is unknown)"
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0)(_stack_of).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False) if node else "DEFAULT")
        return ray.get(task.remote(pid), timeout=60)
    except Exception as err:
        return f"(no stack for pid {pid}: {type(err).__name__}: {err})"


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (Linux /proc; [] elsewhere)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _stack_of(pid: int) -> str:
    """Runs on the stuck actor's node: py-spy if it can attach, else the faulthandler dump. Both include the
    actor's child processes: a reward worker waits on its isolated reward process, whose stack shows the hang."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.path.exists(spy):
        try:
            out = subprocess.run([spy, "dump", "--pid", str(pid), "--subprocesses"], capture_output=True, text=True,
                                 timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return f"[py-spy dump --pid {pid} --subprocesses]\n{out.stdout}"
        except (OSError, subprocess.TimeoutExpired):
            pass
    dumped = [p for p in [pid, *_descendants(pid)] if os.path.exists(STACK_FILE.format(pid=p))]
    if pid not in dumped:
        return f"(no stack for pid {pid}: py-spy failed and no faulthandler file {STACK_FILE.format(pid=pid)})"
    for p in dumped:  # only processes that registered the dump: SIGUSR1 would kill any other
        os.kill(p, signal.SIGUSR1)
    time.sleep(1.0)
    parts = []
    for p in dumped:
        with open(STACK_FILE.format(pid=p)) as fh:
            parts.append(f"[faulthandler, pid {p}]\n{fh.read()}")
    return "\n".join(parts)

"""The run lifecycle, written once for every algorithm: setup (config, model, data, placement, actor groups),
resume, the step loop, checkpoints, held-out evaluation and hooks, teardown, and a clean stop on Ctrl-C / SIGTERM.

What a step does is the algorithm's (rl/steps/: one step kind per `algorithm.name`); everything distributed sits
behind rl.cluster.session and rl.sync.owner, everything numerical in rl.algo.core. Hooks (the in-training benchmark eval) come
in from the layers above through `train(hooks=...)`, so nothing here imports them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from pathlib import Path

from rl.store import checkpoint
from rl.cluster.session import init_ray, shutdown
from rl.learner.group import LearnerGroup
from rl.scoring.group import RewardGroup
from rl.rollout.group import RolloutGroup
from rl.config.schema import Config, ConfigError, dump_config
from rl.data.loading import PromptSampler
from rl.store.atomic import write_atomic
from rl.config.gpu import check_run_environment
from rl.store.metrics import MetricsLogger, plot_curves
from rl.models import load_tokenizer, resolve_model
from rl.cluster.placement import ROLES, Placement, node_map
from rl.data.prompts import sampling_params
from rl.seeds import derive_seed
from rl.steps import Run, Step, make_step
from rl.sync.owner import WeightSync

log = logging.getLogger("reasonrl")


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run; every actor is already gone and the last complete checkpoint intact."""

    def __init__(self, step: int, checkpoint: Path | None, output_dir: str, signal_name: str):
        super().__init__(f"interrupted ({signal_name}) after step {step}")
        self.step, self.checkpoint, self.output_dir, self.signal_name = step, checkpoint, output_dir, signal_name


class _Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so both take the same clean-stop path."""


_signals_seen: list[str] = []  # SIGTERMs received during the current run (see _sigterm_as_interrupt)


def prepare_output_dir(cfg: Config, resume: bool) -> Path:
    """Absolute run folder (actors may not share the driver's working directory); an old run is never mixed in."""
    out_dir = Path(cfg.trainer.output_dir).resolve()
    cfg.trainer.output_dir = str(out_dir)
    holds_run = (out_dir / "metrics.jsonl").exists() or (out_dir / "checkpoints").exists()
    if holds_run and not resume:
        if not cfg.trainer.overwrite:
            raise FileExistsError(f"{out_dir} already holds a run: continue it with `reasonrl train --resume "
                                  f"{out_dir}`, or start over with trainer.overwrite=true (moves it aside)")
        aside = out_dir.with_name(f"{out_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        out_dir.rename(aside)
        log.warning("moved the previous run in %s to %s", out_dir, aside)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def train(cfg: Config, resume: bool = False, step_callback=None, hooks=()) -> dict:
    """Run a job; returns its summary (start step, data counts, held-out results).

    hooks: objects with `due(step)`, `run(step, run) -> dict` (entries for that step's metrics row, run is the
    rl.steps.Run) and `close()`, e.g. eval.in_training.BenchmarkEval. `step_callback(step, row)`, if given, is called
    once before the first step (row None) and after each step with its metrics row (bench/grpo_vs_trl.py paces its
    A/B comparison with it)."""
    check_run_environment(cfg)  # e.g. GPUs asked for on a machine without CUDA: before anything starts
    step_kind = make_step(cfg)
    model_path = resolve_model(cfg.model.path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_path)
    # Everything that can be wrong with the input is found before the run folder is touched or an actor starts.
    step_kind.check(tokenizer)
    items, data_stats = step_kind.items(tokenizer)
    log.info("training data %s", data_stats)
    eval_rows = step_kind.held_out(tokenizer)
    out_dir = prepare_output_dir(cfg, resume)
    last_ckpt = checkpoint.latest(out_dir) if resume else None
    if resume:
        if last_ckpt is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {out_dir / 'checkpoints'}")
        saved_seed = checkpoint.load_state(last_ckpt)["seed"]
        if saved_seed != cfg.trainer.seed:
            raise ConfigError(f"config key 'trainer.seed': the run was trained with seed {saved_seed}; a resumed "
                              f"run must keep it (got {cfg.trainer.seed})")
    (out_dir / "config.yaml").write_text(dump_config(cfg))

    wanted = set(step_kind.roles) | ({"rollout", "reward"} if eval_rows else set()) | ({"rollout"} if hooks else set())
    roles = tuple(r for r in ROLES if r in wanted)
    sampler = step_kind.make_sampler(items)  # rl.data.loading.PromptSampler unless the step draws otherwise
    progress = {"step": 0}
    init_ray(cfg)
    groups: list = []
    placement = None
    with _sigterm_as_interrupt():
        try:
            placement = Placement(cfg, roles)  # fails, naming the role, if the cluster cannot hold the run
            # Rollout first: on a GPU its engine sizes its memory before the learner takes its share.
            rollouts = _start(groups, "rollout" in roles, RolloutGroup, cfg, model_path, placement)
            rewards = _start(groups, "reward" in roles, RewardGroup, cfg, placement)
            learner = _start(groups, "learner" in roles, LearnerGroup, cfg, model_path, placement)
            start_step = restore(last_ckpt, learner, sampler, step_kind)
            progress["step"] = start_step
            with MetricsLogger(str(out_dir), tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                               total_steps=cfg.trainer.max_steps, start_step=start_step) as metrics:
                # What was read and skipped (JSONL: bad_lines names the first skipped line numbers).
                metrics.log_event("data", {"step": start_step, **data_stats})
                run = Run(cfg, out_dir, tokenizer, model_path, metrics, sampler, start_step, rollouts, rewards,
                          learner)
                if rollouts is not None and learner is not None:
                    run.weights = WeightSync(cfg, rollouts, learner, learner_version=start_step)
                summary = {"start_step": start_step, "data": data_stats}
                summary.update(run_loop(run, step_kind, eval_rows, hooks, step_callback, progress))
            if cfg.logging.plots:
                plot_curves(str(out_dir / "metrics.jsonl"), str(out_dir), keys=step_kind.plot_keys)
            return summary
        except KeyboardInterrupt as err:
            step_kind.abort()
            name = "SIGTERM" if isinstance(err, _Terminated) or "SIGTERM" in _signals_seen else "SIGINT"
            raise RunInterrupted(progress["step"], checkpoint.latest(out_dir), str(out_dir), name) from None
        finally:
            shutdown(*groups)
            for hook in hooks:
                hook.close()  # e.g. the benchmark eval's own verifier worker
            if placement is not None:
                placement.remove()


def _start(groups: list, wanted: bool, group, *args):
    """Start one actor group if the run needs it; appended at once, so a failure half-way still kills it."""
    if not wanted:
        return None
    groups.append(group(*args))
    return groups[-1]


def run_loop(run: Run, step_kind: Step, eval_rows: list[dict], hooks, step_callback, progress: dict) -> dict:
    cfg, metrics, start_step = run.cfg, run.metrics, run.start_step
    summary: dict = {}
    nodes = {role: group.nodes() for role, group in (("rollout", run.rollouts), ("reward", run.rewards),
                                                      ("learner", run.learner)) if group is not None}
    metrics.log_event("actors", {"step": start_step, **nodes, "nodes": node_map()})
    run.sync()  # a resumed run: the rollout workers still hold the initial weights
    summary.update(step_kind.start(run))
    if eval_rows and cfg.trainer.eval_at_start and start_step == 0:
        summary["eval_start"] = log_eval(metrics, "start", evaluate(run, eval_rows, 0))

    saved_step = start_step
    if step_callback is not None:
        step_callback(start_step, None)
    for step in range(start_step + 1, cfg.trainer.max_steps + 1):
        t0 = time.perf_counter()
        drawn = step_kind.draw(run, step)  # a Draw: the step's items, the sampler state after them, its payload
        items = drawn.items
        if items and isinstance(items[0], dict) and "id" in items[0]:
            # Which prompts each step trained on: a resumed run must neither replay nor skip any (tested).
            metrics.log_event("prompts", {"step": step, "ids": [r["id"] for r in items]})
        row = step_kind.run(run, step, drawn)
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
            row["time_checkpoint"] = save(run, step_kind, step, drawn.sampler_state)
            saved_step = step
        row["time_step"] = time.perf_counter() - t0
        for hook in hooks:
            if hook.due(step):  # e.g. eval/<benchmark>/... beside the step's metrics
                t_hook = time.perf_counter()
                run.sync()
                row.update(hook.run(step, run))
                row["time_eval"] = time.perf_counter() - t_hook
        metrics.log(step, row)
        progress["step"] = step
        if step_callback is not None:
            step_callback(step, row)

    summary.update(step_kind.finish(run))
    if saved_step != cfg.trainer.max_steps and cfg.trainer.max_steps > start_step:
        save(run, step_kind, cfg.trainer.max_steps)
    final = checkpoint.latest(run.out_dir)
    if final is not None:
        checkpoint.link_final(run.out_dir, final)
    if eval_rows and cfg.trainer.eval_at_end:
        run.sync()
        summary["eval_end"] = log_eval(metrics, "end", evaluate(run, eval_rows, cfg.trainer.max_steps))
    return summary


def evaluate(run: Run, rows: list[dict], step: int) -> dict:
    """Held-out accuracy: one response per problem (greedy by default), scored by the training verifier."""
    cfg = run.cfg
    params = sampling_params(cfg, n=1, greedy=cfg.trainer.eval_greedy)
    batch = run.generate([r["prompt"] for r in rows], params, seed=derive_seed(cfg.trainer.seed, "held_out", step))
    scored = run.score(rows, batch, [1] * len(rows))
    correct, tokens = scored.correct, batch.tokens
    write_held_out_samples(run.out_dir, step, rows, batch, scored)
    # Per-problem outcomes travel with the summary (into events.jsonl) so intervals, paired differences, truncation
    # and the accuracy-at-budget frontier can be computed afterwards (reasonrl experiment) without generating again.
    return {"step": step, "accuracy": sum(correct) / len(correct), "n": len(correct),
            "response_tokens_mean": sum(tokens) / len(tokens), "correct": correct, "tokens": tokens,
            "truncated": [f == "length" for f in batch.finish_reason], "scores": scored.result.scores,
            "ids": [r["id"] for r in rows]}


HELD_OUT_DIR = "heldout"  # <output_dir>/heldout/step-NNNNNN.jsonl: every held-out response of that evaluation


def write_held_out_samples(out_dir: Path, step: int, rows: list[dict], batch, scored) -> Path:
    """The responses behind a held-out score, one JSON line each, so what a method changed in them (which steps it
    dropped, how it phrased them) can be read afterwards without generating again."""
    path = Path(out_dir) / HELD_OUT_DIR / f"step-{step:06d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": row["id"], "completion": text, "tokens": n, "finish_reason": why, "correct": ok,
                         "scores": {name: vals[i] for name, vals in scored.result.scores.items()}})
             for i, (row, text, n, why, ok) in enumerate(zip(rows, batch.text, batch.tokens, batch.finish_reason,
                                                             scored.correct))]
    write_atomic(path, "".join(line + "\n" for line in lines))
    return path


def log_eval(metrics: MetricsLogger, when: str, result: dict) -> dict:
    metrics.log_event("eval", result)
    print(f"held-out accuracy at {when}: {result['accuracy']:.3f} (n={result['n']})", flush=True)
    return result


def restore(last_ckpt: Path | None, learner: LearnerGroup, sampler: PromptSampler, step_kind: Step) -> int:
    """Learner, optimizer, data order and the step's own state from a checkpoint; returns its step (0 without)."""
    if last_ckpt is None:
        return 0
    state = checkpoint.load_state(last_ckpt)
    learner.load(str(last_ckpt))
    sampler.load_state_dict(state["sampler"])
    step_kind.load_state_dict(state.get("step_state", {}))
    log.info("resumed from %s at step %d", last_ckpt, state["step"])
    return state["step"]


def save(run: Run, step_kind: Step, step: int, sampler_state: dict | None = None) -> float:
    """`sampler_state`: the data order right after step `step` drew its items (with max_staleness 1 the sampler
    has already drawn the next step's); default: the sampler's current state."""
    t = time.perf_counter()
    tmp = checkpoint.begin(run.cfg.trainer.output_dir, step)
    run.learner.save(str(tmp))
    state = {"sampler": run.sampler.state_dict() if sampler_state is None else sampler_state,
             "seed": run.cfg.trainer.seed}
    if step_kind.state_dict():
        state["step_state"] = step_kind.state_dict()
    checkpoint.commit(tmp, step, state, keep=run.cfg.trainer.keep_checkpoints)
    return time.perf_counter() - t


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises in the main thread like Ctrl-C does, so it takes the same clean stop (actors shut down, the
    checkpoint named) instead of killing the driver mid-call. Installed after Ray started, so it also replaces the
    native handler that would print a C++ stack."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _signals_seen.append("SIGTERM")  # remembered: a library may re-raise it as a plain KeyboardInterrupt
        raise _Terminated()

    _signals_seen.clear()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

"""The driver loop: sample prompts -> rollout G samples each -> rewards -> advantages -> learner update -> weight
sync -> log -> checkpoint. Everything distributed sits behind rl.cluster; everything numerical in rl.algorithms.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from rewards.isolation import weighted_total
from rl import checkpoint
from rl.algorithms import (fgo_advantages, fgo_rewards, fgo_weight_spread, grpo_advantages, sampled_token_entropy,
                           zero_advantage_groups)
from rl.batch import pad_values
from rl.cluster import LearnerGroup, RewardGroup, RolloutGroup, init_ray, shutdown
from rl.config import Config, ConfigError, dump_config
from rl.data import PromptSampler, filter_long_prompts, load_rows, render_prompt
from rl.metrics import MetricsLogger, plot_curves, summarize
from rl.models import load_tokenizer, resolve_model
from rl.placement import Placement, node_map
from rl.rollout import SamplingParams

log = logging.getLogger("reasonrl")


def prepare_prompts(cfg: Config, tokenizer, source: str, split: str) -> tuple[list[dict], dict]:
    """Rows with their rendered prompt under `prompt`; stats count what was skipped and why."""
    d = cfg.data
    rows, stats = load_rows(source, split, d.problem_key, d.answer_key, arith=d.arith.model_dump())
    prompts = [render_prompt(tokenizer, r["problem"], d.system_prompt, d.prompt_suffix) for r in rows]
    rows, prompts, too_long = filter_long_prompts(rows, prompts, tokenizer, d.max_prompt_tokens)
    for row, prompt in zip(rows, prompts):
        row["prompt"] = prompt
    return rows, dict(stats, skipped_too_long=too_long, rows=len(rows))


def reward_columns(cfg: Config, rows: list[dict], rollout: dict, group_size: int) -> dict[str, list]:
    """Dataset columns repeated per sample (TRL's reward contract), plus the sampled token ids and counts.

    The answer arrives as `answer` and also under the dataset's own column name, so a reward written for TRL
    against that dataset finds the column it expects.
    """
    skip = {"prompt", "problem"}
    columns = {k: [r[k] for r in rows for _ in range(group_size)] for k in rows[0] if k not in skip}
    columns.setdefault(cfg.data.answer_key, columns["answer"])
    columns["completion_ids"] = rollout["response_ids"]
    columns["completion_tokens"] = [len(r) for r in rollout["response_ids"]]
    columns["finish_reason"] = rollout["finish_reason"]  # "stop" (EOS) or "length" (truncated)
    columns["group_id"] = [g for g in range(len(rows)) for _ in range(group_size)]  # samples of one prompt
    return columns


def score(rewards: RewardGroup, cfg: Config, rows: list[dict], rollout: dict, group_size: int):
    """Weighted total reward per sample, accuracy per sample, and the raw per-function result."""
    prompts = [r["prompt"] for r in rows for _ in range(group_size)]
    result = rewards.score(prompts, rollout["text"], reward_columns(cfg, rows, rollout, group_size), group_size)
    total = weighted_total(result, {f.fn: f.weight for f in cfg.reward.functions})
    correct = [float(s > 0.5) for s in result.scores[cfg.reward.accuracy]]
    return total, correct, result


def sampling_params(cfg: Config, n: int, greedy: bool = False) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(n=n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, greedy=greedy, batch_size=r.generate_batch_size,
                          shared_prefix=r.shared_prefix, sampler=r.sampler)


def compute_advantages(cfg: Config, total: list[float], correct: list[float], rollout: dict) -> tuple[torch.Tensor, dict]:
    """Per-sample advantages for the configured algorithm, plus its diagnostics for the step's metrics.

    grpo: from the weighted total reward. fgo: from correctness (`reward.accuracy`) reweighted by length and entropy
    inside each correct / incorrect subgroup; the other reward terms do not enter.
    """
    a, G = cfg.algorithm, cfg.rollout.group_size
    if a.name == "grpo":
        return grpo_advantages(torch.tensor(total), G, scale_by_std=a.scale_by_std), {}
    ok = torch.tensor(correct) > 0.5
    lengths = torch.tensor([len(r) for r in rollout["response_ids"]], dtype=torch.float64)
    entropies = fgo_entropies(rollout, a.fgo.entropy)
    adv = fgo_advantages(ok, lengths, entropies, G, a.fgo.alpha, a.fgo.beta, scale_by_std=a.scale_by_std)
    weights = fgo_rewards(ok, lengths, entropies, G, a.fgo.alpha, a.fgo.beta)
    # What GRPO would have wasted on the very same rollouts: groups whose +-1 rewards are all equal.
    grpo_zero = zero_advantage_groups(grpo_advantages(ok.float(), G), G).float().mean()
    return adv, {"fgo_entropy": float(entropies.mean()), "fgo_weight_spread": fgo_weight_spread(weights, ok, G),
                 "zero_adv_groups_grpo": float(grpo_zero)}


def fgo_entropies(rollout: dict, kind: str) -> torch.Tensor:
    """H_i per response from what the rollout measured at generation time (no second forward pass)."""
    if kind == "mean_token_entropy":
        return torch.tensor([s / max(1, len(r)) for s, r in zip(rollout["entropy_sum"], rollout["response_ids"])],
                            dtype=torch.float64)
    lp = rollout["logprobs"]
    width = max(1, max(len(x) for x in lp))
    return sampled_token_entropy(pad_values(lp, width).double(), pad_values([[1.0] * len(x) for x in lp], width))


def step_metrics(rollout: dict, total: list[float], correct: list[float], advantages: torch.Tensor, stats: dict,
                 reward_result, group_size: int) -> dict:
    tokens = [len(r) for r in rollout["response_ids"]]
    token_stats = summarize(tokens)
    row = {
        "loss": stats["loss"], "reward": sum(total) / len(total), "accuracy": sum(correct) / len(correct),
        "response_tokens_mean": token_stats["mean"], "response_tokens_max": token_stats["max"],
        "truncation_rate": rollout["finish_reason"].count("length") / len(tokens),
        "entropy": sum(rollout["entropy_sum"]) / max(1, sum(tokens)),  # mean full-vocabulary entropy per token
        "kl": stats["kl_sum"] / max(1.0, stats["tokens"]),
        "clip_fraction": stats["clipped_tokens"] / max(1.0, stats["tokens"]),
        "zero_adv_groups": float(zero_advantage_groups(advantages, group_size).float().mean()),
        "tokens_correct_mean": _mean([t for t, c in zip(tokens, correct) if c > 0.5]),
        "tokens_incorrect_mean": _mean([t for t, c in zip(tokens, correct) if c <= 0.5]),
        "grad_norm": stats["grad_norm"], "lr": stats["lr"],
        "reward_failures": sum(reward_result.failures.values()),
        "reward_timeouts": sum(reward_result.timeouts.values()),
    }
    for name, vals in reward_result.scores.items():
        row[f"reward/{name}"] = sum(vals) / len(vals)
    return row


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")  # NaN is logged as null: "no such response this step"


def evaluate(cfg: Config, rollouts: RolloutGroup, rewards: RewardGroup, rows: list[dict], step: int) -> dict:
    """Held-out accuracy: one response per problem (greedy by default), scored by the training verifier."""
    params = sampling_params(cfg, n=1, greedy=cfg.trainer.eval_greedy)
    out = rollouts.generate([r["prompt"] for r in rows], params, seed=cfg.trainer.seed + 7919 * (step + 1))
    _, correct, _ = score(rewards, cfg, rows, out, 1)
    tokens = [len(r) for r in out["response_ids"]]
    # Per-problem outcomes travel with the summary (into events.jsonl) so intervals can be computed afterwards.
    return {"step": step, "accuracy": sum(correct) / len(correct), "n": len(correct),
            "response_tokens_mean": sum(tokens) / len(tokens), "correct": correct, "tokens": tokens,
            "ids": [r["id"] for r in rows]}


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


def train(cfg: Config, resume: bool = False, step_callback=None) -> dict:
    """Run a job. `step_callback(step, row)`, if given, is called once before the first step (row None) and after
    each step with its metrics row: bench/grpo_vs_trl.py paces its A/B comparison with it."""
    if cfg.algorithm.name in ("todo", "dpo"):
        from rl.preference_trainer import check_config, train_offline

        check_config(cfg)  # preference data read and checked before any actor starts
        if not cfg.algorithm.todo.online:
            return train_offline(cfg, resume)  # pairs from a file: its own loop
    out_dir = prepare_output_dir(cfg, resume)
    model_path = resolve_model(cfg.model.path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_path)

    train_rows, train_stats = prepare_prompts(cfg, tokenizer, cfg.data.train, cfg.data.train_split)
    eval_source = cfg.data.eval or ("arith" if cfg.data.train == "arith" else None)
    eval_split = "test" if cfg.data.eval is None else cfg.data.eval_split
    eval_rows = []
    if eval_source and cfg.data.eval_size:
        eval_rows = prepare_prompts(cfg, tokenizer, eval_source, eval_split)[0][:cfg.data.eval_size]
    sampler = PromptSampler(train_rows, seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)
    log.info("train rows %s", train_stats)
    from eval.in_training import BenchmarkEval

    bench_eval = BenchmarkEval.from_config(cfg, tokenizer)  # trainer.eval_every: benchmarks are read before Ray

    last_ckpt = checkpoint.latest(out_dir) if resume else None
    if resume:  # checked before any actor starts
        if last_ckpt is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {out_dir / 'checkpoints'}")
        saved_seed = checkpoint.load_state(last_ckpt)["seed"]
        if saved_seed != cfg.trainer.seed:
            raise ConfigError(f"config key 'trainer.seed': the run was trained with seed {saved_seed}; a resumed "
                              f"run must keep it (got {cfg.trainer.seed})")
    (out_dir / "config.yaml").write_text(dump_config(cfg))

    init_ray(cfg)
    placement = Placement(cfg)  # fails, naming the role, if the cluster cannot hold the run; before any actor
    groups: list = []
    try:  # groups are appended as they start, so a failure half-way still kills what did start
        groups.append(RolloutGroup(cfg, model_path, placement))
        groups.append(RewardGroup(cfg, placement))
        groups.append(LearnerGroup(cfg, model_path, placement))
        return run_loop(cfg, *groups, sampler, eval_rows, last_ckpt, bench_eval, step_callback)
    finally:
        shutdown(*groups, bench_eval)  # bench_eval's verifier worker, if it started one
        placement.remove()


def restore(last_ckpt: Path | None, learner: LearnerGroup, sampler: PromptSampler) -> int:
    """Learner, optimizer and data order from a checkpoint; returns its step (0 without one)."""
    if last_ckpt is None:
        return 0
    state = checkpoint.load_state(last_ckpt)
    learner.load(str(last_ckpt))
    sampler.load_state_dict(state["sampler"])
    log.info("resumed from %s at step %d", last_ckpt, state["step"])
    return state["step"]


def run_loop(cfg: Config, rollouts: RolloutGroup, rewards: RewardGroup, learner: LearnerGroup,
             sampler: PromptSampler, eval_rows: list[dict], last_ckpt: Path | None, bench_eval=None,
             step_callback=None) -> dict:
    out_dir = Path(cfg.trainer.output_dir)
    start_step = restore(last_ckpt, learner, sampler)
    if start_step:
        rollouts.sync_weights(learner, start_step)

    summary = {"start_step": start_step}
    with MetricsLogger(str(out_dir), tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                       total_steps=cfg.trainer.max_steps, start_step=start_step) as metrics:
        metrics.log_event("actors", {"step": start_step, "rollout": rollouts.nodes(), "reward": rewards.nodes(),
                                     "learner": learner.nodes(), "nodes": node_map()})
        if eval_rows and cfg.trainer.eval_at_start and start_step == 0:
            summary["eval_start"] = log_eval(metrics, "start", evaluate(cfg, rollouts, rewards, eval_rows, 0))

        saved_step = start_step
        pipeline = RolloutPipeline(cfg, sampler, rollouts)
        if step_callback is not None:
            step_callback(start_step, None)
        for step in range(start_step + 1, cfg.trainer.max_steps + 1):
            t0 = time.perf_counter()
            rows, sampler_state = pipeline.prompts(step)
            # Which prompts each step trained on: a resumed run must neither replay nor skip any (tested).
            metrics.log_event("prompts", {"step": step, "ids": [r["id"] for r in rows]})
            row = step_function(cfg)(cfg, step, rows, rollouts, rewards, learner, metrics, pipeline)
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                row["time_checkpoint"] = save(cfg, learner, sampler, step, sampler_state)
                saved_step = step
            row["time_step"] = time.perf_counter() - t0
            if bench_eval is not None and bench_eval.due(step):  # eval/<benchmark>/... beside the step's metrics
                t_eval = time.perf_counter()
                row.update(bench_eval.run(step, rollouts, metrics))
                row["time_eval"] = time.perf_counter() - t_eval
            metrics.log(step, row)
            if step_callback is not None:
                step_callback(step, row)

        pipeline.close()
        if saved_step != cfg.trainer.max_steps and cfg.trainer.max_steps > start_step:
            save(cfg, learner, sampler, cfg.trainer.max_steps)
        final = checkpoint.latest(out_dir)
        if final is not None:
            checkpoint.link_final(out_dir, final)
        if eval_rows and cfg.trainer.eval_at_end:
            summary["eval_end"] = log_eval(metrics, "end",
                                           evaluate(cfg, rollouts, rewards, eval_rows, cfg.trainer.max_steps))
    if cfg.logging.plots:
        plot_curves(str(out_dir / "metrics.jsonl"), str(out_dir))
    return summary


class RolloutPipeline:
    """Each step's prompts and their rollout.

    trainer.max_staleness 0: drawn and generated when the step starts, from the current weights.
    trainer.max_staleness 1 (one step off-policy): step k+1's prompts are drawn and generated (in a driver thread
    that waits on the rollout actors) while the learner trains on step k, so they come from the weights before step
    k's update. The learner then takes its PPO ratio against the rollout's own log-probs, which is the importance
    weight pi_theta / pi_behaviour; at staleness 0 that ratio is 1 and the loss is the on-policy one (tested).
    """

    def __init__(self, cfg: Config, sampler: PromptSampler, rollouts: RolloutGroup):
        self.cfg, self.sampler, self.rollouts = cfg, sampler, rollouts
        self.ahead: dict[int, tuple[list[dict], dict, Future | None]] = {}  # step -> (rows, sampler state, rollout)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollout-ahead") if cfg.trainer.max_staleness else None

    def prompts(self, step: int) -> tuple[list[dict], dict]:
        """The step's prompts and the sampler state right after drawing them (what its checkpoint stores)."""
        if step not in self.ahead:
            rows = self.sampler.next_batch(self.cfg.rollout.prompts_per_step)
            self.ahead[step] = (rows, self.sampler.state_dict(), None)
        return self.ahead[step][:2]

    def rollout(self, step: int, rows: list[dict]) -> tuple[dict, int]:
        """(rollout, staleness): the one started during the previous step, else one generated now."""
        _, _, future = self.ahead.pop(step, (None, None, None))
        if future is not None:
            return future.result(), 1
        return self._generate(step, rows), 0

    def start_next(self, step: int) -> None:
        if self.pool is None or step > self.cfg.trainer.max_steps:
            return
        rows, state = self.prompts(step)
        self.ahead[step] = (rows, state, self.pool.submit(self._generate, step, rows))

    def settle(self) -> None:
        """Wait for a rollout in flight (its result stays for `rollout`)."""
        for _, _, future in self.ahead.values():
            if future is not None:
                future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _generate(self, step: int, rows: list[dict]) -> dict:
        params = sampling_params(self.cfg, n=self.cfg.rollout.group_size)
        return self.rollouts.generate([r["prompt"] for r in rows], params, seed=self.cfg.trainer.seed * 100003 + step)


def train_step(cfg: Config, step: int, rows: list[dict], rollouts: RolloutGroup, rewards: RewardGroup,
               learner: LearnerGroup, metrics: MetricsLogger, pipeline: "RolloutPipeline") -> dict:
    """One GRPO/FGO step: rollout -> rewards -> advantages -> update -> weight sync. Returns the step's metrics."""
    G = cfg.rollout.group_size
    t0 = time.perf_counter()
    rollout, staleness = pipeline.rollout(step, rows)
    pipeline.start_next(step + 1)  # max_staleness 1: the next rollout runs while this step trains
    t1 = time.perf_counter()
    total, correct, reward_result = score(rewards, cfg, rows, rollout, G)
    advantages, algo_stats = compute_advantages(cfg, total, correct, rollout)
    t2 = time.perf_counter()
    sequences = [{"prompt_ids": p, "response_ids": r, "old_logprobs": lp, "advantage": float(a)}
                 for p, r, lp, a in zip(rollout["prompt_ids"], rollout["response_ids"], rollout["logprobs"],
                                        advantages)]
    # A stale rollout came from older weights: the ratio to its own log-probs is the importance weight.
    stats = learner.train(sequences, cfg.algorithm.mini_batches, cfg.rollout.max_new_tokens, on_policy=not staleness)
    t3 = time.perf_counter()
    pipeline.settle()  # the in-flight rollout must finish on the old weights before they are replaced
    t_settled = time.perf_counter()
    rollouts.sync_weights(learner, step)
    t4 = time.perf_counter()

    if reward_result.errors:
        metrics.log_event("reward_failures", {"step": step, "errors": reward_result.errors[:5]})
    if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
        metrics.log_event("sample", {"step": step, "prompt": rows[0]["prompt"], "completion": rollout["text"][0],
                                     "reward": total[0]})
    row = step_metrics(rollout, total, correct, advantages, stats, reward_result, G)
    row.update(algo_stats)
    row.update(time_generate=t1 - t0, time_reward=t2 - t1, time_train=t3 - t2, time_rollout_wait=t_settled - t3,
               time_sync=t4 - t_settled, staleness=staleness, ratio_mean=stats["ratio_sum"] / max(1.0, stats["tokens"]))
    return row


def step_function(cfg: Config):
    """train_step, or online TODO/DPO's step (pairs from the verifier, rl/preference_trainer.py)."""
    if cfg.algorithm.name in ("todo", "dpo"):
        from rl.preference_trainer import online_step

        return online_step
    return train_step


def log_eval(metrics: MetricsLogger, when: str, result: dict) -> dict:
    metrics.log_event("eval", result)
    print(f"held-out accuracy at {when}: {result['accuracy']:.3f} (n={result['n']})", flush=True)
    return result


def save(cfg: Config, learner: LearnerGroup, sampler: PromptSampler, step: int,
         sampler_state: dict | None = None) -> float:
    """`sampler_state`: the data order right after step `step` drew its prompts (with max_staleness 1 the sampler
    has already drawn the next step's); default: the sampler's current state."""
    t = time.perf_counter()
    tmp = checkpoint.begin(cfg.trainer.output_dir, step)
    learner.save(str(tmp))
    state = sampler.state_dict() if sampler_state is None else sampler_state
    checkpoint.commit(tmp, step, {"sampler": state, "seed": cfg.trainer.seed},
                      keep=cfg.trainer.keep_checkpoints)
    return time.perf_counter() - t

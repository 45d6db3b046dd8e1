"""TODO / DPO drivers (shared/specs/algorithms.md §2) on the same actor groups as GRPO.

- `train_offline`: preference pairs from a file or hub dataset -> learner.train_preference, one optimizer step per
  `algorithm.todo.pairs_per_step` pairs; checkpoints, resume, metrics and the held-out task evaluation are those
  of rl/trainer.py. Dispatched from `rl.trainer.train`.
- `online_step`: one step of verifier-driven TODO: rollout groups are scored (rl/trainer.py's `score`) and turned
  into preference / shorter / tie pairs (rl/preference.py). Dispatched from `rl.trainer.run_loop`.
- `build_preference_set`: the demo's data, pairs from the policy's own scored samples, written as JSONL.
- `pref_eval`: held-out TOBT three-way and sign accuracy of a trained model, without Ray (`reasonrl pref-eval`).
"""
from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import numpy as np

from rl import checkpoint
from rl import trainer as driver
from rl.cluster import LearnerGroup, RewardGroup, RolloutGroup, init_ray, shutdown
from rl.config import Config, ConfigError, dump_config, load_config
from rl.data import PromptSampler
from rl.metrics import MetricsLogger, plot_curves, summarize
from rl.models import load_policy, load_tokenizer, resolve_model
from rl.preference import load_pairs, local_logps, preference_metrics, rollout_pairs, trainable, write_jsonl

log = logging.getLogger("reasonrl")


def uses_ties(cfg: Config) -> bool:
    a = cfg.algorithm
    return (a.name == "todo" and a.todo.alpha > 0) or (a.name == "dpo" and a.todo.dpo_ties == "as_preference")


def _pairs(cfg: Config, tokenizer, source: str, split: str, limit: int = 0) -> tuple[list[dict], dict]:
    return load_pairs(source, split, tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_tokens, limit)


@functools.lru_cache(maxsize=4)
def _eval_pairs_cached(model: str, cache: str | None, source: str, split: str, size: int, system: str | None,
                       max_prompt_tokens: int) -> tuple:
    tokenizer = load_tokenizer(resolve_model(model, cache))
    return tuple(load_pairs(source, split, tokenizer, system, max_prompt_tokens, size)[0])


def eval_pairs(cfg: Config) -> list[dict]:
    """The held-out pairs (tokenized once per run: the online step asks every step), [] without `eval_data`."""
    t = cfg.algorithm.todo
    if not t.eval_data:
        return []
    return list(_eval_pairs_cached(cfg.model.path, cfg.model.cache_dir, t.eval_data, t.eval_split, t.eval_size,
                                   cfg.data.system_prompt, cfg.data.max_prompt_tokens))


def evaluate_preferences(cfg: Config, learner: LearnerGroup, pairs: list[dict], step: int) -> dict:
    t = cfg.algorithm.todo
    logps = learner.preference_logps(pairs)
    return {"step": step, **preference_metrics(logps, [p["tie"] for p in pairs], t.beta, t.alpha)}


def _log_pref_eval(metrics: MetricsLogger, result: dict, when: str) -> dict:
    metrics.log_event("pref_eval", result)
    print(f"held-out preference accuracy at {when}: tobt {result['tobt_acc']:.3f} sign "
          f"{result.get('sign_acc', float('nan')):.3f} (pairs={result['pairs']}, ties={result['ties']})", flush=True)
    return result


def check_config(cfg: Config) -> None:
    """Preference keys that pydantic cannot check alone; also reads the held-out pairs once (errors come early)."""
    t = cfg.algorithm.todo
    if not t.online and not t.train_data:
        raise ConfigError("config key 'algorithm.todo.train_data': offline TODO/DPO needs a preference file or "
                          "dataset (or set algorithm.todo.online=true)")
    for key, source in (("train_data", t.train_data if not t.online else None), ("eval_data", t.eval_data)):
        if source and Path(source).suffix in (".jsonl", ".json", ".parquet") and not Path(source).is_file():
            raise ConfigError(f"config key 'algorithm.todo.{key}': file {source!r} does not exist")
    eval_pairs(cfg)


# -------------------------------------------------------------------------------------------------- offline
def train_offline(cfg: Config, resume: bool = False) -> dict:
    check_config(cfg)
    t = cfg.algorithm.todo
    out_dir = driver.prepare_output_dir(cfg, resume)
    model_path = resolve_model(cfg.model.path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_path)
    pairs, stats = _pairs(cfg, tokenizer, t.train_data, t.train_split)
    pairs = trainable(pairs, cfg.algorithm.name, t.alpha, t.dpo_ties)
    if not pairs:
        raise ConfigError(f"config key 'algorithm.todo.train_data': no pairs left for {cfg.algorithm.name} "
                          f"(ties are dropped, see algorithm.todo.dpo_ties / alpha): {stats}")
    log.info("preference pairs %s, %d trainable", stats, len(pairs))
    held_out = eval_pairs(cfg)
    eval_source = cfg.data.eval or ("arith" if cfg.data.train == "arith" else None)
    eval_rows = []
    if eval_source and cfg.data.eval_size:
        split = "test" if cfg.data.eval is None else cfg.data.eval_split
        eval_rows = driver.prepare_prompts(cfg, tokenizer, eval_source, split)[0][:cfg.data.eval_size]
    sampler = PromptSampler(pairs, seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)

    last_ckpt = checkpoint.latest(out_dir) if resume else None
    if resume:  # checked before any actor starts, as in rl.trainer.train
        if last_ckpt is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {out_dir / 'checkpoints'}")
        if checkpoint.load_state(last_ckpt)["seed"] != cfg.trainer.seed:
            raise ConfigError("config key 'trainer.seed': a resumed run must keep the seed it was trained with")
    (out_dir / "config.yaml").write_text(dump_config(cfg))

    init_ray(cfg)
    groups: list = []
    try:
        groups.append(LearnerGroup(cfg, model_path))
        if eval_rows:  # generation and the verifier are only needed for the task evaluation
            groups += [RolloutGroup(cfg, model_path), RewardGroup(cfg)]
        return _offline_loop(cfg, *groups, sampler=sampler, held_out=held_out, eval_rows=eval_rows,
                             last_ckpt=last_ckpt, data_stats=stats)
    finally:
        shutdown(*groups)


def _offline_loop(cfg: Config, learner: LearnerGroup, rollouts: RolloutGroup | None = None,
                  rewards: RewardGroup | None = None, *, sampler: PromptSampler, held_out: list[dict],
                  eval_rows: list[dict], last_ckpt: Path | None, data_stats: dict) -> dict:
    out_dir, t, max_steps = Path(cfg.trainer.output_dir), cfg.algorithm.todo, cfg.trainer.max_steps
    start_step = driver.restore(last_ckpt, learner, sampler)
    summary: dict = {"start_step": start_step, "data": data_stats}
    with MetricsLogger(str(out_dir), tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                       total_steps=max_steps, start_step=start_step) as metrics:
        metrics.log_event("actors", {"step": start_step, "learner": learner.nodes(), "data": data_stats})
        if start_step == 0:
            if held_out:
                summary["pref_eval_start"] = _log_pref_eval(metrics, evaluate_preferences(cfg, learner, held_out, 0),
                                                            "start")
            if eval_rows and cfg.trainer.eval_at_start:
                summary["eval_start"] = driver.log_eval(metrics, "start",
                                                        driver.evaluate(cfg, rollouts, rewards, eval_rows, 0))
        saved_step = start_step
        for step in range(start_step + 1, max_steps + 1):
            t0 = time.perf_counter()
            batch = sampler.next_batch(t.pairs_per_step)
            row = learner.train_preference(batch)
            row.update(epoch=sampler.epoch, time_train=time.perf_counter() - t0)
            if held_out and t.eval_every and step % t.eval_every == 0 and step != max_steps:
                res = _log_pref_eval(metrics, evaluate_preferences(cfg, learner, held_out, step), f"step {step}")
                row.update({f"pref_eval/{k}": v for k, v in res.items() if k != "step"})
            if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
                row["time_checkpoint"] = driver.save(cfg, learner, sampler, step)
                saved_step = step
            row["time_step"] = time.perf_counter() - t0
            metrics.log(step, row)
        if saved_step != max_steps and max_steps > start_step:
            driver.save(cfg, learner, sampler, max_steps)
        final = checkpoint.latest(out_dir)
        if final is not None:
            checkpoint.link_final(out_dir, final)
        if held_out:
            summary["pref_eval_end"] = _log_pref_eval(
                metrics, evaluate_preferences(cfg, learner, held_out, max_steps), "end")
        if eval_rows and cfg.trainer.eval_at_end:
            rollouts.sync_weights(learner, max_steps)
            summary["eval_end"] = driver.log_eval(metrics, "end",
                                                  driver.evaluate(cfg, rollouts, rewards, eval_rows, max_steps))
    if cfg.logging.plots:
        plot_curves(str(out_dir / "metrics.jsonl"), str(out_dir), keys=("loss", "margin", "train_tobt_acc"))
    return summary


# --------------------------------------------------------------------------------------------------- online
def online_step(cfg: Config, step: int, rows: list[dict], rollouts: RolloutGroup, rewards: RewardGroup,
                learner: LearnerGroup, metrics: MetricsLogger, pipeline) -> dict:
    """One online TODO/DPO step: rollout -> verifier -> pairs per group -> preference update -> weight sync."""
    G, t = cfg.rollout.group_size, cfg.algorithm.todo
    held_out = eval_pairs(cfg)
    if step == 1 and held_out:  # before the first update: the start value (policy = reference)
        _log_pref_eval(metrics, evaluate_preferences(cfg, learner, held_out, 0), "start")
    t0 = time.perf_counter()
    rollout, _ = pipeline.rollout(step, rows)  # always on-policy here (max_staleness is grpo/fgo only)
    t1 = time.perf_counter()
    total, correct, reward_result = driver.score(rewards, cfg, rows, rollout, G)
    rng = np.random.default_rng([cfg.trainer.seed & (2**63 - 1), step, 5])
    pairs, counts = rollout_pairs(rollout, correct, G, t, uses_ties(cfg), rng)
    t2 = time.perf_counter()
    row: dict = {}
    if pairs:  # a step whose groups give no pair (e.g. all wrong, lengths far apart) changes nothing
        row.update(learner.train_preference(pairs))
        t3 = time.perf_counter()
        rollouts.sync_weights(learner, step)
    else:
        t3 = t2
    t4 = time.perf_counter()
    if held_out and ((t.eval_every and step % t.eval_every == 0) or step == cfg.trainer.max_steps):
        res = _log_pref_eval(metrics, evaluate_preferences(cfg, learner, held_out, step), f"step {step}")
        row.update({f"pref_eval/{k}": v for k, v in res.items() if k != "step"})
    tokens = [len(r) for r in rollout["response_ids"]]
    token_stats = summarize(tokens)
    row.update(counts, pairs_total=len(pairs), reward=sum(total) / len(total), accuracy=sum(correct) / len(correct),
               response_tokens_mean=token_stats["mean"], response_tokens_max=token_stats["max"],
               truncation_rate=rollout["finish_reason"].count("length") / len(tokens),
               reward_failures=sum(reward_result.failures.values()),
               reward_timeouts=sum(reward_result.timeouts.values()),
               time_generate=t1 - t0, time_reward=t2 - t1, time_train=t3 - t2, time_sync=t4 - t3)
    for name, vals in reward_result.scores.items():
        row[f"reward/{name}"] = sum(vals) / len(vals)
    if reward_result.errors:
        metrics.log_event("reward_failures", {"step": step, "errors": reward_result.errors[:5]})
    return row


# ------------------------------------------------------------------------------------------------ demo data
def build_preference_set(cfg: Config, out_dir: str, train_prompts: int, eval_prompts: int) -> dict:
    """Pairs from the start model's own samples: `rollout.group_size` samples per prompt, scored by the verifier,
    paired by `algorithm.todo` (pairing, pairs_per_group, tie_length_ratio). Training pairs come from the training
    prompts, held-out pairs from the held-out prompts. Writes train.jsonl, eval.jsonl and summary.json."""
    model_path = resolve_model(cfg.model.path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_path)
    d, G = cfg.data, cfg.rollout.group_size
    eval_source = d.eval or ("arith" if d.train == "arith" else None)
    if eval_prompts and eval_source is None:
        raise ConfigError("config key 'data.eval': held-out prompts are needed for held-out pairs")
    splits = [("train", d.train, d.train_split, train_prompts),
              ("eval", eval_source, "test" if d.eval is None else d.eval_split, eval_prompts)]
    init_ray(cfg)
    groups: list = []
    summary: dict = {"model": cfg.model.path, "group_size": G, "temperature": cfg.rollout.temperature}
    try:
        groups += [RolloutGroup(cfg, model_path), RewardGroup(cfg)]
        for name, source, split, n in splits:
            if not n:
                continue
            rows = driver.prepare_prompts(cfg, tokenizer, source, split)[0][:n]
            rollout = groups[0].generate([r["prompt"] for r in rows], driver.sampling_params(cfg, n=G),
                                         seed=cfg.trainer.seed * 100003 + (0 if name == "train" else 1))
            _, correct, _ = driver.score(groups[1], cfg, rows, rollout, G)
            rng = np.random.default_rng([cfg.trainer.seed & (2**63 - 1), 0 if name == "train" else 1])
            pairs, counts = rollout_pairs(rollout, correct, G, cfg.algorithm.todo, True, rng)
            system = [{"role": "system", "content": d.system_prompt}] if d.system_prompt is not None else []
            out_rows = []
            for p in pairs:
                i, j = p["index"]
                row = rows[i // G]
                out_rows.append({"id": row["id"], "prompt": system + [{"role": "user", "content": row["problem"]
                                                                        + d.prompt_suffix}],
                                 "chosen": rollout["text"][i], "rejected": rollout["text"][j], "tie": p["tie"],
                                 "kind": p["kind"]})
            write_jsonl(Path(out_dir) / f"{name}.jsonl", out_rows)
            summary[name] = {"prompts": len(rows), "samples": len(correct), "sample_accuracy":
                             sum(correct) / len(correct), "pairs": len(out_rows), **counts}
            log.info("%s pairs: %s", name, summary[name])
    finally:
        shutdown(*groups)
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------------------------------------- pref-eval
def pref_eval(run: str, pairs_source: str | None = None, policy: str | None = None, limit: int = 0) -> dict:
    """Held-out preference accuracy of a run's final model (or `policy`) against its start model, no Ray.

    `run` is a run folder (its config.yaml and checkpoint-final) or a config file (then `policy` is needed)."""
    path = Path(run)
    if path.is_dir():
        cfg = load_config(path / "config.yaml")
        policy = policy or str(path / "checkpoint-final")
    else:
        cfg = load_config(path)
        if policy is None:
            raise ConfigError("pref-eval with a config file needs --policy MODEL_DIR")
    t = cfg.algorithm.todo
    source = pairs_source or t.eval_data
    if not source:
        raise ConfigError("config key 'algorithm.todo.eval_data': no held-out pairs (or pass --pairs FILE)")
    if not Path(policy).exists():
        raise FileNotFoundError(f"policy model {policy!r} does not exist")
    ref_path = resolve_model(cfg.model.path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(ref_path)
    pairs, stats = _pairs(cfg, tokenizer, source, t.eval_split, limit or t.eval_size)
    logps = local_logps(load_policy(policy).eval(), load_policy(ref_path).eval(), pairs, tokenizer.pad_token_id)
    return {"policy": policy, "reference": cfg.model.path, "pairs_source": source, "beta": t.beta, "alpha": t.alpha,
            **preference_metrics(logps, [p["tie"] for p in pairs], t.beta, t.alpha), "data": stats}


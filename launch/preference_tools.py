"""TODO / DPO tools outside the training loop: `reasonrl pref-build` (pairs from the policy's own verifier-scored
samples, the demo's data) and `reasonrl pref-eval` (held-out TOBT three-way and sign accuracy of a trained model
against its start model, without Ray)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from rl.cluster.session import init_ray, shutdown

from rl.scoring.group import RewardGroup

from rl.rollout.group import RolloutGroup
from rl.config.schema import Config, ConfigError, load_config
from rl.models import load_policy, load_tokenizer, resolve_model
from rl.data.preference import local_logps, preference_metrics, rollout_pairs, write_jsonl
from rl.data.prompts import eval_source, prepare_prompts, sampling_params
from rl.scoring.score import score_configured
from rl.steps.preference import read_pairs
from rl.seeds import derive_seed, numpy_rng

log = logging.getLogger("reasonrl")


def build_preference_set(cfg: Config, out_dir: str, train_prompts: int, eval_prompts: int) -> dict:
    """Pairs from the start model's own samples: `rollout.group_size` samples per prompt, scored by the verifier,
    paired by `algorithm.todo` (pairing, pairs_per_group, tie_length_ratio). Training pairs come from the training
    prompts, held-out pairs from the held-out prompts. Writes train.jsonl, eval.jsonl and summary.json."""
    model_path = resolve_model(cfg.model.path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_path)
    d, G = cfg.data, cfg.rollout.group_size
    held_out = eval_source(cfg)
    if eval_prompts and held_out is None:
        raise ConfigError("config key 'data.eval': held-out prompts are needed for held-out pairs")
    splits = [("train", d.train, d.train_split, train_prompts), ("eval", *(held_out or (None, None)), eval_prompts)]
    init_ray(cfg)
    groups: list = []
    summary: dict = {"model": cfg.model.path, "group_size": G, "temperature": cfg.rollout.temperature}
    try:
        groups += [RolloutGroup(cfg, model_path), RewardGroup(cfg)]
        for name, source, split, n in splits:
            if not n:
                continue
            rows = prepare_prompts(cfg, tokenizer, source, split)[0][:n]
            prompts = [r["prompt"] for r in rows]
            batch = groups[0].generate(prompts, sampling_params(cfg, n=G),
                                       seed=derive_seed(cfg.trainer.seed, "rollout", 0 if name == "train" else 1))
            correct = score_configured(groups[1], cfg, rows, batch, [G] * len(rows)).correct
            rng = numpy_rng(cfg.trainer.seed, 0 if name == "train" else 1)
            pairs, counts = rollout_pairs(batch, correct, G, cfg.algorithm.todo, True, rng)
            system = [{"role": "system", "content": d.system_prompt}] if d.system_prompt is not None else []
            out_rows = []
            for p in pairs:
                i, j = p.index
                row = rows[i // G]
                out_rows.append({"id": row["id"], "prompt": system + [{"role": "user", "content": row["problem"]
                                                                        + d.prompt_suffix}],
                                 "chosen": batch.text[i], "rejected": batch.text[j], "tie": p.tie,
                                 "kind": p.kind})
            write_jsonl(Path(out_dir) / f"{name}.jsonl", out_rows)
            summary[name] = {"prompts": len(rows), "samples": len(correct), "sample_accuracy":
                             sum(correct) / len(correct), "pairs": len(out_rows), **counts}
            log.info("%s pairs: %s", name, summary[name])
    finally:
        shutdown(*groups)
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


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
    pairs, stats = read_pairs(cfg, tokenizer, source, t.eval_split, limit or t.eval_size)
    logps = local_logps(load_policy(policy).eval(), load_policy(ref_path).eval(), pairs, tokenizer.pad_token_id)
    return {"policy": policy, "reference": cfg.model.path, "pairs_source": source, "beta": t.beta, "alpha": t.alpha,
            **preference_metrics(logps, [p.tie for p in pairs], t.beta, t.alpha), "data": stats}


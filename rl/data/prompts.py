"""Prompt rows for a run: loaded, rendered through the chat template, too-long ones dropped; and the sampling
settings a config asks for. Shared by training, held-out evaluation and the preference-data builder."""
from __future__ import annotations

from rl.config.schema import Config
from rl.data.loading import filter_long_prompts, load_rows, render_prompt
from rl.rollout.worker import SamplingParams


def prepare_prompts(cfg: Config, tokenizer, source: str, split: str,
                    limit: int | None = None) -> tuple[list[dict], dict]:
    """Rows with their rendered prompt under `prompt` (the first `limit` rows only, if given); stats count what was
    skipped and why."""
    d = cfg.data
    rows, stats = load_rows(source, split, d.problem_key, d.answer_key, arith=d.arith.model_dump())
    if limit is not None and len(rows) > limit:
        rows, stats = rows[:limit], dict(stats, limited_to=limit)
    prompts = [render_prompt(tokenizer, r["problem"], d.system_prompt, d.prompt_suffix) for r in rows]
    rows, prompts, too_long = filter_long_prompts(rows, prompts, tokenizer, d.max_prompt_tokens)
    for row, prompt in zip(rows, prompts):
        row["prompt"] = prompt
    return rows, dict(stats, skipped_too_long=too_long, rows=len(rows))


def eval_source(cfg: Config) -> tuple[str, str] | None:
    """(source, split) of the held-out prompts: `data.eval`, else the arith task's own test split, else none."""
    if cfg.data.eval:
        return cfg.data.eval, cfg.data.eval_split
    return ("arith", "test") if cfg.data.train == "arith" else None


def held_out_rows(cfg: Config, tokenizer, limit: int) -> list[dict]:
    """The first `limit` held-out prompt rows ([] without a held-out source or with limit 0)."""
    source = eval_source(cfg)
    if source is None or not limit:
        return []
    return prepare_prompts(cfg, tokenizer, *source)[0][:limit]


def sampling_params(cfg: Config, n: int, greedy: bool = False) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(n=n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, greedy=greedy, batch_size=r.generate_batch_size,
                          shared_prefix=r.shared_prefix, sampler=r.sampler)

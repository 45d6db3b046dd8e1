"""In-training benchmark eval (`trainer.eval_every`): the code path of `reasonrl eval`, run by the driver loop.

Every `eval_every` steps the configured benchmark subset goes through eval.runner.generate_records on the
training rollout workers (current weights) and a math_verify reward worker, eval.metrics computes the same numbers
as `reasonrl eval`, and they are logged beside the step's training metrics as `eval/<benchmark>/<metric>`. Each
eval's samples land in `<run>/eval/step-N/` in the `reasonrl eval` layout, so `reasonrl compare` works on them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from eval.benchmarks import data_dir_from, load_benchmark, parse_benchmarks, slug
from eval.metrics import benchmark_metrics
from eval.runner import (SAMPLES_DIR, SETTINGS_FILE, VERIFIER, EvalSettings, chunk_seed, generate_records,
                         write_metrics, write_samples)
from rl.config import Config, RewardConfig, RewardFunction
from rl.data import render_prompt
from rl.fsutil import write_atomic


class BenchmarkEval:
    def __init__(self, cfg: Config, tokenizer):
        t, r = cfg.trainer, cfg.rollout
        self.cfg, self.every = cfg, t.eval_every
        folder = data_dir_from(t.eval_data_dir)
        self.sets, self.stats = [], {}
        for name in parse_benchmarks(t.eval_benchmarks):  # loaded now: a bad name or file fails before Ray starts
            rows, stats = load_benchmark(name, folder, t.eval_limit)
            prompts = [render_prompt(tokenizer, row["problem"], cfg.data.system_prompt, cfg.data.prompt_suffix)
                       for row in rows]
            self.sets.append((slug(name), rows, prompts))
            self.stats[slug(name)] = stats
        # The training generation budget and temperature: the eval measures the policy as it is trained.
        self.settings = EvalSettings(samples=t.eval_samples, greedy=t.eval_greedy, temperature=r.temperature,
                                     top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=t.seed,
                                     chunk_problems=max(len(rows) for _, rows, _ in self.sets),
                                     batch_size=r.generate_batch_size)
        self._rewards = None

    @classmethod
    def from_config(cls, cfg: Config, tokenizer) -> "BenchmarkEval | None":
        return cls(cfg, tokenizer) if cfg.trainer.eval_every else None

    @property
    def workers(self) -> list:
        """The verifier's actors, so rl.cluster.shutdown(..., this) stops them with the run's other groups."""
        return self._rewards.workers if self._rewards is not None else []

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def run(self, step: int, rollouts, metrics) -> dict:
        """Evaluate every benchmark at the current weights; returns `eval/<benchmark>/<metric>` values for the step's
        metrics row and logs the full metrics as a `benchmark_eval` event."""
        from rl.cluster import RewardGroup

        if self._rewards is None:  # its own verifier-only worker: training rewards may not include math_verify
            cfg = self.cfg.model_copy(deep=True)
            cfg.reward = RewardConfig(functions=[RewardFunction(fn=VERIFIER)], accuracy=VERIFIER, num_workers=1,
                                      timeout_seconds=self.cfg.reward.timeout_seconds)
            self._rewards = RewardGroup(cfg)
        out = Path(self.cfg.trainer.output_dir) / "eval" / f"step-{step:06d}"
        (out / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
        params, row, results = self.settings.sampling(), {}, {}
        for name, rows, prompts in self.sets:
            records, fails = generate_records(rollouts, self._rewards, rows, prompts, params,
                                              chunk_seed(self.settings.seed + step, name, 0), name)
            write_samples(out / SAMPLES_DIR / f"{name}.jsonl", records)
            m = results[name] = dict(benchmark_metrics(records, seed=self.settings.seed), **fails)
            metrics.log_event("benchmark_eval", {"step": step, "benchmark": name, **m})
            n = str(m["samples_per_problem"])
            row.update({f"eval/{name}/accuracy": m["accuracy"], f"eval/{name}/accuracy_lo": m["accuracy_ci"][0],
                        f"eval/{name}/accuracy_hi": m["accuracy_ci"][1], f"eval/{name}/pass@{n}": m["pass_at_k"][n],
                        f"eval/{name}/tokens_mean": m["tokens"]["mean"],
                        f"eval/{name}/truncation_rate": m["truncation_rate"], f"eval/{name}/act": float("nan") if m["act"] is None else m["act"]})
            print(f"step {step} {name}: accuracy {m['accuracy']:.3f} [{m['accuracy_ci'][0]:.3f}, "
                  f"{m['accuracy_ci'][1]:.3f}], {m['tokens']['mean']:.0f} tokens", flush=True)
        meta = {"model": f"{self.cfg.model.path}@step-{step}", "system_prompt": self.cfg.data.system_prompt,
                "prompt_suffix": self.cfg.data.prompt_suffix, **dataclasses.asdict(self.settings),
                "verifier": VERIFIER, "limit": self.cfg.trainer.eval_limit, "benchmarks": self.stats}
        write_atomic(out / SETTINGS_FILE, json.dumps(meta, indent=2) + "\n")
        write_metrics(out, results, {"step": step})
        return row

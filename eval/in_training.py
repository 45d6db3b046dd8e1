"""In-training benchmark eval (`trainer.eval_every`): the code path of `reasonrl eval`, run as a hook of the trainer
loop (launch/run.py builds it; rl never imports eval).

Every `eval_every` steps the configured benchmark subset goes through eval.runner.generate_records on the
training rollout workers (current weights) and a math_verify reward worker, eval.metrics computes the same numbers
as `reasonrl eval`, and they are logged beside the step's training metrics as `eval/<benchmark>/<metric>`. Each
eval's samples land in `<run>/eval/step-N/` in the `reasonrl eval` layout, so `reasonrl compare` works on them.

`trainer.eval_protocol` names the protocol (eval/protocols.py) whose prompt and grading it uses: `reasonrl` (the
default) is the run's own template and the training reward's last-box rule; `fgo` is FGO's system prompt, and so
on. Sampling, samples and budget stay the trainer's (eval_greedy, eval_samples, rollout temperature / top_p /
max_new_tokens): an in-training eval is a cheap signal, and metrics.json lists where it departs from the protocol.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

from eval.benchmarks import BENCHMARKS, data_dir_from, load_benchmark, parse_benchmarks, slug
from eval.metrics import benchmark_metrics
from eval.protocols import PROTOCOLS
from eval.runner import (SAMPLES_DIR, SETTINGS_FILE, VERIFIER, EvalSettings, chunk_seed, generate_records,
                         protocol_record, write_metrics, write_samples)
from rl.config.schema import Config, ConfigError, RewardConfig, RewardFunction
from rl.data.loading import DataError, render_prompt
from rl.store.atomic import write_atomic
from rl.models import load_tokenizer, resolve_model

KEY = "trainer.eval_benchmarks"
PROTOCOL_KEY = "trainer.eval_protocol"


def check_eval_benchmarks(cfg: Config) -> Config:
    """Check `trainer.eval_benchmarks` and store it normalised (stripped, in order, without duplicates), and check
    that `trainer.eval_protocol` names a protocol of eval/protocols.py.

    rl.config.schema cannot know benchmark or protocol names (rl never imports eval), so the launch layer calls this
    on every path that loads a training config, before any actor starts. Raises ConfigError naming the key, in one
    line.
    """
    names = cfg.trainer.eval_benchmarks
    try:
        cfg.trainer.eval_benchmarks = parse_benchmarks(names)
    except DataError as err:
        raise ConfigError(f"config key '{KEY}': {err}{_did_you_mean(names)}") from None
    protocol = cfg.trainer.eval_protocol
    if protocol not in PROTOCOLS:
        close = difflib.get_close_matches(str(protocol).strip(), list(PROTOCOLS), n=1)
        raise ConfigError(f"config key '{PROTOCOL_KEY}': unknown protocol {protocol!r}; known: "
                          f"{', '.join(PROTOCOLS)}" + (f"; did you mean {close[0]!r}?" if close else ""))
    return cfg


def _did_you_mean(names: list[str]) -> str:
    for name in names:
        try:
            parse_benchmarks([name])
        except DataError:
            close = difflib.get_close_matches(name.strip(), list(BENCHMARKS), n=1)
            return f"; did you mean {close[0]!r}?" if close else ""
    return ""


class BenchmarkEval:
    """The benchmark eval as a hook of rl.trainer.train: `due(step)`, `run(step, run) -> metrics entries`, `close()`.

    Everything that can be wrong with the inputs (benchmark names, files, the data folder) fails here, at
    construction, before Ray starts: the benchmarks are loaded and their prompts rendered now, with the policy's own
    tokenizer (loaded here, so the hook needs nothing from the trainer but the config).
    """

    def __init__(self, cfg: Config):
        t, r = check_eval_benchmarks(cfg).trainer, cfg.rollout
        self.cfg, self.every = cfg, t.eval_every
        tokenizer = load_tokenizer(resolve_model(cfg.model.path, cfg.model.cache_dir))
        folder = data_dir_from(t.eval_data_dir)
        loaded = [(slug(name), *load_benchmark(name, folder, t.eval_limit)) for name in t.eval_benchmarks]
        # The protocol's prompt and grading; the training generation budget and temperature (the eval measures the
        # policy as it is trained) and the trainer's greedy / samples.
        self.settings = EvalSettings.from_protocol(
            t.eval_protocol, samples=t.eval_samples, samples_per_benchmark={}, greedy=t.eval_greedy,
            temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=t.seed,
            chunk_problems=max(len(rows) for _, rows, _ in loaded), batch_size=r.generate_batch_size)
        s = self.settings
        self.system_prompt, self.suffix = ((cfg.data.system_prompt, cfg.data.prompt_suffix) if s.prompt_from_run
                                           else (s.system_prompt, ""))
        self.sets, self.stats = [], {}
        for name, rows, stats in loaded:
            prompts = [render_prompt(tokenizer, s.user_text(name, row["problem"], self.suffix), self.system_prompt)
                       for row in rows]
            self.sets.append((name, rows, prompts))
            self.stats[name] = stats
        self._rewards = None

    @classmethod
    def from_config(cls, cfg: Config) -> "BenchmarkEval | None":
        return cls(cfg) if cfg.trainer.eval_every else None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def run(self, step: int, run) -> dict:
        """Evaluate every benchmark at the current weights (`run`: the trainer's view of the run: rollouts, weights,
        metrics); returns `eval/<benchmark>/<metric>` values for the step's metrics row and logs the full metrics as
        a `benchmark_eval` event."""
        from rl.scoring.group import RewardGroup  # ray and torch: imported once an eval is due, not to check a config

        if self._rewards is None:  # its own verifier-only worker: training rewards may not include math_verify
            cfg = self.cfg.model_copy(deep=True)
            cfg.reward = RewardConfig(functions=[RewardFunction(fn=VERIFIER, kwargs=self.settings.verifier_kwargs())],
                                      accuracy=VERIFIER, num_workers=1, timeout_seconds=self.cfg.reward.timeout_seconds)
            self._rewards = RewardGroup(cfg)
        out = Path(self.cfg.trainer.output_dir) / "eval" / f"step-{step:06d}"
        (out / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
        params, row, results = self.settings.sampling(), {}, {}
        for name, rows, prompts in self.sets:
            records, fails = generate_records(run.rollouts, self._rewards, rows, prompts, params,
                                              chunk_seed(self.settings.seed + step, name, 0), name, run.weights,
                                              extraction=self.settings.extraction, think=self.settings.think)
            write_samples(out / SAMPLES_DIR / f"{name}.jsonl", records)
            m = results[name] = dict(benchmark_metrics(records, seed=self.settings.seed,
                                                       budget=self.settings.max_new_tokens), **fails)
            run.metrics.log_event("benchmark_eval", {"step": step, "benchmark": name, **m})
            n = str(m["samples_per_problem"])
            row.update({f"eval/{name}/accuracy": m["accuracy"], f"eval/{name}/accuracy_lo": m["accuracy_ci"][0],
                        f"eval/{name}/accuracy_hi": m["accuracy_ci"][1], f"eval/{name}/pass@{n}": m["pass_at_k"][n],
                        f"eval/{name}/tokens_mean": m["tokens"]["mean"],
                        f"eval/{name}/truncation_rate": m["truncation_rate"],
                        f"eval/{name}/act": float("nan") if m["act"] is None else m["act"]})
            if "redundancy_rate" in m:  # a testbed benchmark (rl/data/testbed.py): redundancy beside length
                row[f"eval/{name}/redundancy_rate"] = m["redundancy_rate"]
            print(f"step {step} {name}: accuracy {m['accuracy']:.3f} [{m['accuracy_ci'][0]:.3f}, "
                  f"{m['accuracy_ci'][1]:.3f}], {m['tokens']['mean']:.0f} tokens", flush=True)
        meta = {"model": f"{self.cfg.model.path}@step-{step}", **dataclasses.asdict(self.settings),
                "system_prompt": self.system_prompt, "prompt_suffix": self.suffix, "verifier": VERIFIER,
                "limit": self.cfg.trainer.eval_limit, "benchmarks": self.stats}
        write_atomic(out / SETTINGS_FILE, json.dumps(meta, indent=2) + "\n")
        write_metrics(out, results, {"step": step, **protocol_record(self.settings)})
        return row

    def close(self) -> None:
        """Stop the verifier worker (if an eval started one); the trainer calls it however the run ends."""
        if self._rewards is not None:
            from rl.cluster.session import shutdown  # already imported by run(): the worker exists only after one

            shutdown(self._rewards)
            self._rewards = None

"""TODO and DPO steps: one optimizer step on preference pairs, from a dataset (offline) or from verifier-scored
rollout groups (online). Ternary preferences (TODO: Guo et al. 2025, ties as a third outcome of a
Rao-Kupper/TOBT model) reduce to DPO (Rafailov et al. 2023) at alpha = 0 without ties (docs/algorithms.md, "TODO").
"""
from __future__ import annotations

import time
from pathlib import Path

from rl.config.schema import ConfigError
from rl.contracts import PreferencePair
from rl.steps.pipeline import RolloutPipeline
from rl.data.preference import load_pairs, preference_metrics, rollout_pairs, trainable
from rl.steps.base import Draw, Run, Step, log_rollout_events, rollout_metrics, score_samples
from rl.steps.samples import StepSamples
from rl.seeds import PAIRS_KEY, numpy_rng

PREFERENCE_PLOTS = ("loss", "margin", "train_tobt_acc")


def uses_ties(cfg) -> bool:
    a = cfg.algorithm
    return (a.name == "todo" and a.todo.alpha > 0) or (a.name == "dpo" and a.todo.dpo_ties == "as_preference")


def read_pairs(cfg, tokenizer, source: str, split: str, limit: int = 0) -> tuple[list[PreferencePair], dict]:
    return load_pairs(source, split, tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_tokens, limit)


class PreferenceStep(Step):
    """What both TODO/DPO steps share: the held-out pair evaluation and the learner's preference update."""

    def check(self, tokenizer) -> None:
        t = self.cfg.algorithm.todo
        for key, source in (("train_data", t.train_data if not t.online else None), ("eval_data", t.eval_data)):
            if source and Path(source).suffix in (".jsonl", ".json", ".parquet") and not Path(source).is_file():
                raise ConfigError(f"config key 'algorithm.todo.{key}': file {source!r} does not exist")
        self.held_out_pairs = read_pairs(self.cfg, tokenizer, t.eval_data, t.eval_split, t.eval_size)[0] \
            if t.eval_data else []

    def start(self, run: Run) -> dict:
        if self.held_out_pairs and run.start_step == 0:  # the start value: policy = reference, every margin 0
            return {"pref_eval_start": self._evaluate(run, 0, "start")}
        return {}

    def _evaluate(self, run: Run, step: int, when: str) -> dict:
        t = self.cfg.algorithm.todo
        logps = run.learner.preference_logps(self.held_out_pairs)
        result = {"step": step, **preference_metrics(logps, [p.tie for p in self.held_out_pairs], t.beta, t.alpha)}
        run.metrics.log_event("pref_eval", result)
        print(f"held-out preference accuracy at {when}: tobt {result['tobt_acc']:.3f} sign "
              f"{result.get('sign_acc', float('nan')):.3f} (pairs={result['pairs']}, ties={result['ties']})",
              flush=True)
        return result

    def _maybe_evaluate(self, run: Run, step: int, row: dict) -> None:
        """Held-out pairs every `algorithm.todo.eval_every` steps and after the last one (the run's end value)."""
        every, last = self.cfg.algorithm.todo.eval_every, self.cfg.trainer.max_steps
        if self.held_out_pairs and ((every and step % every == 0) or step == last):
            result = self._evaluate(run, step, "end" if step == last else f"step {step}")
            row.update({f"pref_eval/{k}": v for k, v in result.items() if k != "step"})
            if step == last:
                self.end = result

    def finish(self, run: Run) -> dict:
        return {"pref_eval_end": self.end} if getattr(self, "end", None) else {}


class OfflinePreferenceStep(PreferenceStep):
    """Pairs from a file or hub dataset (`algorithm.todo.train_data`), `pairs_per_step` per optimizer step."""
    roles = ("learner",)  # generation and the verifier only for the held-out task eval (the lifecycle adds them)
    plot_keys = PREFERENCE_PLOTS

    def check(self, tokenizer) -> None:
        if not self.cfg.algorithm.todo.train_data:
            raise ConfigError("config key 'algorithm.todo.train_data': offline TODO/DPO needs a preference file or "
                              "dataset (or set algorithm.todo.online=true)")
        super().check(tokenizer)

    def items(self, tokenizer) -> tuple[list, dict]:
        cfg, t = self.cfg, self.cfg.algorithm.todo
        pairs, stats = read_pairs(cfg, tokenizer, t.train_data, t.train_split)
        pairs = trainable(pairs, cfg.algorithm.name, t.alpha, t.dpo_ties)
        if not pairs:
            raise ConfigError(f"config key 'algorithm.todo.train_data': no pairs left for {cfg.algorithm.name} "
                              f"(ties are dropped, see algorithm.todo.dpo_ties / alpha): {stats}")
        return pairs, stats

    @property
    def per_step(self) -> int:
        return self.cfg.algorithm.todo.pairs_per_step

    def describe(self) -> str:
        return f"{self.per_step} preference pairs of algorithm.todo.train_data"

    def run(self, run: Run, step: int, draw: Draw) -> dict:
        t0 = time.perf_counter()
        row = run.learner.train_preference(draw.items)
        run.updated(step)
        row.update(epoch=run.sampler.epoch, time_train=time.perf_counter() - t0)
        self._maybe_evaluate(run, step, row)
        return row


class OnlinePreferenceStep(PreferenceStep):
    """Each rollout group is scored by `reward.accuracy` and paired (rl.data.preference.rollout_pairs): correct vs
    incorrect is a preference, close lengths a tie, a much shorter correct answer preferred to a longer one."""

    def start(self, run: Run) -> dict:
        self.pipeline = RolloutPipeline(run, self.per_step)
        return super().start(run)

    def run(self, run: Run, step: int, draw: Draw) -> dict:
        rows, cfg, G, t = draw.items, self.cfg, self.cfg.rollout.group_size, self.cfg.algorithm.todo
        t0 = time.perf_counter()
        batch, _ = self.pipeline.rollout(step, rows)  # always on-policy (max_staleness is grpo/fgo only)
        t1 = time.perf_counter()
        samples = StepSamples.build(rows, [G] * len(rows), batch)
        score_samples(run, samples, batch)
        rng = numpy_rng(cfg.trainer.seed, step, PAIRS_KEY)
        pairs, counts = rollout_pairs(batch, samples.verdicts(), G, t, uses_ties(cfg), rng)
        t2 = time.perf_counter()
        row: dict = {}
        if pairs:  # a step whose groups give no pair (e.g. all wrong, lengths far apart) changes nothing
            row.update(run.learner.train_preference(pairs))
            run.updated(step)
        t3 = time.perf_counter()
        run.sync()
        t4 = time.perf_counter()
        log_rollout_events(run, step, samples)
        row.update(rollout_metrics(samples), **counts, pairs_total=len(pairs), time_generate=t1 - t0,
                   time_reward=t2 - t1, time_train=t3 - t2, time_sync=t4 - t3)
        self._maybe_evaluate(run, step, row)
        return row



def preference_step(cfg) -> Step:
    """TODO / DPO: offline from a pair dataset, or online from rollouts (`algorithm.todo.online`)."""
    return OnlinePreferenceStep(cfg) if cfg.algorithm.todo.online else OfflinePreferenceStep(cfg)

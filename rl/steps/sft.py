"""SFT: one optimizer step of supervised NLL on `algorithm.sft.examples_per_step` examples of `data.train`, the
cold start before RL. Prompts are rendered the way RL renders them (rl/data/sft.py), so RL continues from the checkpoint
(`model.path=<run>/checkpoint-final`) on the same prompts; the rest (ranks, ZeRO, checkpoints, resume, metrics,
held-out task accuracy) is the lifecycle's (docs/algorithms.md, "SFT").
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from rl.config.schema import ConfigError
from rl.contracts import SftExample
from rl.data.loading import DataError, load_dataset
from rl.data.sft import load_examples
from rl.steps.base import Draw, Run, Step
from rl.learner.updates import plan_sft, reduce_sft, reduce_sft_loss

log = logging.getLogger("reasonrl")

_FILES = (".jsonl", ".json", ".parquet")


def _columns(source: str, split: str) -> list[str]:
    ds = load_dataset(source, split)
    return list(ds.column_names) if ds is not None else []


class SftStep(Step):
    # Generation and the verifier run only for the held-out task accuracy (the lifecycle adds them when it has rows).
    roles = ("learner",)
    plot_keys = ("loss", "eval_loss")

    def check(self, tokenizer) -> None:
        d = self.cfg.data
        if d.train == "arith":
            raise ConfigError("config key 'data.train': sft trains on completions, which the arith generator has "
                              "none of; give a .jsonl/.json/.parquet file or hub dataset with prompt/completion "
                              "or messages columns")
        for key, source in (("train", d.train), ("eval", d.eval)):
            if source and Path(source).suffix.lower() in _FILES and not Path(source).expanduser().is_file():
                raise ConfigError(f"config key 'data.{key}': file {source!r} does not exist")
        # data.eval may hold SFT rows (the held-out loss), task rows with problem and answer (the lifecycle's
        # held-out accuracy, e.g. the RL run's own held-out file), or both in one file.
        self.held_out_examples: list[SftExample] = []
        self.eval_stats: dict = {}
        self.task_eval = True
        if d.eval and d.eval != "arith":  # arith: the generator's held-out problems, task accuracy only
            columns = _columns(d.eval, d.eval_split)
            sft_rows = "messages" in columns or {"prompt", "completion"} <= set(columns)
            self.task_eval = d.problem_key in columns and d.answer_key in columns
            if not sft_rows and not self.task_eval:
                raise DataError(f"data.eval {d.eval!r} has neither SFT columns (messages, or prompt and completion: "
                                f"the held-out loss) nor {d.problem_key!r} and {d.answer_key!r} (data.problem_key/"
                                f"answer_key: the held-out accuracy); available columns: {columns}")
            if sft_rows:
                self.held_out_examples, self.eval_stats = self._load(tokenizer, d.eval, d.eval_split,
                                                                     self.cfg.algorithm.sft.eval_size)
                log.info("held-out SFT data %s", self.eval_stats)
            if not self.task_eval:
                log.info("held-out task accuracy off: data.eval %r has no %r/%r columns (data.problem_key/"
                         "answer_key); the held-out SFT loss still runs", d.eval, d.problem_key, d.answer_key)

    def _load(self, tokenizer, source: str, split: str, limit: int = 0) -> tuple[list[SftExample], dict]:
        d = self.cfg.data
        return load_examples(source, split, tokenizer, d.system_prompt, d.prompt_suffix, d.max_prompt_tokens,
                             self.cfg.algorithm.sft.max_completion_tokens, limit)

    def items(self, tokenizer) -> tuple[list, dict]:
        d = self.cfg.data  # data.train_limit: the first N usable rows, as for RL prompts
        return self._load(tokenizer, d.train, d.train_split, d.train_limit or 0)

    @property
    def per_step(self) -> int:
        return self.cfg.algorithm.sft.examples_per_step

    def describe(self) -> str:
        return f"{self.per_step} examples of data.train"

    def held_out(self, tokenizer) -> list[dict]:
        """The lifecycle's held-out task accuracy needs problem and answer columns; an SFT eval file often has
        only prompt/completion (or messages), and then there is only the held-out loss, not an error."""
        return super().held_out(tokenizer) if getattr(self, "task_eval", True) else []

    def start(self, run: Run) -> dict:
        out = {"eval_data": self.eval_stats} if self.eval_stats else {}
        if self.held_out_examples and run.start_step == 0:
            out["eval_loss_start"] = self._evaluate(run, 0, "start")
        return out

    def _evaluate(self, run: Run, step: int, when: str) -> float:
        result = run.learner.query("sft_loss", self.held_out_examples, plan_sft, reduce_sft_loss)
        run.metrics.log_event("sft_eval", {"step": step, **result})
        print(f"held-out SFT loss at {when}: {result['eval_loss']:.4f} ({int(result['eval_tokens'])} tokens)",
              flush=True)
        return result["eval_loss"]

    def run(self, run: Run, step: int, draw: Draw) -> dict:
        examples = draw.items
        t0 = time.perf_counter()
        stats = run.learner.update("sft", examples, plan_sft, reduce_sft)
        run.updated(step)
        # Which examples each step trained on: a resumed run must neither replay nor skip any (tested).
        run.metrics.log_event("examples", {"step": step, "ids": [e.id for e in examples]})
        order = draw.sampler_state  # right after this step's draw
        row = {"loss": stats["loss"], "tokens": stats["tokens"], "examples": stats["examples"],
               "grad_norm": stats["grad_norm"], "lr": stats["lr"],
               "epoch": order["epoch"] + order["position"] / order["num_rows"],  # passes over data.train
               "time_train": time.perf_counter() - t0}
        every, last = self.cfg.algorithm.sft.eval_every, self.cfg.trainer.max_steps
        if self.held_out_examples and ((every and step % every == 0) or step == last):
            t1 = time.perf_counter()
            row["eval_loss"] = self._evaluate(run, step, "end" if step == last else f"step {step}")
            row["time_eval_loss"] = time.perf_counter() - t1
            if step == last:
                self.end = row["eval_loss"]
        return row

    def finish(self, run: Run) -> dict:
        return {"eval_loss_end": self.end} if getattr(self, "end", None) is not None else {}

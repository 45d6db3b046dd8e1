"""reasonrl vs TRL GRPOTrainer: the same GRPO job on both, alternated step by step, timed per phase.

    python bench/grpo_vs_trl.py                      # 8 prompts x 4 samples x 64 tokens, 3 timed steps each
    python bench/grpo_vs_trl.py --sweep              # budgets 64/128/256 x group sizes 4/8
    python bench/grpo_vs_trl.py --set learner.micro_batch_size=32   # one lever of ours, measured alone

Both sides get the same model folder, the same rendered prompts (our chat template + system prompt, handed to TRL as
plain strings so it tokenizes identical text), the same group size, token budget, temperature 1, learning rate,
seed, fp32, one optimizer step per rollout batch, no KL term and the same math_verify reward function. Each side runs
in its own fresh process (no cache shared across runs); a step of one side runs while the other waits, after one
untimed warm-up step each. Generated tokens are counted on both sides, so a side that samples shorter answers is
visible. Memory, from start-up to each side's last step (the checkpoint ours writes after it, which TRL is not asked
to do, is left out): `peak GB` is the peak of the RSS summed over the side's process tree (ours includes Ray's
gcs/raylet and every actor), `sum GB` the sum of each process's own peak RSS; both count shared pages once per
process, so they overstate a tree of processes like ours. `--memory pss` makes `peak GB` the peak summed PSS (shared
pages split between the processes mapping them): exact, but too slow to read for a timing run. The last printed line
is `ratio X` (ours / TRL, completions per second); with --sweep it is the smallest ratio over the cells.

Per-phase seconds: generate, reward, logprobs (a separate log-prob pass over the rollout batch: TRL's old/ref
log-probs, none on our side since the rollout returns them), train (forward/backward/optimizer), sync (weights into
the rollout workers; TRL generates with the training model) and other (step wall time minus the rest: orchestration,
data, advantages, logging).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYSTEM_PROMPT = "Give the final answer in \\boxed{}, for example: 2 + 2 = \\boxed{4}."
PHASES = ("generate", "reward", "logprobs", "train", "sync", "other")
MARK = "BENCH "  # worker -> parent protocol lines on stdout; the parent answers each with "go" on stdin


# ------------------------------------------------------------------------------------------------- workers
def _send(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _wait_go() -> float:
    line = sys.stdin.readline()
    if line.strip() != "go":
        sys.exit(0)  # parent gone or done
    return time.perf_counter()


def trl_worker(spec: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.math import math_verify

    seconds: dict[str, float] = defaultdict(float)
    state = {"tokens": 0, "in_prep": False, "t_go": 0.0, "step": 0}

    def timed(obj, name: str, phase: str, only_in_prep: bool | None = None):
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            if only_in_prep is not None and state["in_prep"] != only_in_prep:
                return original(*args, **kwargs)
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - t
        setattr(obj, name, wrapper)

    def reward(prompts, completions, completion_ids, answer, **kwargs):
        state["tokens"] += sum(len(ids) for ids in completion_ids)
        return math_verify(prompts, completions, answer)

    class Pace(TrainerCallback):
        def on_train_begin(self, args, st, control, optimizer=None, **kwargs):
            timed(optimizer, "step", "optimizer")
            _send({"ready": True})
            state["t_go"] = _wait_go()

        def on_step_end(self, args, st, control, **kwargs):
            wall = time.perf_counter() - state["t_go"]
            prep = seconds.pop("prep", 0.0)
            row = {p: seconds.pop(p, 0.0) for p in ("generate", "reward", "logprobs")}
            row["train"] = seconds.pop("training_step", 0.0) - prep + seconds.pop("optimizer", 0.0)
            row["sync"] = 0.0
            row["other"] = wall - sum(row.values())
            _send({"step": st.global_step, "wall": wall, "phases": row, "tokens": state["tokens"],
                   "completions": spec["prompts_per_step"] * spec["group_size"]})
            state["tokens"] = 0
            if st.global_step < spec["total_steps"]:
                state["t_go"] = _wait_go()

    torch.manual_seed(spec["seed"])
    rows = [{"prompt": p, "answer": a} for p, a in zip(spec["prompts"], spec["answers"])]
    n = spec["prompts_per_step"] * spec["group_size"]
    args = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, fp16=False, num_generations=spec["group_size"],
        max_completion_length=spec["max_new_tokens"], per_device_train_batch_size=n, gradient_accumulation_steps=1,
        max_steps=spec["total_steps"], learning_rate=spec["lr"], temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
        epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group", seed=spec["seed"],
        report_to="none", save_strategy="no", logging_steps=1, dataloader_pin_memory=False,
        gradient_checkpointing=spec["trl_gradient_checkpointing"])
    trainer = GRPOTrainer(model=spec["model_path"], reward_funcs=[reward], args=args,
                          train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(spec["model_path"]), callbacks=[Pace()])

    def prep(*a, **k):
        state["in_prep"] = True
        t = time.perf_counter()
        try:
            return original_prep(*a, **k)
        finally:
            state["in_prep"] = False
            seconds["prep"] += time.perf_counter() - t
    original_prep = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = prep
    timed(trainer, "_generate", "generate")
    timed(trainer, "_calculate_rewards", "reward")
    timed(trainer, "_get_per_token_logps_and_entropies", "logprobs", only_in_prep=True)
    timed(trainer, "training_step", "training_step")
    timed(trainer.accelerator, "clip_grad_norm_", "optimizer")
    trainer.train()


def ours_worker(spec: dict) -> None:
    from launch.run import load_training_config, train_run

    config = Path(spec["out_dir"]) / "bench.yaml"
    config.write_text(json.dumps(ours_config(spec)))  # JSON is YAML
    cfg = load_training_config(config, spec["overrides"])
    n = spec["prompts_per_step"] * spec["group_size"]
    state = {"t_go": 0.0}

    def pace(step: int, row: dict | None) -> None:
        if row is not None:
            wall = time.perf_counter() - state["t_go"]
            phases = {"generate": row["time_generate"], "reward": row["time_reward"], "logprobs": 0.0,
                      "train": row["time_train"], "sync": row["time_sync"]}
            phases["other"] = wall - sum(phases.values())
            _send({"step": step, "wall": wall, "phases": phases, "tokens": round(row["response_tokens_mean"] * n),
                   "completions": n})
        else:
            _send({"ready": True})
        if step < spec["total_steps"]:
            state["t_go"] = _wait_go()

    train_run(cfg, step_callback=pace)


def ours_config(spec: dict) -> dict:
    data = Path(spec["out_dir"]) / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": i, "problem": p, "answer": a}) + "\n"
                            for i, (p, a) in enumerate(zip(spec["problems"], spec["answers"]))))
    return {
        "model": {"path": spec["model_path"]},
        "data": {"train": str(data), "system_prompt": SYSTEM_PROMPT, "eval_size": 0, "shuffle": True},
        "rollout": {"prompts_per_step": spec["prompts_per_step"], "group_size": spec["group_size"],
                    "max_new_tokens": spec["max_new_tokens"], "temperature": 1.0},
        "reward": {"functions": [{"fn": "math_verify", "weight": 1.0}], "accuracy": "math_verify"},
        "algorithm": {"name": "grpo", "scale_by_std": True, "loss_agg": "token-mean", "kl_coef": 0.0,
                      "clip_low": 0.2, "clip_high": 0.28},
        "learner": {"num_ranks": 1, "zero_stage": 0, "lr": spec["lr"]},
        "trainer": {"max_steps": spec["total_steps"], "save_every": 0, "seed": spec["seed"],
                    "output_dir": str(Path(spec["out_dir"]) / "run"), "eval_at_start": False, "eval_at_end": False},
        "logging": {"tensorboard": False, "progress": False, "plots": False, "sample_every": 0},
    }


# -------------------------------------------------------------------------------------------------- parent
def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB; zeros if it is gone."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(maxsplit=1)[0]
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values["VmRSS:"], values["VmHWM:"]


class Side:
    """One worker process, its step reports and the peak memory of its process tree."""

    def __init__(self, name: str, spec_path: Path, log_path: Path, memory: str = "rss"):
        self.name, self.reports, self.peak_bytes, self.process_peaks, self.memory = name, [], 0, {}, memory
        self.log = open(log_path, "w")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name, "--spec", str(spec_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=ROOT)
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch_memory, daemon=True)
        self._monitor.start()

    def _watch_memory(self) -> None:
        """Once a second: the summed RSS of the tree (its peak is `peak_rss_gb`) and each process's own peak
        (VmHWM, summed into `sum_process_peaks_gb`). Both read /proc/<pid>/status, which costs microseconds; PSS
        (smaps) would be exact for shared pages but costs ~0.1 s per large process per read, enough to slow the
        side being measured. RSS counts pages shared between processes (Ray's object store, library code) once per
        process, so for ours, a tree of processes, both numbers err on the high side."""
        import psutil

        root = psutil.Process(self.proc.pid)
        while not self._stop.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            now = 0
            for p in tree:
                rss, hwm = _status_kb(p.pid)
                if self.memory == "pss":  # exact for shared pages, slow: use for memory runs, not for timing
                    try:
                        rss = p.memory_full_info().pss // 1024
                    except psutil.Error:
                        rss = 0
                now += rss
                self.process_peaks[p.pid] = max(self.process_peaks.get(p.pid, 0), hwm)
            self.peak_bytes = max(self.peak_bytes, now * 1024)
            self._stop.wait(1.0)

    def next_report(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            sys.stderr.write(f"[{self.name}] {line}")
        raise RuntimeError(f"{self.name} worker exited (rc {self.proc.wait()}); see {self.log.name}")

    def step(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        report = self.next_report()
        self.reports.append(report)
        return report

    def stop_memory_watch(self) -> None:
        self._stop.set()
        self._monitor.join()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=600)  # ours saves its final checkpoint first
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._stop.set()
        self.log.close()


def summarize(reports: list[dict], peak_bytes: int, process_peaks: dict[int, int]) -> dict:
    timed = reports[1:]  # reports[0] is the warm-up step
    wall = sum(r["wall"] for r in timed)
    return {"steps": reports, "timed_steps": len(timed), "seconds_per_step": wall / len(timed),
            "completions_per_s": sum(r["completions"] for r in timed) / wall,
            "tokens_per_s": sum(r["tokens"] for r in timed) / wall,
            "tokens_per_step": sum(r["tokens"] for r in timed) / len(timed),
            "phases": {p: sum(r["phases"][p] for r in timed) / len(timed) for p in PHASES},
            "peak_rss_gb": peak_bytes / 2 ** 30, "sum_process_peaks_gb": sum(process_peaks.values()) / 2 ** 20}


def run_cell(args, model_path: str, max_new_tokens: int, group_size: int, work: Path) -> dict:
    from rl.data.loading import generate_arith, render_prompt
    from rl.models import load_tokenizer

    rows = generate_arith(0, args.prompts, 1, args.seed)["train"]  # the task of configs/demo.yaml
    tok = load_tokenizer(model_path)
    spec = {"model_path": model_path, "problems": [r["problem"] for r in rows],
            "prompts": [render_prompt(tok, r["problem"], SYSTEM_PROMPT) for r in rows],
            "answers": [str(r["answer"]) for r in rows], "prompts_per_step": args.prompts, "group_size": group_size,
            "max_new_tokens": max_new_tokens, "lr": args.lr, "seed": args.seed, "total_steps": args.steps + 1,
            "overrides": args.set, "trl_gradient_checkpointing": not args.trl_no_gradient_checkpointing}
    sides = {}
    for name in args.only or ("trl", "ours"):
        (work / name).mkdir(parents=True, exist_ok=True)
        spec_path = work / name / "spec.json"
        spec_path.write_text(json.dumps(dict(spec, out_dir=str(work / name))))
        sides[name] = Side(name, spec_path, work / name / "worker.log", args.memory)
    try:
        for side in sides.values():
            side.next_report()  # ready: model loaded, actors up
        for i in range(args.steps + 1):  # warm-up, then timed steps, alternating
            for side in sides.values():
                r = side.step()
                print(f"  {side.name:4s} step {r['step']}{' (warm-up)' if i == 0 else ''}: {r['wall']:.1f} s, "
                      f"{r['tokens']} tokens", flush=True)
        for side in sides.values():
            side.stop_memory_watch()  # peaks cover start-up and the steps: not our final checkpoint write
    finally:
        for side in sides.values():
            side.close()
    result = {name: summarize(side.reports, side.peak_bytes, side.process_peaks) for name, side in sides.items()}
    result.update(max_new_tokens=max_new_tokens, group_size=group_size, prompts=args.prompts, overrides=args.set,
                  memory=args.memory)
    if len(sides) == 2:
        result["ratio"] = result["ours"]["completions_per_s"] / result["trl"]["completions_per_s"]
    return result


def print_cell(cell: dict) -> None:
    print(f"\n{cell['prompts']} prompts x {cell['group_size']} samples x {cell['max_new_tokens']} tokens")
    print(f"{'':5s} {'s/step':>7s} {'compl/s':>8s} {'tok/s':>7s} {'tok/step':>8s} "
          + " ".join(f"{p:>8s}" for p in PHASES) + f" {'peak GB':>8s} {'sum GB':>8s}")
    for name in [n for n in ("trl", "ours") if n in cell]:
        s = cell[name]
        print(f"{name:5s} {s['seconds_per_step']:7.1f} {s['completions_per_s']:8.3f} {s['tokens_per_s']:7.1f} "
              f"{s['tokens_per_step']:8.0f} " + " ".join(f"{s['phases'][p]:8.2f}" for p in PHASES)
              + f" {s['peak_rss_gb']:8.2f} {s['sum_process_peaks_gb']:8.2f}")
    if "ratio" in cell:
        print(f"ratio (ours / TRL, completions per second): {cell['ratio']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--sweep", action="store_true", help="budgets 64/128/256 x group sizes 4/8")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of our config")
    ap.add_argument("--trl-no-gradient-checkpointing", action="store_true",
                    help="turn TRL's default gradient checkpointing off (ours has it off by default)")
    ap.add_argument("--only", choices=("trl", "ours"), action="append",
                    help="run one side only (lever measurements against a TRL number measured before); no ratio")
    ap.add_argument("--memory", choices=("rss", "pss"), default="rss",
                    help="rss: cheap, overstates a multi-process tree; pss: exact, but reading it slows the side "
                    "measured (~0.1 s per large process per second), so timings of a pss run are not comparable")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "grpo_vs_trl.json"))
    ap.add_argument("--worker", choices=("trl", "ours"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        (trl_worker if args.worker == "trl" else ours_worker)(spec)
        return 0

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    from rl.models import resolve_model

    model_path = resolve_model(args.model)
    cells = [(t, g) for g in (4, 8) for t in (64, 128, 256)] if args.sweep else [(args.max_new_tokens,
                                                                                   args.group_size)]
    results = []
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl.") as tmp:
        for i, (tokens, group) in enumerate(cells):
            print(f"cell {i + 1}/{len(cells)}: {args.prompts} x {group} x {tokens} tokens", flush=True)
            results.append(run_cell(args, model_path, tokens, group, Path(tmp) / f"cell{i}"))
            print_cell(results[-1])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
                               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                               "cells": results}, indent=1))
    print(f"wrote {out}")
    if not args.only:
        print(f"ratio {min(c['ratio'] for c in results):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Record what a policy step computes, so a refactor of the step's data flow can be checked to change nothing.

Two parts, each dumped as JSON (every number exact, `time_*` keys dropped since wall times always differ):
- `stand-in`: the real step classes driven by a hand-made Run (no Ray, seconds): rollouts with a mix of finished
  and truncated responses, so the overlong filter really filters; per step the metrics row, the events and every
  sequence the learner was handed (prompt, response, old log-probs, advantage).
- `tiny`: short real runs on configs/tiny.yaml (tiny:llama, local Ray, DeepSpeed over gloo): metrics.jsonl rows,
  the deterministic events and the last checkpoint's trainer state. Slow (a minute or so per config).

    python bench/record_equivalence.py stand-in out.json
    python bench/record_equivalence.py tiny out.json
    python bench/record_equivalence.py compare a.json b.json      # exit 1 and the differences if they differ

Configs: GRPO, FGO, GRPO with the overlong filter, dynamic sampling, Rollout-GDRO allocation, Prompt-GDRO sampler.
Written before issue 23's refactor (one record per sample) and run on the code before and after it.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = {
    "grpo": [],
    "fgo": ["algorithm.name=fgo"],
    "grpo_overlong": ["algorithm.overlong_filter=true"],
    "dynamic_sampling": ["algorithm.dynamic_sampling=true"],
    "rollout_gdro": ["rollout.allocation=gdro"],
    "prompt_gdro": ["data.sampler=gdro"],
}
EVENTS = ("prompts", "dynamic_sampling", "allocation", "sample", "eval", "reward_failures")


def _clean(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time_")}


def _call_step(step, run, s: int) -> tuple[dict, dict]:
    """One step through whichever Step contract the code has: draw -> (items, state) and run(items), or
    draw -> an object with items/sampler_state that run takes whole."""
    drawn = step.draw(run, s)
    if isinstance(drawn, tuple):
        items, state = drawn
        row = step.run(run, s, items)
    else:
        items, state = drawn.items, drawn.sampler_state
        row = step.run(run, s, drawn)
    run.events.append(("prompts", {"step": s, "ids": [r["id"] for r in items]}))
    return row, state


# --------------------------------------------------------------------------------------------------- stand-in
ROWS = [{"id": f"q{i}", "prompt": f"P{i}", "problem": f"p{i}", "answer": "1"} for i in range(12)]
CONSTANT = {f"q{i}" for i in range(12) if i % 3}


class StandInRun:
    def __init__(self, cfg, step):
        from rl.store.metrics import MetricsLogger  # noqa: F401  (only to fail early on a broken import)

        self.cfg, self.events, self.trained = cfg, [], []
        self.sampler = step.make_sampler(ROWS)
        self.metrics = SimpleNamespace(log_event=lambda name, payload: self.events.append((name, payload)))
        self.learner = SimpleNamespace(train=self._train, train_preference=self._train_preference)
        self.weights = None

    def _train(self, sequences, mini_batches, max_len, on_policy=True):
        self.trained.append([[s.prompt_ids, s.response_ids, s.old_logprobs, s.advantage] for s in sequences])
        n = float(sum(len(s.response_ids) for s in sequences))
        from rl.steps.policy import NO_UPDATE  # every key the learner returns; the numbers below differ

        return {**NO_UPDATE, "loss": 0.25 * len(sequences), "ratio_sum": n, "tokens": n, "grad_norm": 1.0,
                "lr": 1e-4, "logprob_diff_tokens": 1.0}

    def _train_preference(self, pairs):
        self.trained.append([[p.prompt_ids, p.chosen_ids, p.rejected_ids, p.tie, p.kind, p.index] for p in pairs])
        return {"loss": 0.5 * len(pairs), "margin": 0.0}

    def sync(self):
        pass

    def updated(self, step):
        pass

    def generate(self, prompts, params, seed):
        from rl.contracts import RolloutBatch

        out = RolloutBatch()
        for k, p in enumerate(prompts):
            for j in range(params.n):
                n = 1 + (j + seed + k) % 4
                why = "length" if (j + seed + k) % 3 == 0 else "stop"
                out.append([1, 2, k % 3], [3 + j] * n, [-0.1 * (1 + (j + k) % 5)] * n, 0.37 * n, why, f"{p}.{j}.{n}")
        return out

    def score(self, rows, batch, group_size):
        from rewards.isolation import RewardResult
        from rl.scoring.score import ScoredBatch

        sizes = [group_size] * len(rows) if isinstance(group_size, int) else list(group_size)
        total, correct, length, k = [], [], [], 0
        for row, n in zip(rows, sizes):
            for j in range(n):
                const = row["id"] in CONSTANT and row["id"] != "q4"
                r = 1.0 if const else 0.1 * j + 0.013 * len(batch.response_ids[k])
                total.append(r)
                correct.append(0.0 if const else float((j + len(batch.response_ids[k])) % 2 == 0))
                length.append(-0.02 if const else -0.01 * len(batch.response_ids[k]))
                k += 1
        res = RewardResult({"r": list(total), "len": length}, {"r": 1}, {"r": 0}, {}, {"r": 0.5}, ["an error"])
        return ScoredBatch([t + 0.5 * x for t, x in zip(total, length)], correct, res)


def stand_in() -> dict:
    from rl.config.schema import load_config
    from rl.steps import make_step

    base = ["rollout.prompts_per_step=3", "rollout.group_size=4", "logging.sample_every=1", "data.shuffle=true"]
    out = {}
    extra = {**CONFIGS, "dynamic_sampling_overlong_fgo": ["algorithm.dynamic_sampling=true", "algorithm.name=fgo",
                                                          "algorithm.overlong_filter=true"],
             "all_gdro_ds": ["algorithm.dynamic_sampling=true", "rollout.allocation=gdro", "data.sampler=gdro",
                             "rollout.gdro.max_group_size=7"],
             "ds_capped": ["algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_max_extra=0"]}
    # The online preference step scores rollouts the same way (pairs instead of advantages).
    extra.update(todo_online=["algorithm.name=todo", "algorithm.todo.online=true"],
                 dpo_online=["algorithm.name=dpo", "algorithm.todo.online=true"])
    for name, overrides in extra.items():
        cfg = load_config(None, base + overrides)
        step = make_step(cfg)
        step.held_out_pairs = []  # (what check() reads from algorithm.todo.eval_data: none here)
        run = StandInRun(cfg, step)
        step.start(run)
        rows, states = [], []
        for s in range(1, 6):
            row, state = _call_step(step, run, s)
            rows.append(_clean(row))
            states.append([state, step.state_dict()])
        step.finish(run)
        out[name] = json.loads(json.dumps({"rows": rows, "events": run.events, "trained": run.trained,
                                           "states": states}))
    return out


# ------------------------------------------------------------------------------------------------------- tiny
def tiny() -> dict:
    from rl.config.schema import load_config
    from rl.trainer import train

    fixture = ROOT / "tests/fixtures/adaptive_rewards.py"
    common = ["logging.progress=false", "logging.plots=false", "logging.tensorboard=false", "trainer.max_steps=2",
              "trainer.save_every=1", "data.arith.num_train=6",
              f"reward.functions=[{{fn: '{fixture}:mostly_constant', weight: 1.0}}, "
              f"{{fn: '{fixture}:odd_length', weight: 0.0}}, {{fn: boxed_format, weight: 0.1}}]",
              f"reward.accuracy={fixture}:odd_length"]
    out = {}
    only = os.environ.get("RECORD_ONLY")
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CONFIGS.items():
            if only and name not in only.split(","):
                continue
            folder = Path(tmp) / name
            train(load_config(ROOT / "configs/tiny.yaml", [f"trainer.output_dir={folder}", *common, *overrides]))
            metrics = [_clean(json.loads(x)) for x in (folder / "metrics.jsonl").read_text().splitlines()]
            events = [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines()]
            events = [{k: v for k, v in e.items() if k not in ("time",)} for e in events if e["event"] in EVENTS]
            state = json.loads((folder / "checkpoints/step-000002/trainer_state.json").read_text())
            out[name] = {"metrics": metrics, "events": events, "state": state}
            print(f"recorded {name}: {len(metrics)} steps", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- compare
def _diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in {'first' if k in a else 'second'}" for k in set(a) ^ set(b)]
        for k in sorted(set(a) & set(b), key=str):
            out += _diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} entries"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # NaN == NaN here
    return [] if same else [f"{path}: {a!r} != {b!r}"]


def main(argv: list[str]) -> int:
    if argv[0] == "compare":
        a, b = (json.loads(Path(p).read_text()) for p in argv[1:3])
        diffs = _diff(a, b)
        for d in diffs[:50]:
            print(d)
        print(f"{len(diffs)} differences" if diffs else "identical")
        return 1 if diffs else 0
    result = {"stand-in": stand_in, "tiny": tiny}[argv[0]]()
    Path(argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

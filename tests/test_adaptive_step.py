"""rl/steps/adaptive.py without Ray: a stand-in Run whose rollouts and rewards are hand-made, so dynamic sampling,
the GDRO sampler and Rollout-GDRO allocation run their real step code, checkpoint state included."""
import json
import math
from types import SimpleNamespace

import pytest

from rewards.isolation import RewardResult
from rl.config.schema import load_config
from rl.contracts import RolloutBatch
from rl.data.loading import PromptSampler
from rl.scoring.score import ScoredBatch
from rl.steps import make_step
from rl.steps.policy import NO_UPDATE
from rl.steps.adaptive import AdaptivePolicyStep
from rl.steps.policy import PolicyGradientStep

ROWS = [{"id": f"q{i}", "prompt": f"P{i}", "problem": f"p{i}", "answer": "1"} for i in range(12)]
CONSTANT = {f"q{i}" for i in range(12) if i % 3}  # two prompts in three: every sample scores the same


class FakeRun:
    def __init__(self, cfg, step):
        self.cfg, self.events, self.trained = cfg, [], []
        self.sampler = step.make_sampler(ROWS)
        self.metrics = SimpleNamespace(log_event=lambda name, payload: self.events.append((name, payload)))
        self.learner = SimpleNamespace(train=self._train)

    def _train(self, sequences, mini_batches, max_len, on_policy=True):
        self.trained.append([s.advantage for s in sequences])
        return {**NO_UPDATE, "loss": 0.5, "ratio_sum": float(len(sequences)), "tokens": float(len(sequences)),
                "grad_norm": 1.0, "lr": 1e-4, "logprob_diff_tokens": 1.0}

    def sync(self):
        pass

    def updated(self, step):
        pass

    def generate(self, prompts, params, seed):
        out = RolloutBatch()
        for p in prompts:
            for j in range(params.n):
                out.append([1, 2], [3] * (1 + (j + seed) % 3), [-0.1] * (1 + (j + seed) % 3), 0.5, "stop", f"{p}.{j}")
        return out

    def score(self, rows, batch, sizes):
        total, correct, k = [], [], 0
        for row, n in zip(rows, sizes):
            for j in range(n):
                const = row["id"] in CONSTANT
                total.append(1.0 if const else 0.1 * j + 0.01 * len(batch.response_ids[k]))
                correct.append(float(j % 2 == 0) if not const else 0.0)
                k += 1
        return ScoredBatch(total, correct, RewardResult({"r": list(total)}))


def _steps(cfg, steps, state=None):
    """Run `steps` (a range) of a fresh step kind, optionally from a saved (sampler, step_state) checkpoint."""
    step = make_step(cfg)
    run = FakeRun(cfg, step)
    if state is not None:
        run.sampler.load_state_dict(state[0])
        step.load_state_dict(state[1])
    step.start(run)
    drawn, rows, saved = [], [], None
    for s in steps:
        draw = step.draw(run, s)
        drawn.append([r["id"] for r in draw.items])
        rows.append({k: v for k, v in step.run(run, s, draw).items() if not k.startswith("time_")})
        saved = json.loads(json.dumps((draw.sampler_state, step.state_dict())))  # what the step's checkpoint stores
        if s == steps[0]:
            first = saved
    return drawn, rows, run, first


BASE = ["rollout.prompts_per_step=2", "rollout.group_size=4", "logging.sample_every=0"]


def test_plain_configs_keep_the_plain_step():
    assert type(make_step(load_config(None, BASE))) is PolicyGradientStep
    for key in ("algorithm.dynamic_sampling=true", "data.sampler=gdro", "rollout.allocation=gdro"):
        assert type(make_step(load_config(None, BASE + [key]))) is AdaptivePolicyStep


def test_dynamic_sampling_draws_every_prompt_once_in_order_and_resumes_exactly():
    cfg = load_config(None, BASE + ["algorithm.dynamic_sampling=true", "data.shuffle=false"])
    drawn, rows, run, after_first = _steps(cfg, range(1, 5))
    flat = [i for ids in drawn for i in ids]
    assert flat == [r["id"] for r in PromptSampler(ROWS, seed=0, shuffle=False).next_batch(len(flat))]
    events = [p for n, p in run.events if n == "dynamic_sampling"]
    assert sum(len(e["dropped"]) for e in events) > 0  # the fixture really made groups constant
    for ids, e, m in zip(drawn, events, rows):
        assert sorted(e["kept"] + e["dropped"]) == sorted(ids) and len(ids) == m["ds_groups_drawn"]
        assert not set(e["kept"]) & CONSTANT and set(e["dropped"]) <= CONSTANT
        assert m["ds_groups_kept"] == min(2, len(e["kept"])) and m["zero_adv_groups"] == 0.0
    # Each kept group trains: 2 varying groups x 4 samples.
    assert [len(a) for a in run.trained] == [8] * len(run.trained)
    # Resume after step 1: steps 2-4 draw the same prompts (none replayed, none skipped) with the same numbers.
    again, rows2, _, _ = _steps(cfg, range(2, 5), after_first)
    assert again == drawn[1:] and rows2 == rows[1:]


def test_cap_without_a_varying_group_skips_the_update():
    cfg = load_config(None, BASE + ["algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_max_extra=0",
                                    "data.shuffle=false"])
    drawn, rows, run, _ = _steps(cfg, range(1, 2))  # q0 varies, q1 is constant; no extra draw allowed
    assert drawn == [["q0", "q1"]] and rows[0]["ds_groups_kept"] == 1 and rows[0]["ds_capped"] == 1.0
    assert [len(a) for a in run.trained] == [4]
    cfg = load_config(None, BASE + ["algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_max_extra=1",
                                    "data.shuffle=false"])
    global ROWS
    saved, ROWS = ROWS, [r for r in ROWS if r["id"] in CONSTANT]
    try:
        drawn, rows, run, _ = _steps(cfg, range(1, 2))
    finally:
        ROWS = saved
    assert len(drawn[0]) == 3 and run.trained == [] and rows[0]["loss"] == 0.0 and rows[0]["ds_groups_kept"] == 0


def test_gdro_sampler_and_allocation_keep_the_budget_and_resume_exactly():
    cfg = load_config(None, BASE + ["data.sampler=gdro", "rollout.allocation=gdro", "rollout.prompts_per_step=3",
                                    "rollout.gdro.max_group_size=6"])
    drawn, rows, run, after_first = _steps(cfg, range(1, 6))
    allocations = [p for n, p in run.events if n == "allocation"]
    assert all(sum(a["sizes"]) == 12 and all(2 <= n <= 6 for n in a["sizes"]) for a in allocations)
    assert [len(a) for a in run.trained] == [12] * 5  # the budget, exactly, every step
    assert any(len(set(a["sizes"])) > 1 for a in allocations)  # pass rates moved samples between prompts
    assert all(len(set(ids)) == 3 for ids in drawn)
    last = rows[-1]
    assert sum(last[f"gdro/bin_{b}"] for b in range(5)) + last["gdro/unseen"] == len(ROWS)
    assert sum(last[f"gdro/q_{b}"] for b in range(6)) == pytest.approx(1.0)
    assert not math.isnan(last["pass_rate_mean"])
    # Where the prompts land. FakeRun's constant prompts never pass (rate 0: bin 0); the varying ones pass their
    # even-numbered samples (ceil(n/2)/n of n: 0.5-0.67, bins 2-3 of 5). Each step's histogram counts the prompts
    # seen so far in those bins, and the rest unseen.
    seen: set = set()
    for ids, m in zip(drawn, rows):
        seen |= set(ids)
        varying = len(seen - CONSTANT)
        assert (m["gdro/bin_0"], m["gdro/bin_1"], m["gdro/bin_2"] + m["gdro/bin_3"], m["gdro/bin_4"]) == \
            (len(seen & CONSTANT), 0, varying, 0), (ids, m)
        assert m["gdro/unseen"] == len(ROWS) - len(seen)
    assert seen & CONSTANT and seen - CONSTANT  # both kinds were drawn
    # Rollout-GDRO: a prompt's logged pass rate is its running rate (0 for a constant prompt), and an uncertain
    # (varying) prompt gets more samples than a never-passing one drawn beside it.
    compared = 0
    for a in allocations:
        known = [(i, n, r) for i, n, r in zip(a["ids"], a["sizes"], a["pass_rates"]) if r is not None]
        for i, n, r in known:
            assert (r == 0.0) if i in CONSTANT else (0.4 < r < 0.7), (i, r)
        for i, n, r in known:
            for j, m_, q in known:
                if i not in CONSTANT and j in CONSTANT:
                    assert n > m_, a
                    compared += 1
    assert compared > 0
    again, rows2, _, _ = _steps(cfg, range(2, 6), after_first)
    assert again == drawn[1:] and rows2 == rows[1:]


def test_each_option_can_be_a_method_of_an_experiment(tmp_path):
    """`reasonrl experiment` compares configs that differ only in the method: every option here is one."""
    from pathlib import Path

    import yaml

    from launch.experiment import load_configs

    root = Path(__file__).resolve().parent.parent
    base = yaml.safe_load((root / "configs/compress_grpo.yaml").read_text())
    variants = {
        "dapo": {"algorithm": {"dynamic_sampling": True, "overlong_filter": True}},
        "gspo": {"algorithm": {"importance_sampling_level": "sequence", "loss_agg": "seq-mean-token-mean"}},
        "prompt_gdro": {"data": {"sampler": "gdro", "gdro": {"eta": 2.0}}},
        "rollout_gdro": {"rollout": {"allocation": "gdro", "gdro": {"max_group_size": 12}}},
    }
    paths = [str(root / "configs/compress_grpo.yaml")]
    for name, change in variants.items():
        cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
        for section, keys in change.items():
            cfg[section].update(keys)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        paths.append(str(tmp_path / f"{name}.yaml"))
    cfgs = load_configs(paths, tmp_path / "exp", [])
    assert cfgs["dapo"].algorithm.dynamic_sampling and cfgs["dapo"].algorithm.overlong_filter
    assert cfgs["gspo"].algorithm.clip_low == 3e-4
    assert cfgs["prompt_gdro"].data.sampler == "gdro" and cfgs["rollout_gdro"].rollout.allocation == "gdro"

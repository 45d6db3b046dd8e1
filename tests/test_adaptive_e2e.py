"""Dynamic sampling, GSPO, overlong filtering and both GDRO controllers in real tiny runs (local Ray, DeepSpeed over
gloo). Slow: each run starts the actors for real; the options are combined into two runs."""
import json
from pathlib import Path

import pytest
import ray

from rl.config.schema import load_config
from rl.data.loading import PromptSampler, load_rows
from rl.trainer import train

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests/fixtures/adaptive_rewards.py"
QUIET = ["logging.progress=false", "logging.plots=false", "logging.tensorboard=false", "trainer.eval_at_start=false",
         "trainer.eval_at_end=false", f"reward.functions=[{{fn: '{FIXTURE}:mostly_constant', weight: 1.0}}, "
         f"{{fn: '{FIXTURE}:odd_length', weight: 0.0}}]", f"reward.accuracy={FIXTURE}:odd_length"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    ray.shutdown()


def _read(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_dynamic_sampling_with_rollout_gdro_and_gspo_resumes_without_replay_or_skip(tmp_path):
    out = tmp_path / "run"
    verdict = f"{FIXTURE}:graded_pass"  # known pass rates: 0.5 for prompt 0, 1.0 for prompt 1
    # Two training prompts: every step after the first sees them again, with their pass rates known, so Rollout-GDRO
    # gives them different group sizes, which two reward workers must keep whole; prompt 1's group is constant.
    common = [f"trainer.output_dir={out}", "trainer.save_every=1", "data.arith.num_train=2",
              "algorithm.dynamic_sampling=true", "rollout.allocation=gdro", "reward.num_workers=2",
              "algorithm.importance_sampling_level=sequence", "algorithm.loss_agg=seq-mean-token-mean",
              # Two optimizer steps per step: the second mini-batch is scored by weights the first one moved, so
              # the ratio leaves 1 and GSPO's sequence-level clip has something to clip.
              "algorithm.mini_batches=2", *QUIET,
              f"reward.functions=[{{fn: '{FIXTURE}:mostly_constant', weight: 1.0}}, {{fn: '{verdict}', weight: 0.0}}]",
              f"reward.accuracy={verdict}"]
    train(load_config(ROOT / "configs/tiny.yaml", [*common, "trainer.max_steps=2"]))
    resumed = train(load_config(ROOT / "configs/tiny.yaml", [*common, "trainer.max_steps=4"]), resume=True)
    assert resumed["start_step"] == 2

    metrics, events = _read(out, "metrics.jsonl"), _read(out, "events.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    cfg = load_config(ROOT / "configs/tiny.yaml", common)
    rows, _ = load_rows("arith", "train", arith=cfg.data.arith.model_dump())
    logged = {e["step"]: e["ids"] for e in events if e["event"] == "prompts"}
    drawn = [i for s in range(1, 5) for i in logged[s]]
    # Every drawn prompt, kept or dropped, exactly once and in the sampler's order, across the resume.
    sampler = PromptSampler(rows, seed=0, shuffle=True)
    assert drawn == [r["id"] for r in sampler.next_batch(len(drawn))]
    ds = {e["step"]: e for e in events if e["event"] == "dynamic_sampling"}
    assert sum(len(e["dropped"]) for e in ds.values()) > 0  # the fixture made some groups constant
    alloc = {e["step"]: e for e in events if e["event"] == "allocation"}
    max_new = cfg.rollout.max_new_tokens
    for m in metrics:
        assert m["ds_groups_drawn"] == len(logged[m["step"]]) == m["ds_groups_kept"] + m["ds_groups_dropped"]
        assert m["ds_groups_kept"] == 2 or m["ds_capped"] == 1.0
        # Round one draws the 2 prompts of the step; an extra round (and its generation time) only when one was
        # dropped, each extra round drawing at least one more group.
        assert m["ds_rounds"] == ds[m["step"]]["rounds"] and (m["ds_rounds"] > 1) == (m["ds_groups_drawn"] > 2)
        assert (m["time_generate_extra"] > 0) == (m["ds_rounds"] > 1)
        # The random tiny model never ends a response (every one runs to max_new_tokens), so the generation cost,
        # which counts the dropped draws too, is max_new_tokens per drawn sample: kept and dropped groups alike.
        assert m["truncation_rate"] == 1.0 and m["response_tokens_mean"] == max_new
        sizes, ids = alloc[m["step"]]["sizes"], alloc[m["step"]]["ids"]
        assert len(ids) == m["ds_groups_drawn"]
        assert m["generated_tokens"] == max_new * sum(sizes)
        kept, dropped = set(ds[m["step"]]["kept"]), set(ds[m["step"]]["dropped"])
        assert not kept & dropped  # (prompt 0 always varies, prompt 1 never: the kept samples are prompt 0's)
        trained = sum(n for i, n in zip(ids, sizes) if i in kept)
        if m["ds_groups_dropped"]:
            assert m["generated_tokens"] > max_new * trained
        if m["ds_groups_kept"]:  # (none kept at the cap: no update)
            assert m["zero_adv_groups"] == 0.0
            # Off-policy in the second mini-batch: the ratio moved off 1 ...
            assert m["ratio_mean"] != pytest.approx(1.0, abs=1e-9)
            # ... and GSPO's `sequence` level clips whole responses: the clipped tokens are a whole number of
            # (max_new_tokens long) responses, which per-token ratios (`token` level) would not give.
            clipped_responses = m["clip_fraction"] * trained
            assert clipped_responses == pytest.approx(round(clipped_responses), abs=1e-6), (m["step"], m["clip_fraction"])
    assert any(m["grad_norm"] > 0 for m in metrics)
    assert any(0 < m["clip_fraction"] < 1 for m in metrics)  # some responses clipped, not all
    allocations = [e for e in events if e["event"] == "allocation"]
    assert all(sum(e["sizes"]) == 4 * len(e["ids"]) and min(e["sizes"]) >= 2 for e in allocations)  # the budget
    # Pass rates 0.5 and 1.0: sqrt(p(1-p)) moves samples to the uncertain prompt (1.0 is floored at 0.95).
    rates = {"arith-train-0": 0.5, "arith-train-1": 1.0}
    # (each event lists the step's rounds in order: the first 2 groups are round one, later ones single extra draws)
    pairs = [dict(zip(e["ids"][:2], e["sizes"][:2])) for e in allocations if None not in e["pass_rates"][:2]]
    assert pairs and all(p == {"arith-train-0": 6, "arith-train-1": 2} for p in pairs), allocations
    assert all(r == rates[i] for e in allocations for i, r in zip(e["ids"], e["pass_rates"]) if r is not None)
    state = json.loads((out / "checkpoints/step-000004/trainer_state.json").read_text())
    assert "gdro" in state["step_state"] and state["sampler"] == sampler.state_dict()


def test_prompt_gdro_rollout_gdro_with_fgo_gspo_token_and_overlong_filter(tmp_path):
    out = tmp_path / "run"
    verdict = f"{FIXTURE}:even_id_passes"  # pass rates 0 or 1 by prompt: the GDRO path is independent of the model
    train(load_config(ROOT / "configs/tiny.yaml", [
        f"trainer.output_dir={out}", "trainer.max_steps=3", "data.arith.num_train=4", "algorithm.name=fgo",
        "data.sampler=gdro", "data.gdro.bins=4", "rollout.allocation=gdro",
        "algorithm.overlong_filter=true", "algorithm.importance_sampling_level=sequence_token", *QUIET,
        f"reward.functions=[{{fn: '{FIXTURE}:mostly_constant', weight: 1.0}}, {{fn: '{verdict}', weight: 0.0}}]",
        f"reward.accuracy={verdict}"]))
    metrics, events = _read(out, "metrics.jsonl"), _read(out, "events.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert sum(m[f"gdro/q_{b}"] for b in range(5)) == pytest.approx(1.0)
        assert sum(m[f"gdro/bin_{b}"] for b in range(4)) + m["gdro/unseen"] == 4
        # The random tiny model never ends a response: every one is truncated, so none is trained on.
        assert m["overlong_filtered"] == 8 and m["truncation_rate"] == 1.0 and m["grad_norm"] == 0.0
    assert metrics[0]["gdro/unseen"] == 2
    allocations = [e for e in events if e["event"] == "allocation"]
    assert len(allocations) == 3 and all(sum(e["sizes"]) == 8 and min(e["sizes"]) >= 2 for e in allocations)
    state = json.loads((out / "checkpoints/step-000003/trainer_state.json").read_text())
    assert state["sampler"]["kind"] == "gdro" and state["step_state"]["gdro"]["bins"] == 4

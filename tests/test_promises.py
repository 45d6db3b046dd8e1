"""Promises of the README that had no test (issue 25), checked on real tiny runs (local Ray, DeepSpeed over gloo,
transformers, math-verify). Slow ones share runs: one GRPO run with dynamic sampling, Rollout-GDRO, a JSONL file
with malformed lines, sample events and the in-training benchmark eval (module fixture `shared`), read by several
tests; `reasonrl eval` then reads that run folder."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray

from rl.config.schema import load_config

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests/fixtures/promise_rewards.py"
SYSTEM = "You are the promise-test assistant."


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    ray.shutdown()


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _read(path: Path, event: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows if event is None else [r for r in rows if r.get("event") == event]


# --------------------------------------------------------------------------------------------- the shared run
TRAIN_ROWS = 12  # usable rows of the training file; every third one scores a constant reward


def _train_file(path: Path) -> Path:
    rows: list = []
    for i in range(TRAIN_ROWS):
        rows.append({"id": f"p-{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i), "constant": i % 3 == 0})
        if i == 2:
            rows.append("{not json")  # line 4
        if i == 6:
            rows.append("[1, 2, 3]")  # line 9: JSON, not an object
    return _jsonl(path, rows)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """3 steps of tiny GRPO with dynamic sampling and Rollout-GDRO, a sample event every 2 steps, the benchmark
    eval every 2 steps (2 sampled responses per problem), TensorBoard on."""
    from launch.run import train_run

    tmp = tmp_path_factory.mktemp("shared")
    bench = _jsonl(tmp / "sums.jsonl", [{"id": f"s{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)}
                                        for i in range(3)])
    out = tmp / "run"
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"trainer.output_dir={out}", f"data.train={_train_file(tmp / 'train.jsonl')}", "data.eval_size=0",
        f"data.system_prompt={SYSTEM!r}", "trainer.max_steps=3", "trainer.save_every=0",
        "algorithm.dynamic_sampling=true", "rollout.allocation=gdro", "logging.sample_every=2",
        f"reward.functions=[{{fn: '{FIXTURE}:constant_or_length', weight: 1.0}}, {{fn: '{FIXTURE}:verdict', "
        f"weight: 0.0}}]", f"reward.accuracy={FIXTURE}:verdict",
        "trainer.eval_every=2", f"trainer.eval_benchmarks=[{bench}]", "trainer.eval_limit=2",
        "trainer.eval_samples=2", "trainer.eval_greedy=false", "logging.progress=false", "logging.plots=false",
        "logging.tensorboard=true"])
    summary = train_run(cfg)
    return {"out": out, "cfg": cfg, "summary": summary, "bench": bench, "metrics": _read(out / "metrics.jsonl"),
            "events": _read(out / "events.jsonl")}


@pytest.mark.slow
def test_data_event_names_the_skipped_lines(shared):
    data = [e for e in shared["events"] if e["event"] == "data"]
    assert len(data) == 1
    assert data[0]["bad_lines"] == [4, 9] and data[0]["skipped_bad_json"] == 2
    assert data[0]["rows"] == TRAIN_ROWS and data[0]["step"] == 0


@pytest.mark.slow
def test_sample_events_every_sample_every_steps(shared):
    samples = [e for e in shared["events"] if e["event"] == "sample"]
    assert [e["step"] for e in samples] == [2]  # logging.sample_every=2 over 3 steps
    e = samples[0]
    prompts = {x["step"]: x["ids"] for x in shared["events"] if x["event"] == "prompts"}
    first = int(prompts[2][0].split("-")[1])  # the first prompt drawn at step 2
    assert f"What is {first} + {first}?" in e["prompt"] and SYSTEM in e["prompt"]  # the rendered chat prompt
    assert isinstance(e["completion"], str) and e["completion"]
    assert e["reward"] == pytest.approx(0.5 if first % 3 == 0 else len(e["completion"]) / 100.0)


def _replay_rounds(ids: list[str], need: int, max_extra: int) -> int:
    """DAPO's draw loop replayed from the drawn prompt ids (constant rows are the dropped groups)."""
    kept, pos, rounds, k, extra_left = 0, 0, 0, need, max_extra
    while k > 0:
        kept += sum(int(i.split("-")[1]) % 3 != 0 for i in ids[pos:pos + k])
        pos, rounds = pos + k, rounds + 1
        k = min(need - kept, extra_left)
        extra_left -= k
    assert pos == len(ids)
    return rounds


@pytest.mark.slow
def test_adaptive_step_metrics_describe_every_drawn_sample(shared):
    """reward_drawn / accuracy_drawn average over every drawn sample (dropped groups too), ds_rounds counts the
    draws, alloc_size_min/max bound Rollout-GDRO's group sizes: each checked against the events of the step."""
    cfg, events = shared["cfg"], shared["events"]
    alloc = {e["step"]: e for e in events if e["event"] == "allocation"}
    ds = {e["step"]: e for e in events if e["event"] == "dynamic_sampling"}
    prompts = {e["step"]: e["ids"] for e in events if e["event"] == "prompts"}
    dropped_any = False
    for m in shared["metrics"]:
        step = m["step"]
        ids, sizes = alloc[step]["ids"], alloc[step]["sizes"]
        assert ids == prompts[step] and len(set(ids)) == len(ids)
        size = dict(zip(ids, sizes))
        kept = sum(size[i] for i in ds[step]["kept"])
        dropped = sum(size[i] for i in ds[step]["dropped"])
        assert set(ds[step]["dropped"]) == {i for i in ids if int(i.split("-")[1]) % 3 == 0}
        dropped_any |= dropped > 0
        # Dropped groups are the constant rows: reward 0.5 and always correct.
        assert m["reward_drawn"] == pytest.approx((m["reward"] * kept + 0.5 * dropped) / (kept + dropped))
        assert m["accuracy_drawn"] == pytest.approx((m["accuracy"] * kept + 1.0 * dropped) / (kept + dropped))
        assert m["ds_rounds"] == _replay_rounds(ids, cfg.rollout.prompts_per_step,
                                                cfg.algorithm.dynamic_sampling_max_extra)
        assert (m["alloc_size_min"], m["alloc_size_max"]) == (min(sizes), max(sizes))
        assert m["alloc_size_min"] >= cfg.rollout.gdro.min_group_size
    assert dropped_any  # the drawn averages really differ from the trained ones somewhere
    assert any(m["ds_rounds"] > 1 for m in shared["metrics"])


def _tb_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_in_training_eval_logs_interval_pass_at_k_and_act_in_metrics_and_tensorboard(shared):
    name = Path(shared["bench"]).stem
    keys = [f"eval/{name}/{k}" for k in ("accuracy", "accuracy_lo", "accuracy_hi", "pass@2", "tokens_mean",
                                         "truncation_rate", "act")]
    rows = {m["step"]: m for m in shared["metrics"]}
    assert not any(k.startswith("eval/") for k in rows[1]) and not any(k.startswith("eval/") for k in rows[3])
    row = rows[2]  # trainer.eval_every=2
    for k in keys:
        assert k in row, k
    records = _read(shared["out"] / "eval" / "step-000002" / "samples" / f"{name}.jsonl")
    assert len(records) == 4  # 2 problems x 2 samples
    by_problem: dict = {}
    for r in records:
        by_problem.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    acc = sum(r["correct"] for r in records) / len(records)
    tokens = sum(r["tokens"] for r in records) / len(records)
    assert row[f"eval/{name}/accuracy"] == pytest.approx(acc)
    assert row[f"eval/{name}/accuracy_lo"] <= acc <= row[f"eval/{name}/accuracy_hi"]
    # pass@2 of 2 samples: the share of problems with at least one correct sample.
    assert row[f"eval/{name}/pass@2"] == pytest.approx(sum(any(v) for v in by_problem.values()) / len(by_problem))
    assert row[f"eval/{name}/tokens_mean"] == pytest.approx(tokens)
    assert row[f"eval/{name}/act"] == pytest.approx(100.0 * acc / (tokens / 100.0))
    event = next(e for e in shared["events"] if e["event"] == "benchmark_eval")
    assert event["step"] == 2 and event["accuracy_ci"] == [row[f"eval/{name}/accuracy_lo"],
                                                            row[f"eval/{name}/accuracy_hi"]]

    tb = _tb_scalars(shared["out"] / "tb")
    for k in keys:
        assert tb[k] == {2: pytest.approx(row[k])}, k  # the TensorBoard copy, at the eval's step only
    for k in ("reward_drawn", "accuracy_drawn", "ds_rounds", "alloc_size_min", "alloc_size_max", "reward"):
        assert tb[k] == {m["step"]: pytest.approx(m[k]) for m in shared["metrics"]}, k


# -------------------------------------------------------------------------------- eval of the run folder
def _eval(model: Path, bench: str, out: Path, *extra: str) -> int:
    from launch.cli import main

    return main(["eval", "--model", str(model), "--benchmarks", bench, "--limit", "2", "--greedy",
                 "--max-new-tokens", "4", "--out", str(out), "--no-progress", *extra])


@pytest.mark.slow
def test_eval_of_a_run_folder_uses_its_system_prompt_and_overwrite_moves_the_old_eval_aside(shared, tmp_path,
                                                                                             monkeypatch, capsys):
    import eval.runner

    rendered = []
    real = eval.runner.render_prompt
    monkeypatch.setattr(eval.runner, "render_prompt",
                        lambda tok, text, system=None, *a, **k: rendered.append(real(tok, text, system, *a, **k))
                        or rendered[-1])
    out = tmp_path / "eval"
    assert _eval(shared["out"], str(shared["bench"]), out) == 0
    settings = json.loads((out / "eval_config.json").read_text())
    assert settings["system_prompt"] == SYSTEM and settings["run_config"] == str(shared["out"] / "config.yaml")
    assert len(rendered) == 2 and all(SYSTEM in p for p in rendered)  # the prompts generated from
    first = (out / "samples" / f"{Path(shared['bench']).stem}.jsonl").read_text()

    capsys.readouterr()
    assert _eval(shared["out"], str(shared["bench"]), out, "--max-new-tokens", "3") == 2  # other settings: refused
    assert "max_new_tokens (4 there, 3 now)" in capsys.readouterr().err
    assert _eval(shared["out"], str(shared["bench"]), out, "--max-new-tokens", "3", "--overwrite") == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("eval.old-")]
    assert len(aside) == 1
    assert json.loads((aside[0] / "eval_config.json").read_text())["max_new_tokens"] == 4
    assert (aside[0] / "samples" / f"{Path(shared['bench']).stem}.jsonl").read_text() == first  # kept as it was
    assert json.loads((out / "eval_config.json").read_text())["max_new_tokens"] == 3
    records = _read(out / "samples" / f"{Path(shared['bench']).stem}.jsonl")
    assert len(records) == 2 and all(r["tokens"] <= 3 for r in records)  # generated anew, not resumed


# ------------------------------------------------------------------------------------- gradient checkpointing
GC_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    import torch
    from rl.config.schema import load_config
    from rl.contracts import TrainSequence
    from rl.learner.engine import Engine, LearnerSetup
    from rl.learner.updates import plan_policy, run_update
    from rl.models import resolve_model

    cfg = load_config(sys.argv[1], sys.argv[2:])
    path = resolve_model(cfg.model.path)
    engine = Engine(0, 1, path, LearnerSetup.of(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine.build("127.0.0.1", port)
    calls = []
    engine.policy.module.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    g = torch.Generator().manual_seed(0)
    seqs = [TrainSequence(torch.randint(0, 49152, (5 + i,), generator=g).tolist(),
                          torch.randint(0, 49152, (3 + 2 * i,), generator=g).tolist(), [0.0] * (3 + 2 * i),
                          adv) for i, adv in enumerate([1.0, -0.5, 0.75, -1.25])]
    shards, plan = plan_policy(seqs, 1, cfg.learner.micro_batch_size, mini_batches=1, max_len=9)
    stats = run_update(engine, "policy", shards[0], plan)
    weight = engine.policy.module.model.layers[0].self_attn.q_proj.weight.detach()
    print("RESULT " + json.dumps({"checkpointing": engine.policy.module.is_gradient_checkpointing,
                                  "layer_calls": len(calls), "loss": stats["loss"], "grad_norm": stats["grad_norm"],
                                  "weight": weight.flatten()[:256].tolist()}))
""")


def _update_with(*overrides: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", GC_SCRIPT, str(ROOT / "configs/tiny.yaml"),
                           "learner.micro_batch_size=2", "learner.lr=1e-2", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_activations_and_computes_the_same_update():
    """learner.gradient_checkpointing: the DeepSpeed engine's model recomputes each layer's forward in the backward
    (a projection inside a decoder layer runs twice per micro-batch instead of once; transformers checkpoints the
    layer's `forward`, so the layer's own hooks fire once either way, and torch stops the recompute early, so the
    layer's last projection may not run again), and the update is the plain one: same loss,
    gradient norm and updated weights."""
    plain = _update_with("learner.shared_prefix=false")
    ckpt = _update_with("learner.gradient_checkpointing=true")
    assert plain["checkpointing"] is False and ckpt["checkpointing"] is True
    assert plain["layer_calls"] == 2  # 4 sequences in micro-batches of 2
    assert ckpt["layer_calls"] == 2 * plain["layer_calls"]  # forward, then again inside the backward
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-6, abs=1e-9)
    assert ckpt["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5) and plain["grad_norm"] > 0
    assert ckpt["weight"] == pytest.approx(plain["weight"], rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------ FGO's full-vocabulary entropy
@pytest.mark.slow
def test_fgo_mean_token_entropy_reaches_the_advantages_through_the_policy_step(tmp_path):
    """algorithm.fgo.entropy=mean_token_entropy in a real run (the plain policy step; gradient checkpointing on, so
    a run trains with it too): FGO's entropy is the rollout's full-vocabulary entropy per token, the quantity the
    row's `entropy` logs (about ln 49152 for the random tiny model), not the sampled-token proxy (near 0 here)."""
    from rl.trainer import train

    out = tmp_path / "fgo"
    train(load_config(ROOT / "configs/tiny.yaml", [
        f"trainer.output_dir={out}", "algorithm.name=fgo", "algorithm.fgo.entropy=mean_token_entropy",
        "learner.gradient_checkpointing=true", "trainer.max_steps=1", "trainer.save_every=0",
        "trainer.eval_at_start=false", "trainer.eval_at_end=false", "logging.progress=false", "logging.plots=false",
        "logging.tensorboard=false"]))
    (row,) = _read(out / "metrics.jsonl")
    assert row["truncation_rate"] == 1.0  # every response has max_new_tokens tokens: per-sample = per-token mean
    assert row["entropy"] > 5.0
    assert row["fgo_entropy"] == pytest.approx(row["entropy"], rel=1e-4)
    assert row["fgo_weight_spread"] > 0 and row["grad_norm"] > 0 and math.isfinite(row["loss"])


# ------------------------------------------------------------------------------------- SFT's eval_every
@pytest.mark.slow
def test_sft_eval_every_logs_the_held_out_loss_on_schedule_and_plots_it(tmp_path):
    from rl.trainer import train

    rows = [{"prompt": f"What is {i} + {i}?", "completion": f"{i} + {i} = {2 * i}."} for i in range(12)]
    out = tmp_path / "sft"
    summary = train(load_config(ROOT / "configs/tiny.yaml", [
        f"trainer.output_dir={out}", "algorithm.name=sft", f"data.train={_jsonl(tmp_path / 'train.jsonl', rows)}",
        f"data.eval={_jsonl(tmp_path / 'eval.jsonl', rows[:4])}", "algorithm.sft.examples_per_step=4",
        "algorithm.sft.eval_every=2", "trainer.max_steps=3", "trainer.save_every=0", "learner.lr=1e-2",
        "logging.progress=false", "logging.plots=true", "logging.tensorboard=false"]))
    metrics = _read(out / "metrics.jsonl")
    evals = _read(out / "events.jsonl", "sft_eval")
    assert [e["step"] for e in evals] == [0, 2, 3]  # start, every 2 steps, end
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 3]
    assert [m["eval_loss"] for m in metrics if "eval_loss" in m] == [e["eval_loss"] for e in evals[1:]]
    assert summary["eval_loss_start"] == evals[0]["eval_loss"] and summary["eval_loss_end"] == evals[-1]["eval_loss"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it trains on these very rows
    png = out / "curve_eval_loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size == (700, 400)


# ----------------------------------------------------------------------------------- pref-build and pref-eval
ODD = str(ROOT / "tests/fixtures/preference_rewards.py") + ":odd_length"  # 'correct' = odd character count


@pytest.mark.slow
def test_pref_build_writes_verifier_scored_pairs_that_pref_eval_reads_with_pairs(tmp_path, capsys):
    """`reasonrl pref-build` on good input: train.jsonl / eval.jsonl pairs of the model's own samples, paired by the
    verifier as the online rules say, counted in summary.json; `reasonrl pref-eval CONFIG --policy P --pairs FILE`
    scores exactly those pairs (the config names none), and swapping policy and reference negates every margin."""
    import yaml

    from launch.cli import main
    from rl.models import load_policy, load_tokenizer, resolve_model

    out = tmp_path / "pairs"
    assert main(["pref-build", str(ROOT / "configs/tiny.yaml"), f"reward.functions=[{{fn: '{ODD}'}}]",
                 f"reward.accuracy={ODD}", "rollout.group_size=4", "algorithm.todo.pairs_per_group=3",
                 f"data.system_prompt={SYSTEM!r}", "--out", str(out), "--train-prompts", "3",
                 "--eval-prompts", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tok = load_tokenizer(resolve_model("tiny:llama"))
    for split, prompts in (("train", 3), ("eval", 2)):
        rows = _read(out / f"{split}.jsonl")
        s = summary[split]
        assert s["prompts"] == prompts and s["samples"] == 4 * prompts and s["pairs"] == len(rows) > 0
        assert len(rows) <= 3 * prompts  # algorithm.todo.pairs_per_group
        for kind in ("preference", "shorter", "tie_correct", "tie_incorrect"):
            assert s[f"pairs/{kind}"] == sum(r["kind"] == kind for r in rows), kind
        for r in rows:
            assert r["prompt"][0] == {"role": "system", "content": SYSTEM} and r["prompt"][1]["role"] == "user"
            odd = (len(r["chosen"]) % 2 == 1, len(r["rejected"]) % 2 == 1)
            assert r["tie"] == r["kind"].startswith("tie")
            if r["kind"] == "preference":
                assert odd == (True, False)  # correct chosen over incorrect
            elif r["kind"] == "tie_correct":
                assert odd == (True, True)
            elif r["kind"] == "shorter":
                assert odd == (True, True) and len(tok(r["chosen"])["input_ids"]) < len(tok(r["rejected"])["input_ids"])
    assert summary["train"]["pairs/preference"] + summary["eval"]["pairs/preference"] > 0

    # A policy that differs from the start model, saved as a plain HF folder.
    import torch

    torch.manual_seed(1)
    policy = load_policy(resolve_model("tiny:llama"))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    cfg = ROOT / "configs/tiny.yaml"  # names no held-out pairs (algorithm.todo.eval_data)
    capsys.readouterr()
    assert main(["pref-eval", str(cfg), "--policy", str(tmp_path / "policy")]) == 2  # nothing to score without --pairs
    assert main(["pref-eval", str(cfg), "--policy", str(tmp_path / "policy"), "--pairs", str(out / "eval.jsonl"),
                 "--output", str(tmp_path / "pe.json")]) == 0
    result = json.loads((tmp_path / "pe.json").read_text())
    rows = _read(out / "eval.jsonl")
    assert result["pairs_source"] == str(out / "eval.jsonl") and result["pairs"] == len(rows)
    assert result["ties"] == sum(r["tie"] for r in rows) and abs(result["mu_mean"]) > 1e-4
    # Reference and policy swapped (a config whose model is the perturbed one): every margin changes sign.
    swapped = yaml.safe_load(cfg.read_text())
    swapped["model"]["path"] = str(tmp_path / "policy")
    (tmp_path / "swapped.yaml").write_text(yaml.safe_dump(swapped))
    assert main(["pref-eval", str(tmp_path / "swapped.yaml"), "--policy", resolve_model("tiny:llama"),
                 "--pairs", str(out / "eval.jsonl"), "--output", str(tmp_path / "swapped.json")]) == 0
    back = json.loads((tmp_path / "swapped.json").read_text())
    assert back["pairs"] == result["pairs"] and back["mu_mean"] == pytest.approx(-result["mu_mean"], rel=1e-4)
    assert main(["pref-eval", str(cfg), "--policy", str(tmp_path / "policy"), "--pairs", str(out / "eval.jsonl"),
                 "--limit", "1", "--output", str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text())["pairs"] == 1

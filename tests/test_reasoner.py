"""Testbed v2 and the tiny reasoner: independent redundant steps, the word-level tokenizer (exact round trip of every
solution), the model folder (reloads with AutoModelForCausalLM, generates), the step counter at 0..7 redundant
steps, and a 2-step RL run of a testbed2 config through the real loop."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rewards.testbed import REDUNDANT_KINDS, count_steps, necessary_steps
from rl.data.reasoner import build_tokenizer, pre_tokens
from rl.data.testbed import (END_KINDS, KIND_PROBS_V2, V2, V2_SYSTEM_PROMPT, generate, minimal_solution,
                             problem_text, redundant_line, sample_problems, verbose_solution)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def testbed2(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed2")
    summary = generate(out, None, seed=1, sft=600, train=20, heldout=10,
                       **{k: V2[k] for k in ("difficulty", "min_redundant", "max_redundant", "probs", "independent")},
                       reasoner={"width": 64, "layers": 2, "seed": 1})
    return out, summary


def test_v2_draws_each_redundant_step_on_its_own():
    """Slot frequencies follow KIND_PROBS_V2 (not conditioned on a count), counts span 0..7 for 3-digit sums."""
    rng = np.random.default_rng(0)
    counts, kinds = [], Counter()
    problems = sample_problems(0, 4000, seed=2)
    for a, op, b in problems:
        _, used = verbose_solution(a, op, b, rng, max_redundant=7, min_redundant=0, probs=KIND_PROBS_V2,
                                   independent=True)
        counts.append(len(used))
        kinds.update(used)
    n = len(problems)
    for kind in ("restate", *END_KINDS):
        assert kinds[kind] / n == pytest.approx(KIND_PROBS_V2[kind], abs=0.03), kind
    assert kinds["verify_step"] / (3 * n) == pytest.approx(KIND_PROBS_V2["verify_step"], abs=0.02)
    assert min(counts) == 0 and max(counts) >= 6
    # The conditioned v1 draw never leaves its range; the independent one does (0 redundant steps happens).
    assert np.mean([c < 3 for c in counts]) > 0.3


def test_v2_files_modal_path_and_the_share_of_shorter_solutions(testbed2):
    out, summary = testbed2
    assert summary["settings"]["independent"] is True and summary["settings"]["kind_probs"] == KIND_PROBS_V2
    path = [k for k, _ in summary["sft_modal_path"]]
    assert [k for k in path if k in REDUNDANT_KINDS] == ["restate", "other_route", "final_check"]
    assert summary["sft_fewer_redundant_than_modal"] >= 0.3
    dist = {int(k): v for k, v in summary["sft_redundant_steps"]["distribution"].items()}
    assert min(dist) <= 1 and max(dist) >= 5
    # Minimal answers are tens of tokens, the verbose SFT solutions about twice that.
    assert 50 <= summary["tokens"]["minimal"]["mean"] <= 80
    assert 1.6 <= summary["tokens"]["sft_over_minimal"]["mean"] <= 2.3


def test_the_tokenizer_round_trips_every_solution_exactly(testbed2):
    out, _ = testbed2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "reasoner")
    rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    texts = [r["completion"] for r in rows] + [r["prompt"] for r in rows]
    texts += [minimal_solution(*p) for p in sample_problems(0, 50, seed=9)]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
    # Digits are one token each, the space before a word or digit folded in.
    assert tok.convert_ids_to_tokens(tok(" = 1783.", add_special_tokens=False)["input_ids"]) == \
        [" =", " 1", "7", "8", "3", "."]
    # The chat template: ChatML, and its end-of-turn is the EOS generation stops at.
    prompt = tok.apply_chat_template([{"role": "system", "content": V2_SYSTEM_PROMPT},
                                      {"role": "user", "content": "What is 12 + 34?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and tok.decode(tok(prompt)["input_ids"]) == prompt
    assert tok.eos_token == "<|im_end|>" and tok.unk_token_id not in tok(prompt)["input_ids"]
    assert tok("What is 12 % 34?")["input_ids"].count(tok.unk_token_id) == 1  # unknown symbols are <unk>, not lost


def test_an_unseen_word_is_unk_and_the_vocabulary_is_reproducible():
    a = build_tokenizer(["Hello world 12", "b"])
    b = build_tokenizer(["b", "Hello world 12"])
    assert a.get_vocab() == b.get_vocab()
    assert pre_tokens("Hi, you 12.\n") == ["Hi", ",", " you", " 1", "2", ".", "\n"]
    assert a("Hello there")["input_ids"][-1] == a.unk_token_id


def test_the_model_folder_reloads_and_generates(testbed2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = testbed2
    folder = out / "reasoner"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tok) == summary["reasoner"]["vocab_size"]
    assert sum(p.numel() for p in model.parameters()) == summary["reasoner"]["parameters"]
    prompt = tok.apply_chat_template([{"role": "user", "content": problem_text(347, "+", 589)}], tokenize=False,
                                     add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    torch.manual_seed(0)
    gen = model.generate(**enc, max_new_tokens=12, do_sample=True, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > enc["input_ids"].shape[1]
    assert isinstance(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True), str)


@pytest.mark.parametrize("k", range(8))
def test_the_counter_on_hand_written_responses_with_k_redundant_steps(k):
    """0..7 redundant steps in a 3-digit sum (restate, three verifies, three end checks), in the slot order."""
    a, op, b = 347, "+", 589
    steps = necessary_steps(a, op, b)
    slots = ["restate", "verify_step", "verify_step", "verify_step", "other_route", "estimate", "final_check"]
    keep = set(range(k))  # the first k slots
    lines = [redundant_line("restate", a, op, b)] if 0 in keep else []
    for i, (line, _, inverse) in enumerate(steps):
        lines.append(line)
        if 1 + i in keep:
            lines.append(redundant_line("verify_step", a, op, b, inverse))
    for j, kind in enumerate(END_KINDS):
        if 4 + j in keep:
            lines.append(redundant_line(kind, a, op, b))
    lines.append("The answer is \\boxed{936}.")
    c = count_steps(problem_text(a, op, b), "\n".join(lines))
    assert c["redundant"] == k and c["redundant_kinds"] == dict(Counter(slots[:k]))
    assert c["necessary"] == c["necessary_correct"] == 3 and c["necessary_missing"] == 0 and c["correct"]


def test_testbed2_configs_share_everything_but_the_method():
    """Every configs/testbed2_<method>.yaml is a valid config, and they pass the experiment's sameness check."""
    from launch.experiment import load_configs

    paths = sorted(str(p) for p in (ROOT / "configs").glob("testbed2_*.yaml") if p.stem != "testbed2_sft")
    assert len(paths) >= 6
    cfgs = load_configs(paths, Path("/tmp/unused"), [])
    first = next(iter(cfgs.values()))
    assert first.rollout.group_size == 8 and first.rollout.prompts_per_step == 4 and first.trainer.max_steps >= 150
    assert {c.algorithm.name for c in cfgs.values()} >= {"grpo", "fgo"}


@pytest.mark.slow
def test_two_rl_steps_of_a_testbed2_config_from_a_tiny_reasoner(testbed2, tmp_path):
    """The real loop (Ray, DeepSpeed, rollout, rewards, learner) on the reasoner folder: both steps train and the
    held-out end evaluation counts redundant steps."""
    from launch.run import load_training_config, train_run
    from rl.store.metrics import read_metrics

    out, _ = testbed2
    cfg = load_training_config(ROOT / "configs" / "testbed2_fgo_std.yaml", [
        f"model.path={out / 'reasoner'}", f"data.train={out / 'train.jsonl'}", f"data.eval={out / 'heldout.jsonl'}",
        "data.eval_size=4", "trainer.max_steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4",
        "rollout.max_new_tokens=24", "trainer.eval_at_start=false", f"trainer.output_dir={tmp_path / 'run'}"])
    train_run(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert (tmp_path / "run" / "checkpoint-final" / "tokenizer.json").is_file()

    # `reasonrl experiment --sampled 2` on this run: the start and the final policy answer every held-out problem
    # twice through `reasonrl eval`, at the training temperature and budget, with step counts on each sample.
    from launch.experiment_sampled import RUN_DIR, START_DIR, run_sampled_evals, sampled_report
    from launch.experiment_steps import problem_rows

    run_sampled_evals([("testbed2_fgo_std", 0, cfg)], tmp_path, 2)
    path = tmp_path / "run" / RUN_DIR / "samples" / "heldout.jsonl"
    samples = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(samples) == 8 and {r["sample"] for r in samples} == {0, 1}
    assert all("redundant_steps" in r and r["tokens"] <= 24 for r in samples)
    assert (tmp_path / START_DIR / "samples" / "heldout.jsonl").is_file()
    settings = json.loads((tmp_path / "run" / RUN_DIR / "eval_config.json").read_text())
    assert settings["temperature"] == cfg.rollout.temperature and settings["max_new_tokens"] == 24
    assert settings["system_prompt"] == cfg.data.system_prompt
    rep = sampled_report([("testbed2_fgo_std", cfg)], tmp_path, problem_rows(cfg))
    assert rep["k"] == 2 and rep["runs"][0]["avg_at_k"] == pytest.approx(np.mean([r["correct"] for r in samples]))


def _solution(a, op, b, kinds):
    """A 3-digit sum's solution holding the redundant kinds named (restate, other_route, estimate, final_check)."""
    lines = [redundant_line("restate", a, op, b)] if "restate" in kinds else []
    lines += [line for line, _, _ in necessary_steps(a, op, b)]
    lines += [redundant_line(k, a, op, b) for k in END_KINDS if k in kinds]
    return "\n".join(lines + [f"The answer is \\boxed{{{a + b}}}."])


def test_the_experiment_report_counts_steps_per_response_against_start_and_reference(tmp_path):
    """Hand-made run folders: the start writes 3 redundant steps everywhere, the reference (GRPO) too, the other
    method drops the final check on half the problems at seed 0 and on every problem at seed 1."""
    import yaml

    from launch.experiment import load_configs
    from launch.experiment_steps import markdown_steps, steps_report

    data = tmp_path / "tb"
    generate(data, None, seed=3, sft=10, train=4, heldout=6, difficulty=0, min_redundant=0, max_redundant=7,
             probs=KIND_PROBS_V2, independent=True, reasoner={"width": 32, "layers": 1})
    rows = [json.loads(x) for x in (data / "heldout.jsonl").read_text().splitlines()]
    modal = ("restate", "other_route", "final_check")

    def write(run: Path, step: int, dropped: set[int]):
        (run / "heldout").mkdir(parents=True, exist_ok=True)
        recs = []
        for i, r in enumerate(rows):
            tb = r["testbed"]
            kinds = [k for k in modal if not (k == "final_check" and i in dropped)]
            recs.append({"id": r["id"], "completion": _solution(tb["a"], tb["op"], tb["b"], kinds), "tokens": 100,
                         "correct": 1.0})
        (run / "heldout" / f"step-{step:06d}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))

    configs = []
    for name in ("testbed2_grpo", "testbed2_fgo_std"):
        cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        cfg["data"]["eval"] = str(data / "heldout.jsonl")
        cfg["trainer"]["max_steps"] = 5
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        configs.append(str(tmp_path / f"{name}.yaml"))
    runs = []
    for seed, dropped in ((0, {0, 1, 2}), (1, set(range(6)))):
        cfgs = load_configs(configs, tmp_path / "out", [f"trainer.seed={seed}"], suffix=f"-s{seed}")
        grpo, fgo = Path(cfgs["testbed2_grpo"].trainer.output_dir), Path(cfgs["testbed2_fgo_std"].trainer.output_dir)
        write(grpo, 0, set())
        write(grpo, 5, set())
        write(fgo, 5, dropped)
        runs += list(cfgs.items())
    report = steps_report(runs)
    by = {(r["method"], r["seed"]): r for r in report["runs"]}
    assert by[("testbed2_grpo", 0)]["redundant_mean"] == 3.0 and by[("testbed2_grpo", 0)]["vs_start"]["mean"] == 0
    fgo0, fgo1 = by[("testbed2_fgo_std", 0)], by[("testbed2_fgo_std", 1)]
    assert fgo0["redundant_mean"] == 2.5 and fgo0["distribution"] == {"0": 0, "1": 0, "2": 3, "3": 3}
    assert (fgo0["vs_start"]["fewer"], fgo0["vs_start"]["same"], fgo0["vs_start"]["more"]) == (3, 3, 0)
    assert fgo0["vs_ref"]["mean"] == -0.5 and fgo1["vs_ref"]["mean"] == -1.0
    assert fgo0["necessary_kept_correct"] == fgo0["necessary_written_correct"] == 1.0
    pooled = {p["method"]: p for p in report["pooled"]}["testbed2_fgo_std"]
    assert pooled["redundant_mean"] == pytest.approx(2.25)
    assert pooled["between_seed_std"] == pytest.approx(np.std([2.5, 2.0], ddof=1))
    assert pooled["vs_ref"]["mean"] == pytest.approx(-0.75) and pooled["vs_ref"]["ci"][1] < 0
    table = markdown_steps(report)
    assert "| testbed2_fgo_std | 0 | 3.00 → **2.50** |" in table and "Pooled over seeds" in table

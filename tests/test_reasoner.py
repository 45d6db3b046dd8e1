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

"""SFT cold start (`algorithm.name: sft`): the loss against hand-computed values, the token ids and loss masks a real
tokenizer gives, bad rows, micro-batch / rank invariance, and (slow) the run end to end: SFT -> GRPO from its
checkpoint, and an SFT resume that continues the data order."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rl.algo.core import sft_loss
from rl.config.schema import ConfigError, load_config
from rl.contracts import SftExample
from rl.data.loading import DataError, PromptSampler, render_prompt
from rl.data.sft import encode_conversation, encode_prompt_completion, load_examples
from rl.learner.updates import plan_sft, reduce_sft, sft_update

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "Solve the problem. Put the final answer in \\boxed{}."


@pytest.fixture(scope="module")
def tok():
    from rl.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("tiny:llama"))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sums(n: int, start: int = 0, answer: bool = False) -> list[dict]:
    rows = [{"prompt": f"What is {i} + {i + 1}?", "completion": f"{i} + {i + 1} = {2 * i + 1}. "
             f"The answer is \\boxed{{{2 * i + 1}}}."} for i in range(start, start + n)]
    for r in rows if answer else []:
        r["answer"] = r["completion"].split("{")[-1].rstrip("}.")
    return rows


# --------------------------------------------------------------------------------------------------- the loss
def test_sft_loss_is_summed_nll_over_the_batch_global_token_count():
    logprobs = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # -inf on a padded position must not leak in
    loss, stats = sft_loss(logprobs, mask, num_tokens=4)
    assert loss.item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert stats["nll_sum"].item() == pytest.approx(10.0) and stats["tokens"].item() == 4
    loss.backward()
    assert torch.equal(logprobs.grad, -mask / 4)  # d loss / d logprob = -1 / N on trained tokens, 0 elsewhere
    # A micro-batch of a larger batch divides by the whole batch's count, so the parts add up to the batch mean.
    assert sft_loss(logprobs.detach(), mask, num_tokens=8)[0].item() == pytest.approx(10 / 8)
    half = sft_loss(logprobs.detach(), mask * 0.5, num_tokens=4)[0]  # a weighted (or stand-in 0) example
    assert half.item() == pytest.approx(10 / 8) and sft_loss(logprobs.detach(), mask * 0, 4)[0].item() == 0


# ----------------------------------------------------------------------------------------- encoding and masks
def test_prompt_completion_renders_the_rl_prompt_and_ends_with_end_of_turn(tok):
    ex = encode_prompt_completion(tok, "What is 2 + 2?", "It is 4.", SYSTEM, suffix=" Be brief.")
    rl_prompt = render_prompt(tok, "What is 2 + 2?", SYSTEM, " Be brief.")  # what a rollout worker is given
    assert ex.prompt_ids == tok(rl_prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ex.completion_ids) == "It is 4.<|im_end|>"
    assert ex.completion_ids[-1] == tok.eos_token_id  # where a sampled response stops
    assert ex.loss_mask == [1] * len(ex.completion_ids)  # prompt tokens are not in the completion: no loss there
    # Chat message lists: a prompt without a system turn gets data.system_prompt, one with its own keeps it.
    listed = encode_prompt_completion(tok, [{"role": "user", "content": "What is 2 + 2?"}],
                                      [{"role": "assistant", "content": "It is 4."}], SYSTEM)
    assert listed.prompt_ids == tok(render_prompt(tok, "What is 2 + 2?", SYSTEM), add_special_tokens=False)[
        "input_ids"] and listed.completion_ids == ex.completion_ids
    own = encode_prompt_completion(tok, [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Q"}],
                                   "A", SYSTEM)
    assert tok.decode(own.prompt_ids).startswith("<|im_start|>system\nMine.<|im_end|>") and SYSTEM not in \
        tok.decode(own.prompt_ids)


def test_conversation_trains_only_assistant_turns(tok):
    msgs = [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    ex = encode_conversation(tok, msgs, SYSTEM)
    trained = [t for t, m in zip(ex.completion_ids, ex.loss_mask) if m]
    context = [t for t, m in zip(ex.completion_ids, ex.loss_mask) if not m]
    assert tok.decode(trained) == "yo<|im_end|>a2<|im_end|>"  # both answers, each with its end-of-turn token
    assert tok.decode(context) == "\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
    # The prompt is the conversation up to the first answered turn's assistant header (the greeting before any
    # user turn is context); prompt + completion is exactly the chat template's text without its final newline.
    full = tok.apply_chat_template([{"role": "system", "content": SYSTEM}] + msgs, tokenize=False)
    assert tok.decode(ex.prompt_ids).endswith("Welcome!<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                              "<|im_start|>assistant\n")
    assert tok.decode(ex.prompt_ids + ex.completion_ids) == full.rstrip("\n")
    assert encode_conversation(tok, [{"role": "user", "content": "no answer"}], SYSTEM) is None


def test_bad_rows_are_skipped_and_counted(tmp_path, tok):
    rows = _sums(3) + [
        {"prompt": "no completion"}, {"prompt": None, "completion": "x"}, {"prompt": "", "completion": "x"},
        {"prompt": "n", "completion": {"not": "a message"}}, {"prompt": [{"role": "user"}], "completion": "x"},
        {"prompt": "long " * 100, "completion": "x"}, {"id": "mine", "prompt": "n", "completion": 42},
    ]
    examples, stats = load_examples(_jsonl(tmp_path / "pc.jsonl", rows), "train", tok, SYSTEM,
                                    max_prompt_tokens=64)
    assert stats["read"] == 10 and stats["examples"] == len(examples) == 4 == stats["prompt_completion"]
    assert (stats["skipped_no_completion"], stats["skipped_no_prompt"], stats["skipped_bad_format"],
            stats["skipped_too_long"]) == (1, 2, 2, 1)
    assert [e.id for e in examples] == ["train-0", "train-1", "train-2", "mine"]  # the number 42 was the text "42"
    assert stats["completion_tokens"] == sum(e.num_tokens for e in examples)

    convo = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
             {"messages": [{"role": "user", "content": "unanswered"}]}, {"messages": []}]
    examples, stats = load_examples(_jsonl(tmp_path / "c.jsonl", convo), "train", tok, SYSTEM)
    assert (stats["conversational"], stats["skipped_bad_format"], stats["skipped_no_messages"]) == (1, 1, 1)
    mixed = [{"prompt": "a", "completion": "x"}, {"prompt": "b", "completion": "a completion of many more tokens"}]
    _, stats = load_examples(_jsonl(tmp_path / "mixed.jsonl", mixed), "train", tok, max_completion_tokens=5)
    assert (stats["examples"], stats["skipped_too_long"]) == (1, 1)  # "x" + end-of-turn: 2 tokens
    # A file with no usable row is an error naming the file.
    with pytest.raises(DataError, match="long.jsonl.*no usable rows"):
        load_examples(_jsonl(tmp_path / "long.jsonl", _sums(2)), "train", tok, SYSTEM, max_completion_tokens=3)
    with pytest.raises(DataError, match="wrong.jsonl.*neither a 'messages' column"):
        load_examples(_jsonl(tmp_path / "wrong.jsonl", [{"problem": "1 + 1", "answer": "2"}]), "train", tok)


# ------------------------------------------------------------------------------------------------- config
def test_sft_config_is_not_held_to_rollout_rules_and_errors_name_the_key(tmp_path, tok):
    from rl.steps import make_step
    from rl.steps.sft import SftStep

    # 8 ranks > the 2 x 4 sequences a rollout step of the tiny config has: rejected for GRPO, fine for SFT
    # (a rank without examples runs a zero-weight stand-in).
    with pytest.raises(ConfigError, match="'learner.num_ranks'"):
        load_config(ROOT / "configs/tiny.yaml", ["learner.num_ranks=16"])
    cfg = load_config(ROOT / "configs/tiny.yaml", ["algorithm.name=sft", "learner.num_ranks=16",
                                                   "algorithm.mini_batches=3", f"data.train={tmp_path}/t.jsonl"])
    assert isinstance(make_step(cfg), SftStep) and cfg.algorithm.sft.examples_per_step == 16
    with pytest.raises(ConfigError, match="'algorithm.sft.examples_per_step'"):
        load_config(ROOT / "configs/tiny.yaml", ["algorithm.name=sft", "algorithm.sft.examples_per_step=0"])
    with pytest.raises(ConfigError, match="'algorithm.sft.eval_evry'.*eval_every"):
        load_config(ROOT / "configs/tiny.yaml", ["algorithm.name=sft", "algorithm.sft.eval_evry=1"])
    with pytest.raises(ConfigError, match="'data.train'.*does not exist"):
        make_step(cfg).check(tok)
    with pytest.raises(ConfigError, match="'data.train'.*arith"):
        make_step(load_config(ROOT / "configs/tiny.yaml", ["algorithm.name=sft"])).check(tok)


def test_held_out_task_accuracy_only_when_the_eval_file_has_problem_and_answer(tmp_path, tok):
    from rl.steps.sft import SftStep

    train = _jsonl(tmp_path / "train.jsonl", _sums(4))
    plain = _jsonl(tmp_path / "plain.jsonl", _sums(3, 10))
    graded = _jsonl(tmp_path / "graded.jsonl", _sums(3, 10, answer=True))
    step = SftStep(load_config(ROOT / "configs/tiny.yaml", ["algorithm.name=sft", f"data.train={train}",
                                                            f"data.eval={plain}"]))
    step.check(tok)
    assert len(step.held_out_examples) == 3 and step.held_out(tok) == []  # held-out loss only
    step = SftStep(load_config(ROOT / "configs/tiny.yaml", ["algorithm.name=sft", f"data.train={train}",
                                                            f"data.eval={graded}", "data.problem_key=prompt"]))
    step.check(tok)
    rows = step.held_out(tok)
    assert [r["answer"] for r in rows] == ["21", "23", "25"] and len(step.held_out_examples) == 3  # both
    assert rows[0]["prompt"] == render_prompt(tok, "What is 10 + 11?", SYSTEM)  # the prompt SFT trained on
    # The RL run's own held-out file (problem, answer): task accuracy, no held-out loss.
    task = _jsonl(tmp_path / "task.jsonl", [{"problem": "What is 1 + 2?", "answer": "3"}])
    step = SftStep(load_config(ROOT / "configs/tiny.yaml", ["algorithm.name=sft", f"data.train={train}",
                                                            f"data.eval={task}"]))
    step.check(tok)
    assert step.held_out_examples == [] and [r["answer"] for r in step.held_out(tok)] == ["3"]
    step = SftStep(load_config(ROOT / "configs/tiny.yaml", ["algorithm.name=sft", f"data.train={train}",
                                                            "data.eval=arith"]))
    step.check(tok)  # the tiny config's held-out arith problems, as RL evaluates them
    assert step.held_out_examples == [] and len(step.held_out(tok)) == 4
    neither = _jsonl(tmp_path / "neither.jsonl", [{"question": "What is 1 + 2?"}])
    step = SftStep(load_config(ROOT / "configs/tiny.yaml", ["algorithm.name=sft", f"data.train={train}",
                                                            f"data.eval={neither}"]))
    with pytest.raises(DataError, match="neither.jsonl.*neither SFT columns"):
        step.check(tok)


# ------------------------------------------------------------------------------------ micro-batch invariance
class _PlainEngine:
    """What sft_update needs of rl.learner.engine.Engine, on a plain torch model. Shards run one after another on the
    same model sum their gradients, which is what DeepSpeed's rank average times world_size (Engine.backward)
    gives, so several 'ranks' can be simulated in one process."""

    def __init__(self, model, packing=False):
        self.policy, self.pad_id, self.device = model, 0, torch.device("cpu")
        self.cfg, self.lr, self.passes = SimpleNamespace(packing=packing), 0.0, 0

    def boundary(self, last):
        pass

    def backward(self, loss):
        self.passes += 1
        loss.backward()

    def step(self):
        return 0.0


def _examples(n: int, seed: int = 0) -> list[SftExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, c = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        mask = [int(x) for x in torch.randint(0, 2, (c,), generator=g)]
        mask[-1] = 1
        out.append(SftExample(torch.randint(1, 60, (p,), generator=g).tolist(),
                              torch.randint(1, 60, (c,), generator=g).tolist(), mask, id=str(i)))
    return out


def _run(model, examples, ranks: int, micro: int, packing=False) -> tuple[float, torch.Tensor, list[int]]:
    model.zero_grad()
    shards, plan = plan_sft(examples, ranks, micro)
    stats, passes = [], []
    for shard in shards:
        engine = _PlainEngine(model, packing)
        stats.append(sft_update(engine, shard, plan))
        passes.append(engine.passes)
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return reduce_sft(stats)["loss"], grad, passes


def test_loss_and_gradient_do_not_depend_on_micro_batches_or_ranks():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    examples = _examples(5)
    # The reference: the token mean of -log p over every trained token, one sequence at a time, no padding.
    nll, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.prompt_ids + e.completion_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(e.prompt_ids) - 1:-1].float(), -1)
            picked = logp.gather(-1, torch.tensor(e.completion_ids)[:, None])[:, 0]
            nll -= float((picked * torch.tensor(e.loss_mask, dtype=torch.float32)).sum())
            count += e.num_tokens
    loss, grad, passes = _run(model, examples, ranks=1, micro=8)
    assert loss == pytest.approx(nll / count, rel=1e-5) and passes == [1]
    for ranks, micro, packing in [(1, 1, False), (1, 2, True), (2, 1, False), (3, 2, False), (7, 1, False)]:
        other_loss, other_grad, passes = _run(model, examples, ranks, micro, packing)
        assert other_loss == pytest.approx(loss, rel=1e-5), (ranks, micro, packing)
        assert torch.allclose(other_grad, grad, rtol=1e-4, atol=1e-7), (ranks, micro, packing)
        assert len(set(passes)) == 1  # every rank the same number of passes (7 ranks: 2 of them stand-ins)
    shards, plan = plan_sft(examples, 7, 1)
    assert [s[0].stand_in for s in shards] == [False] * 5 + [True] * 2 and shards[5][0].weight == 0
    assert plan.num_tokens == sum(e.num_tokens for e in examples) and plan.num_micro == 1


# ---------------------------------------------------------------------------------------- end to end (slow)
RECORDER = '''
import json


def record(prompts, completions, out, **kwargs):
    """Appends every scored batch to `out`: what the policy generated, for comparing runs."""
    with open(out, "a") as fh:
        fh.write(json.dumps({"prompts": prompts, "completions": completions}) + "\\n")
    return [0.0] * len(completions)
'''


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


def _rows(path: Path, event: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows if event is None else [r for r in rows if r.get("event") == event]


def _recorded(tmp_path: Path, name: str) -> str:
    (tmp_path / "recorder.py").write_text(RECORDER)
    return (f"reward.functions=[{{fn: math_verify}}, {{fn: '{tmp_path / 'recorder.py'}:record', weight: 0.0, "
            f"kwargs: {{out: '{tmp_path / name}'}}}}]")


@pytest.mark.slow
def test_update_does_not_depend_on_ranks_or_micro_batches(tmp_path, tok, ray_session):
    """The same examples through (1 rank, micro 8, ZeRO-2) and (2 ranks, micro 1, ZeRO-3, one rank running a
    stand-in pass): same held-out loss, same training loss and global gradient norm."""
    from rl.cluster.session import init_ray, shutdown
    from rl.learner.group import LearnerGroup
    from rl.models import resolve_model
    from rl.learner.updates import reduce_sft_loss

    examples = [encode_prompt_completion(tok, r["prompt"], r["completion"], SYSTEM) for r in _sums(4)]
    examples.append(encode_conversation(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content":
                                              "yo"}, {"role": "user", "content": "2?"}, {"role": "assistant",
                                              "content": "two"}], SYSTEM))
    path, results = resolve_model("tiny:llama"), []
    for ranks, micro, stage in [(1, 8, 2), (2, 1, 3)]:
        cfg = load_config(ROOT / "configs/tiny.yaml", ["algorithm.name=sft", f"learner.num_ranks={ranks}",
                                                       f"learner.micro_batch_size={micro}",
                                                       f"learner.zero_stage={stage}"])
        init_ray(cfg)
        learner = LearnerGroup(cfg, path)
        try:
            held_out = learner.query("sft_loss", examples, plan_sft, reduce_sft_loss)
            results.append((held_out, learner.update("sft", examples, plan_sft, reduce_sft)))
        finally:
            shutdown(learner)
    (eval_a, a), (eval_b, b) = results
    assert eval_a["eval_loss"] == pytest.approx(eval_b["eval_loss"], rel=1e-5)
    # At the random start every trained token costs about log(vocabulary): the loss is the token mean.
    assert eval_a["eval_loss"] == pytest.approx(a["loss"], rel=1e-5) and abs(a["loss"] - math.log(49152)) < 1
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"] == \
        sum(e.num_tokens for e in examples) and a["examples"] == b["examples"] == 5
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4) and a["grad_norm"] > 0


@pytest.mark.slow
def test_sft_then_grpo_from_its_checkpoint(tmp_path, ray_session):
    """Answer-only SFT on arith-style rows (the tiny smoke config with a JSONL file), then GRPO whose model.path is
    the SFT checkpoint: the RL run's start eval generates exactly what the SFT run's end eval generated (the same
    held-out prompts), which is not what the start model generated."""
    from rl.data.loading import generate_arith

    problems = generate_arith(**load_config(ROOT / "configs/tiny.yaml").data.arith.model_dump())  # its held-out
    train = [{"prompt": r["problem"], "completion": r["answer"]} for r in problems["train"][:12]]
    train += [{"prompt": "no completion"}, {"completion": "no prompt"}]  # skipped and counted
    held_out = [{"prompt": r["problem"], "completion": r["answer"], "answer": r["answer"]}
                for r in problems["test"][:4]]  # prompt/answer also give the held-out task accuracy
    sft = tmp_path / "sft"
    summary = train_sft(load_config(ROOT / "configs/tiny.yaml", [
        f"trainer.output_dir={sft}", "algorithm.name=sft", f"data.train={_jsonl(tmp_path / 'train.jsonl', train)}",
        f"data.eval={_jsonl(tmp_path / 'eval.jsonl', held_out)}", "data.problem_key=prompt",
        "algorithm.sft.examples_per_step=4", "learner.lr=1e-2", _recorded(tmp_path, "sft_gen.jsonl"),
        "logging.progress=false"]))
    assert summary["data"]["examples"] == 12 and summary["data"]["skipped_no_completion"] == 1
    assert summary["data"]["skipped_no_prompt"] == 1 and summary["eval_data"]["examples"] == 4
    metrics = _rows(sft / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and [m["epoch"] for m in metrics] == pytest.approx([1 / 3, 2 / 3])
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["loss"] > 0 and m["grad_norm"] > 0 and m["tokens"] > 0
        assert m["lr"] == pytest.approx(1e-2) and m["time_train"] > 0
    assert summary["eval_loss_end"] < summary["eval_loss_start"] and metrics[-1]["eval_loss"] == \
        summary["eval_loss_end"]
    assert "eval_start" in summary and "eval_end" in summary  # the held-out task accuracy ran too
    assert (sft / "curve_loss.png").is_file() and (sft / "checkpoint-final").exists()

    rl = tmp_path / "grpo"
    start = str(sft / "checkpoint-final")
    train_sft(load_config(ROOT / "configs/tiny.yaml", [
        f"trainer.output_dir={rl}", f"model.path={start}", _recorded(tmp_path, "rl_gen.jsonl"),
        "trainer.save_every=0", "logging.progress=false"]))
    assert load_config(rl / "config.yaml").model.path == start
    assert [m["step"] for m in _rows(rl / "metrics.jsonl")] == [1, 2]
    sft_start, sft_end = _rows(tmp_path / "sft_gen.jsonl")  # the SFT run's start and end task evals
    rl_start = _rows(tmp_path / "rl_gen.jsonl")[0]
    assert rl_start["prompts"] == sft_end["prompts"] == sft_start["prompts"]  # the RL prompt SFT trained on
    assert rl_start["completions"] == sft_end["completions"] != sft_start["completions"]
    # The responses behind each held-out score are kept beside the run, scored as in the eval event.
    kept = _rows(rl / "heldout" / "step-000000.jsonl")
    assert [r["completion"] for r in kept] == rl_start["completions"]
    start_eval = next(e for e in _rows(rl / "events.jsonl") if e["event"] == "eval" and e["step"] == 0)
    assert [r["correct"] for r in kept] == start_eval["correct"] and [r["tokens"] for r in kept] == start_eval["tokens"]
    assert (rl / "heldout" / "step-000002.jsonl").is_file()


@pytest.mark.slow
def test_resume_continues_the_example_order(tmp_path, ray_session):
    """1 step (3 examples in 2 micro-batches), then resumed to 3: the examples of every step are the sampler's
    seeded order, across the epoch boundary, with none replayed or skipped, and the resumed steps train from the
    saved weights and optimizer state: their losses and gradient norms are those of the same 3 steps run in one go.
    (Ranks and stand-ins: above.)"""
    rows = [{"id": f"row{i}", **r} for i, r in enumerate(_sums(5))]
    data = _jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    # lr 1e-2: one step moves the tiny model enough that a resume from the wrong weights shows in the next loss.
    common = [f"trainer.output_dir={out}", "algorithm.name=sft", f"data.train={data}", "data.eval_size=0",
              "algorithm.sft.examples_per_step=3", "learner.micro_batch_size=2", "learner.lr=1e-2",
              "logging.progress=false"]
    full = tmp_path / "full"
    train_sft(load_config(ROOT / "configs/tiny.yaml", [*common, "trainer.max_steps=3", f"trainer.output_dir={full}",
                                                       "trainer.save_every=0"]))
    train_sft(load_config(ROOT / "configs/tiny.yaml", [*common, "trainer.max_steps=1"]))
    resumed = train_sft(load_config(out / "config.yaml", [f"trainer.output_dir={out}", "trainer.max_steps=3"]),
                        resume=True)
    assert resumed["start_step"] == 1 and "eval_loss_start" not in resumed
    sampler = PromptSampler([r["id"] for r in rows], seed=0, shuffle=True)
    expected = [sampler.next_batch(3) for _ in range(3)]
    assert [e["ids"] for e in _rows(out / "events.jsonl", "examples")] == expected
    metrics = _rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and [m["epoch"] for m in metrics] == pytest.approx([0.6, 1.2, 1.8])
    assert all(m["examples"] == 3 and math.isfinite(m["loss"]) for m in metrics)
    reference = _rows(full / "metrics.jsonl")
    assert [m["step"] for m in reference] == [1, 2, 3]
    for key in ("loss", "grad_norm", "tokens"):
        assert [m[key] for m in metrics] == pytest.approx([m[key] for m in reference], rel=1e-4, abs=1e-6), key
    state = json.loads((out / "checkpoints/step-000003/trainer_state.json").read_text())
    assert state["sampler"] == {"epoch": 1, "position": 4, "num_rows": 5}


def train_sft(cfg, resume=False):
    from rl.trainer import train

    return train(cfg, resume=resume)

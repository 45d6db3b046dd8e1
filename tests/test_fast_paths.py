"""Every fast path computes what the plain path computes: packed vs padded training, log-probs from the generation
scores vs a forward pass (continuous batching backend), off-policy correction at staleness 0 vs on-policy."""
import pytest
import torch

from rl.algo.core import policy_loss
from rl.learner.batch import pack_pairs, pad_pairs, response_logprobs
from rl.models import load_policy, load_tokenizer, resolve_model

# Different prompt and response lengths (and one empty response) so padding and packing boundaries matter.
PROMPTS = [[1, 5, 9, 200, 17], [3, 44], [7, 8, 9, 10, 11, 12, 13], [300, 301, 302]]
RESPONSES = [[20, 21, 22], [30, 31, 32, 33, 34, 35], [40], []]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_policy(resolve_model("tiny:llama")).eval()


def _loss(logprobs, batch, advantages):
    mask = batch["response_mask"]
    return policy_loss(logprobs, logprobs.detach(), advantages, mask, num_tokens=float(mask.sum()),
                       num_seqs=len(advantages))[0]


def test_packed_logprobs_equal_padded_and_each_sequence_alone(model):
    pad_id = load_tokenizer(resolve_model("tiny:llama")).pad_token_id
    with torch.no_grad():
        padded = response_logprobs(model, pad_pairs(PROMPTS, RESPONSES, pad_id), temperature=0.7)
        packed = response_logprobs(model, pack_pairs(PROMPTS, RESPONSES), temperature=0.7)
        alone = [response_logprobs(model, pad_pairs([p], [r], pad_id), temperature=0.7)[0]
                 for p, r in zip(PROMPTS, RESPONSES)]
    assert packed.shape == padded.shape == (4, 6)
    mask = pad_pairs(PROMPTS, RESPONSES, pad_id)["response_mask"].bool()
    assert torch.allclose(packed[mask], padded[mask], atol=1e-5)
    for i, r in enumerate(RESPONSES):  # no token attends across a packed boundary
        assert torch.allclose(packed[i, :len(r)], alone[i][:len(r)], atol=1e-5)
        assert (packed[i, len(r):] == 0).all()
    assert packed[0, 0] != packed[1, 0]


def test_packed_loss_and_gradient_equal_padded(model):
    pad_id = load_tokenizer(resolve_model("tiny:llama")).pad_token_id
    advantages = torch.tensor([1.0, -0.5, 2.0, 0.3])
    grads = []
    for batch in (pad_pairs(PROMPTS, RESPONSES, pad_id), pack_pairs(PROMPTS, RESPONSES)):
        model.zero_grad()
        loss = _loss(response_logprobs(model, batch), batch, advantages)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        grads.append((float(loss.detach()), grad))
    (loss_pad, g_pad), (loss_pack, g_pack) = grads
    assert abs(loss_pad - loss_pack) < 1e-6
    assert torch.linalg.vector_norm(g_pad) > 0
    assert torch.allclose(g_pad, g_pack, atol=1e-6, rtol=1e-4)


def test_pack_pairs_layout():
    b = pack_pairs([[1, 2], [3]], [[4, 5], [6]])
    assert b["input_ids"].tolist() == [[1, 2, 4, 5, 3, 6]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1]]
    # logits at position 1 predict token 4, 2 -> 5, and 4 (token 3) -> 6
    assert b["logits_index"].tolist() == [1, 2, 4]
    assert b["rows"].tolist() == [0, 0, 1] and b["cols"].tolist() == [0, 1, 0]
    assert b["response_mask"].tolist() == [[1, 1], [1, 0]]


def test_off_policy_correction_reduces_to_on_policy_at_staleness_zero():
    """Staleness 0: the behaviour log-probs the rollout measured equal the learner's up to float error, so the
    importance ratio is 1 and loss and gradient are the on-policy ones. A stale batch moves the ratio off 1."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    adv = torch.tensor([1.0, -2.0, 0.5])
    behaviour = logits.detach().log_softmax(-1) + 1e-7 * torch.randn(3, 5)  # what the rollout reported

    def run(old_fn):
        logits.grad = None
        lp = logits.log_softmax(-1)
        loss, stats = policy_loss(lp, old_fn(lp), adv, mask, num_tokens=float(mask.sum()), num_seqs=3)
        loss.backward()
        return float(loss.detach()), logits.grad.clone(), stats

    on_loss, on_grad, _ = run(lambda lp: lp.detach())
    off_loss, off_grad, off_stats = run(lambda lp: behaviour)
    assert off_loss == pytest.approx(on_loss, abs=1e-6)
    assert torch.allclose(off_grad, on_grad, atol=1e-6) and on_grad.abs().sum() > 0
    assert float(off_stats["ratio_sum"]) == pytest.approx(float(mask.sum()), rel=1e-5)
    stale = behaviour - 0.3 * torch.randn(3, 5)  # a step-old policy: ratios differ from 1, the loss weights them
    stale_loss, _, stale_stats = run(lambda lp: stale)
    assert stale_loss != pytest.approx(on_loss, abs=1e-4)
    assert float(stale_stats["ratio_sum"]) != pytest.approx(float(mask.sum()), rel=1e-3)


def test_continuous_batching_backend_logprobs_match_a_forward_pass():
    from rl.rollout.worker import RolloutWorker, SamplingParams

    worker = RolloutWorker(resolve_model("tiny:llama"), num_threads=1, backend="continuous")
    prompts = ["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n", "Count: one, two,"]
    out = worker.generate(prompts, SamplingParams(n=3, max_new_tokens=8, temperature=0.7, batch_size=4), seed=0)
    assert len(out.response_ids) == 6
    assert out.prompt_ids[0] == out.prompt_ids[2] != out.prompt_ids[3]  # groups contiguous, in order
    assert all(len(r) == 8 and f == "length" for r, f in zip(out.response_ids, out.finish_reason))
    with torch.no_grad():
        ref = response_logprobs(worker.model, pad_pairs(out.prompt_ids, out.response_ids,
                                                        worker.tokenizer.pad_token_id), temperature=0.7)
    for i, lp in enumerate(out.logprobs):
        assert torch.allclose(torch.tensor(lp), ref[i, :len(lp)], atol=1e-4)
    assert len({tuple(r) for r in out.response_ids}) > 1  # really sampled


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.name=dpo", "trainer.max_staleness=1", "algorithm.todo.online=true"], "trainer.max_staleness"),
    (["rollout.backend=vllm"], "rollout.backend"),
    (["rollout.backend=continuous", "algorithm.name=fgo", "algorithm.fgo.entropy=mean_token_entropy"],
     "algorithm.fgo.entropy"),
    (["trainer.max_staleness=2"], "trainer.max_staleness"),
])
def test_fast_path_config_errors_name_the_key(overrides, key):
    from rl.config.schema import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.slow
def test_one_step_off_policy_run_with_packing_and_continuous_batching(tmp_path):
    """Every fast path at once through `train`: the rollout of step k+1 is generated during step k, so steps 2..3
    train on a one-step-stale batch; the prompts and the checkpointed data order are those of a synchronous run."""
    import json
    from pathlib import Path

    import ray

    from rl.config.schema import load_config
    from rl.trainer import train

    root = Path(__file__).resolve().parent.parent
    length_reward = f"{root / 'tests/fixtures/rewards.py'}:char_length"  # varies within groups: real gradients

    def run(out, *extra):
        cfg = load_config(root / "configs/tiny.yaml", [f"trainer.output_dir={out}", "trainer.max_steps=3",
                                                      "trainer.save_every=2", "trainer.eval_at_start=false",
                                                      "logging.progress=false", "logging.plots=false",
                                                      "logging.tensorboard=false", f"reward.accuracy={length_reward}",
                                                      f"reward.functions=[{{fn: '{length_reward}', weight: 1.0}}]",
                                                      *extra])
        train(cfg)
        events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        state = json.loads((out / "checkpoints/step-000002/trainer_state.json").read_text())
        return [e["ids"] for e in events if e["event"] == "prompts"], metrics, state["sampler"]

    try:
        fast_ids, fast, fast_sampler = run(tmp_path / "fast", "trainer.max_staleness=1", "learner.packing=true",
                                           "rollout.backend=continuous")
        sync_ids, sync, sync_sampler = run(tmp_path / "sync")
    finally:
        ray.shutdown()
    assert [m["staleness"] for m in fast] == [0, 1, 1] and [m["staleness"] for m in sync] == [0, 0, 0]
    assert fast_ids == sync_ids and fast_sampler == sync_sampler  # no prompt skipped, replayed or pre-counted
    assert all(m["grad_norm"] > 0 for m in fast)
    # On-policy the learner's old log-probs are its own (detached): the importance ratio is exactly 1. A stale batch
    # is weighed by the ratio to the log-probs it was sampled with, which an update has moved: never exactly 1
    # (a learner ignoring staleness would report exactly 1 there too).
    assert [m["ratio_mean"] == 1.0 for m in fast] == [True, False, False], [m["ratio_mean"] for m in fast]
    assert all(m["ratio_mean"] == 1.0 for m in sync)
    assert all(0.5 < m["ratio_mean"] < 2.0 for m in fast)  # off by the one update, not by garbage
    assert all(m["entropy"] == 0 for m in fast)  # continuous batching measures no entropies, and says so


def test_shared_prefix_logprobs_and_gradient_equal_padded(model):
    """Groups of samples of one prompt (in shuffled order): each distinct prompt runs once, same numbers."""
    from rl.learner.batch import prefix_pairs

    pad_id = load_tokenizer(resolve_model("tiny:llama")).pad_token_id
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    responses = [[20, 21, 22], [30, 31, 32, 33], [40], [50, 51], [], [60, 61, 62, 63, 64]]
    advantages = torch.tensor([1.0, -0.5, 2.0, 0.3, 0.7, -1.2])
    shared = prefix_pairs(prompts, responses, pad_id)
    assert shared["prompt_input_ids"].shape[0] == 3 and shared["prompt_index"].tolist() == [0, 1, 0, 2, 1, 0]
    results = []
    for batch in (pad_pairs(prompts, responses, pad_id), shared):
        model.zero_grad()
        lp = response_logprobs(model, batch, temperature=0.7)
        loss = _loss(lp, batch, advantages)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((lp.detach(), float(loss.detach()), grad))
    (lp_pad, loss_pad, g_pad), (lp_shared, loss_shared, g_shared) = results
    mask = shared["response_mask"].bool()
    assert torch.allclose(lp_pad[mask], lp_shared[mask], atol=1e-5)
    assert abs(loss_pad - loss_shared) < 1e-6 and torch.linalg.vector_norm(g_pad) > 0
    # Same gradient up to float32 summation order (the group's prompt gradients are summed in another order).
    assert float(torch.linalg.vector_norm(g_pad - g_shared) / torch.linalg.vector_norm(g_pad)) < 1e-5

"""Rollout and learner describe the same distribution: the learner's top-k / top-p mask equals transformers' warpers,
rollout and learner log-probs agree at top_p < 1 (transformers and continuous backends), the training-inference
mismatch monitor reads ~0 on the transformers backend and an injected offset exactly, and the truncated importance
correction caps what it should."""
import math

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from rl.algo.core import (entropy_from_logits, logprob_mismatch, policy_loss, tis_weights, token_logprobs,
                           truncate_logits)
from rl.learner.batch import pad_pairs, response_logprobs
from rl.config.schema import AlgorithmConfig, LearnerConfig
from rl.contracts import TrainSequence
from rl.models import load_policy, load_tokenizer, resolve_model
from rl.learner.updates import plan_policy, policy_update, reduce_policy

PROMPTS = ["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n", "Count: one, two,"]


def _warped(logits, temperature, top_k, top_p):
    scores = TemperatureLogitsWarper(temperature)(None, logits) if temperature != 1.0 else logits
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.8), (0.7, 0, 0.5), (1.0, 5, 1.0), (1.3, 20, 0.9),
                                                     (0.5, 1, 1.0), (1.0, 0, 0.999)])
def test_learner_mask_equals_transformers_warpers(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(64, 300) * 3
    logits[::7, :40] = 1.5  # ties at the cut: the same tokens must survive as with the warpers
    expected = _warped(logits, temperature, top_k, top_p)
    ours = truncate_logits(logits / temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    assert torch.allclose(ours[kept], expected[kept])
    # log-probs and entropies then come from the renormalised truncated distribution
    tokens = torch.distributions.Categorical(logits=expected).sample()
    lp = token_logprobs(logits.unsqueeze(0), tokens.unsqueeze(0), temperature, top_k, top_p)[0]
    ref = torch.log_softmax(expected, -1).gather(-1, tokens[:, None])[:, 0]
    assert torch.allclose(lp, ref, atol=1e-5)
    p = torch.softmax(expected, -1)
    ent = entropy_from_logits(logits.unsqueeze(0), temperature, top_k, top_p)[0]
    assert torch.allclose(ent, -(torch.where(p > 0, p * p.log(), 0.0)).sum(-1), atol=1e-4)
    assert torch.isfinite(ent).all()


def test_untruncated_path_is_unchanged_and_a_sampled_token_is_never_masked():
    logits = torch.randn(2, 3, 10)
    assert truncate_logits(logits, 0, 1.0) is logits
    z = torch.tensor([[5.0, 4.0, -3.0, -4.0]])
    assert torch.isinf(truncate_logits(z, 0, 0.5)).tolist() == [[False, True, True, True]]
    # weights moved since the rollout: token 3 is outside the learner's top-p set, but it was sampled
    kept = truncate_logits(z, 0, 0.5, keep=torch.tensor([3]))
    assert not torch.isinf(kept[0, 3]) and torch.isinf(kept[0, 1])
    lp = token_logprobs(z.unsqueeze(0), torch.tensor([[3]]), 1.0, 0, 0.5)
    assert torch.isfinite(lp).all()


def test_truncated_logprobs_carry_gradients_only_through_kept_tokens():
    logits = torch.randn(1, 4, 12, requires_grad=True)
    tokens = logits.detach().argmax(-1)
    token_logprobs(logits, tokens, 0.8, 3, 0.9).sum().backward()
    kept = ~torch.isinf(truncate_logits(logits.detach()[0] / 0.8, 3, 0.9))
    assert (logits.grad[0][~kept] == 0).all() and logits.grad[0][kept].abs().sum() > 0


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny:llama")


@pytest.mark.parametrize("backend", ["transformers", "continuous"])
@pytest.mark.parametrize("top_k,top_p", [(0, 0.8), (20, 1.0), (30, 0.6)])
def test_rollout_and_learner_logprobs_agree_when_truncated(tiny, backend, top_k, top_p):
    from rl.rollout.worker import RolloutWorker, SamplingParams

    worker = RolloutWorker(tiny, num_threads=1, backend=backend)
    out = worker.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=8, temperature=0.7, top_k=top_k, top_p=top_p,
                                                  batch_size=6), seed=0)
    batch = pad_pairs(out.prompt_ids, out.response_ids, worker.tokenizer.pad_token_id)
    with torch.no_grad():
        learner = response_logprobs(worker.model, batch, 0.7, top_k, top_p)
        full = response_logprobs(worker.model, batch, 0.7)
    gaps = []
    for i, lp in enumerate(out.logprobs):
        assert torch.allclose(torch.tensor(lp), learner[i, :len(lp)], atol=1e-4), (i, lp, learner[i, :len(lp)])
        gaps.append(float((learner[i, :len(lp)] - full[i, :len(lp)]).mean()))
    # the untruncated learner (what it computed before) disagrees: truncation renormalises, log p rises
    assert min(gaps) > 1e-3


def test_truncated_rollout_entropy_is_that_of_the_sampled_distribution(tiny):
    from rl.rollout.worker import RolloutWorker, SamplingParams

    worker = RolloutWorker(tiny, num_threads=1)
    out = worker.generate(PROMPTS[:1], SamplingParams(n=2, max_new_tokens=6, temperature=0.7, top_p=0.8), seed=0)
    batch = pad_pairs(out.prompt_ids, out.response_ids, worker.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = worker.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"]).logits[:, batch["prompt_len"] - 1:-1]
    ent = entropy_from_logits(logits, 0.7, 0, 0.8)
    for i, r in enumerate(out.response_ids):
        assert out.entropy_sum[i] == pytest.approx(float(ent[i, :len(r)].sum()), rel=1e-4)


# ------------------------------------------------------------------------------------- monitor and IS cap
def test_tis_weights_cap_hand_made_ratios():
    rollout = torch.log(torch.tensor([[0.5, 0.5, 0.1, 0.2], [0.25, 0.9, 0.3, 0.3]]))
    learner = torch.log(torch.tensor([[0.5, 0.25, 0.4, 0.9], [0.5, 0.3, 0.3, 0.3]]))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    w = tis_weights(learner, rollout, mask, cap=2.0)
    # ratios 1, 0.5, 4 (capped at 2), 4.5 (capped); 2, 1/3; padding 0
    expected = torch.tensor([[1.0, 0.5, 2.0, 2.0], [2.0, 1 / 3, 0.0, 0.0]])
    assert torch.allclose(w, expected, atol=1e-6) and not w.requires_grad
    # the loss weighs each token's policy-gradient term by w; with w = 1 it is the plain loss
    lp = learner.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    plain, _ = policy_loss(lp, lp.detach(), adv, mask, num_tokens=6, num_seqs=2)
    ones, _ = policy_loss(lp, lp.detach(), adv, mask, num_tokens=6, num_seqs=2, token_weights=torch.ones_like(w))
    weighted, _ = policy_loss(lp, lp.detach(), adv, mask, num_tokens=6, num_seqs=2, token_weights=w)
    assert float(plain.detach()) == pytest.approx(float(ones.detach()))
    assert float(weighted.detach()) == pytest.approx(float(-(adv[:, None] * w * mask).sum() / 6), rel=1e-6)


def test_logprob_mismatch_on_hand_made_values():
    learner = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, 0.0]])
    rollout = torch.tensor([[-1.1, -1.5, -3.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    d = logprob_mismatch(learner, rollout, mask)
    assert float(d["sum"]) == pytest.approx(0.6) and float(d["max"]) == pytest.approx(0.5)
    assert float(d["tokens"]) == 4 and float(d["nonfinite"]) == 0  # the padded -9 does not count
    # A NaN / inf rollout log-prob (an engine bug) is counted apart and kept out of sum, max and tokens.
    broken = rollout.clone()
    broken[0, 1], broken[1, 1] = float("nan"), float("nan")  # the second NaN is padding: not counted at all
    broken[0, 2] = float("-inf")
    d = logprob_mismatch(learner, broken, mask)
    assert float(d["sum"]) == pytest.approx(0.1) and float(d["max"]) == pytest.approx(0.1)
    assert float(d["tokens"]) == 2 and float(d["nonfinite"]) == 2


class _Engine:
    """The parts of rl.learner.engine.Engine that rl.learner.updates uses, on a plain model (no DeepSpeed, one rank)."""

    def __init__(self, model, pad_id, temperature=0.7, top_k=0, top_p=1.0, tis_cap=None):
        self.policy, self.ref, self.device, self.pad_id = model, None, torch.device("cpu"), pad_id
        self.cfg = LearnerConfig(micro_batch_size=4)
        self.algo = AlgorithmConfig(tis_cap=tis_cap)
        self.temperature, self.top_k, self.top_p, self.lr = temperature, top_k, top_p, 0.0

    def boundary(self, last):
        pass

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.policy.zero_grad()
        return 0.0


def _rollout(tiny, top_p):
    from rl.rollout.worker import RolloutWorker, SamplingParams

    worker = RolloutWorker(tiny, num_threads=1)
    out = worker.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=8, temperature=0.7, top_p=top_p), seed=1)
    return worker, out


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_monitor_is_zero_on_the_transformers_backend_and_reads_an_injected_offset(tiny, top_p):
    worker, out = _rollout(tiny, top_p)
    adv = [1.0, -1.0, 0.5, -0.5] * 2

    def update(offset, **engine_kw):
        seqs = [TrainSequence(p, r, [x + offset for x in lp], a)
                for p, r, lp, a in zip(out.prompt_ids, out.response_ids, out.logprobs, adv)]
        shards, plan = plan_policy(seqs, 2, 4, mini_batches=1, max_len=8)  # two "ranks", reduced like the driver
        engine = _Engine(worker.model, worker.tokenizer.pad_token_id, top_p=top_p, **engine_kw)
        return reduce_policy([policy_update(engine, shard, plan) for shard in shards])

    stats = update(0.0)
    mean = stats["logprob_diff_sum"] / stats["logprob_diff_tokens"]
    assert stats["logprob_diff_tokens"] == sum(map(len, out.response_ids))
    assert mean < 1e-4 and stats["logprob_diff_max"] < 1e-3
    shifted = update(-0.25)  # as if the engine under-rated every sampled token by 0.25 nats
    assert shifted["logprob_diff_sum"] / shifted["logprob_diff_tokens"] == pytest.approx(0.25, abs=1e-4)
    assert shifted["logprob_diff_max"] == pytest.approx(0.25, abs=1e-3)
    # the cap: pi_learner / pi_rollout = e^0.25 per token, under a cap of 2 it is the weight; under 1.1 the cap
    capped = update(-0.25, tis_cap=1.1)
    assert capped["tis_weight_sum"] / capped["tokens"] == pytest.approx(1.1, rel=1e-5)
    uncapped = update(-0.25, tis_cap=2.0)
    assert uncapped["tis_weight_sum"] / uncapped["tokens"] == pytest.approx(math.exp(0.25), rel=1e-3)
    assert uncapped["loss"] == pytest.approx(stats["loss"] * math.exp(0.25), rel=1e-3, abs=1e-6)


def test_learner_logprobs_follow_the_engine_truncation(tiny):
    """The `logprobs` query (and the policy update) take the engine's top_k / top_p."""
    from rl.learner.updates import policy_logprobs

    model = load_policy(tiny).eval()
    pad = load_tokenizer(tiny).pad_token_id
    items = [([1, 5, 9], [20, 21, 22])]
    with torch.no_grad():
        plain = policy_logprobs(_Engine(model, pad, 1.0), items)
        truncated = policy_logprobs(_Engine(model, pad, 1.0, top_k=5), items)
        expected = response_logprobs(model, pad_pairs([items[0][0]], [items[0][1]], pad), 1.0, 5, 1.0)[0]
    assert truncated[0] == pytest.approx(expected.tolist(), abs=1e-6) and truncated != plain

"""Rollout worker in-process on the tiny model: what it returns, and that it describes what was sampled."""
import numpy as np
import pytest
import torch

from rl.algo.core import entropy_from_logits
from rl.learner.batch import pad_pairs, response_logprobs
from rl.models import resolve_model
from rl.rollout.worker import CategoricalSampler, RolloutWorker, SamplingParams

PROMPTS = ["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n", "Count: one, two,"]


@pytest.fixture(scope="module")
def worker():
    return RolloutWorker(resolve_model("tiny:llama"), num_threads=1)


@pytest.mark.parametrize("sampler", ["inverse_cdf", "multinomial"])
def test_groups_are_contiguous_and_logprobs_match_a_forward_pass(worker, sampler):
    out = worker.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=8, temperature=0.7, sampler=sampler), seed=0)
    assert len(out.response_ids) == 6
    assert out.prompt_ids[0] == out.prompt_ids[2] != out.prompt_ids[3]
    assert all(reason == "length" and len(r) == 8 for reason, r in zip(out.finish_reason, out.response_ids))
    batch = pad_pairs(out.prompt_ids, out.response_ids, worker.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = response_logprobs(worker.model, batch, temperature=0.7)
    for i, lp in enumerate(out.logprobs):
        assert torch.allclose(torch.tensor(lp), ref[i, :len(lp)], atol=1e-4)
    # The entropies measured during generation are those of the same logits, summed over the response.
    with torch.no_grad():
        logits = worker.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"]).logits[:, batch["prompt_len"] - 1:-1]
    ent = entropy_from_logits(logits, 0.7)
    for i, r in enumerate(out.response_ids):
        assert out.entropy_sum[i] == pytest.approx(float(ent[i, :len(r)].sum()), rel=1e-4)
    # Same seed, same samples; another seed, other samples.
    again = worker.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=8, temperature=0.7, sampler=sampler), seed=0)
    assert again.response_ids == out.response_ids
    other = worker.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=8, sampler=sampler), seed=1)
    assert other.response_ids != out.response_ids


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.7)])
def test_categorical_sampler_draws_from_the_warped_distribution(temperature, top_k, top_p):
    """Frequencies of 40k draws match the distribution after temperature, top-k and top-p (computed here by hand),
    masked tokens are never drawn, and the output is a one-hot score row for generate's greedy step."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf"), 1.5])
    probs = torch.softmax(logits / temperature, -1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    if top_k:
        keep[order[:top_k]] = True
    elif top_p < 1.0:  # smallest set of top tokens whose mass reaches top_p
        mass = probs[order].cumsum(0)
        keep[order[:int((mass < top_p).sum()) + 1]] = True
    else:
        keep[:] = True
    expected = torch.where(keep, probs, 0.0)
    expected = expected / expected.sum()
    n = 40_000
    torch.manual_seed(0)
    scores = CategoricalSampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))(
        torch.zeros(n, 1, dtype=torch.long), logits.repeat(n, 1))
    assert ((scores == 0).sum(-1) == 1).all() and ((scores == float("-inf")).sum(-1) == len(logits) - 1).all()
    freq = torch.bincount(scores.argmax(-1), minlength=len(logits)).double() / n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert (freq[expected == 0] == 0).all()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all(), (freq, expected)


def test_no_hidden_top_k(worker):
    """At a very high temperature the distribution is near uniform: most samples must fall outside the top 50
    (transformers would silently apply top_k=50 if the generation config left it unset)."""
    out = worker.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=16, temperature=100.0), seed=0)
    batch = pad_pairs(out.prompt_ids, out.response_ids, worker.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = worker.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"]).logits[:, batch["prompt_len"] - 1:-1]
    chosen = logits.gather(-1, batch["response_tokens"].unsqueeze(-1))
    ranks = (logits > chosen).sum(-1)[batch["response_mask"].bool()]
    assert (ranks >= 50).float().mean() > 0.9


def test_stop_reason_and_eos_kept(worker):
    model = worker.model
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[worker.tokenizer.eos_token_id] = 1e4  # EOS always wins
    model.lm_head = biased
    try:
        out = worker.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8), seed=0)
        assert out.finish_reason == ["stop"] * 4
        assert out.response_ids == [[worker.tokenizer.eos_token_id]] * 4 and out.text == [""] * 4
        assert all(abs(lp[0]) < 1e-3 for lp in out.logprobs)  # log-prob of a near-certain EOS
    finally:
        model.lm_head = head


def test_load_weights_changes_the_policy_and_rejects_foreign_state(worker):
    original = {n: p.detach().numpy().copy() for n, p in worker.model.named_parameters()}
    before = worker.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=6, greedy=True), seed=0)
    shifted = {n: v + np.float32(0.05) * np.sign(np.random.default_rng(0).standard_normal(v.shape)).astype(np.float32)
               for n, v in original.items()}
    assert worker.load_weights(shifted, version=3) == 3
    after = worker.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=6, greedy=True), seed=0)
    assert after.logprobs != before.logprobs
    with pytest.raises(RuntimeError, match="weight sync mismatch"):
        worker.load_weights({"not.a.param": np.zeros(3, np.float32)}, version=4)
    worker.load_weights(original, version=5)
    assert worker.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=6, greedy=True), seed=0).logprobs == \
        before.logprobs


def test_a_fresh_worker_refuses_to_generate_with_weights_it_does_not_hold():
    """What a rollout worker Ray recreated does when asked for the run's current weights version: it refuses
    (StaleWeightsError, which rl.cluster.watchdog.call_all answers by resyncing it and asking again), instead of sampling
    from its initial weights."""
    from rl.cluster.watchdog import StaleWeightsError

    fresh = RolloutWorker(resolve_model("tiny:llama"), num_threads=1)
    params = SamplingParams(n=1, max_new_tokens=4, greedy=True)
    with pytest.raises(StaleWeightsError, match="holds weights version 0, expected 2"):
        fresh.generate(PROMPTS, params, seed=0, expect_version=2)
    with pytest.raises(StaleWeightsError, match="not in the weight-sync group"):
        fresh.receive_weights(2)  # nor can it join a broadcast it was never made a member of
    assert fresh.weights_version == 0
    state = {n: p.detach().numpy().copy() for n, p in fresh.model.named_parameters()}
    fresh.load_weights(state, version=2)  # the driver's refill (rl.sync.owner.WeightSync.restore)
    assert len(fresh.generate(PROMPTS, params, seed=0, expect_version=2).response_ids) == 2

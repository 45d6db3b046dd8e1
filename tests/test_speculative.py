"""Speculative rollouts (rl/rollout/speculative.py) are lossless: responses follow the policy's sampling distribution
exactly, log-probs are the policy's own. Statistical checks on a tiny random Llama with an 8-token vocabulary, whose
response distribution over 4 new tokens is enumerated exactly; a biased acceptance rule must fail the same checks."""
import functools

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from rl.algo.core import token_logprobs
from rl.config.base import ConfigError
from rl.config.schema import load_config
from rl.config.speculative import SpeculativeConfig
from rl.rollout import speculative
from rl.rollout.drafters import NgramDrafter
from rl.rollout.speculative import best_k, speculative_generate, target_distribution
from rl.rollout.worker import SamplingParams

EOS, VOCAB, NEW = 0, 8, 4
# Repetitive, so the n-gram drafter has something to propose at every step.
PROMPT = [1, 2, 3, 4, 2, 3, 4, 2, 3]
SAMPLES = 4000
SHAPES = [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.95)]  # (temperature, top_k, top_p)


def tiny_llama(seed: int) -> LlamaForCausalLM:
    # initializer_range 0.5: peaked, prompt-dependent distributions (the default 0.02 is nearly uniform, which
    # would make any rule look right).
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5, eos_token_id=EOS,
                      pad_token_id=EOS, bos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # EOS likely where token 3 is (repetitive contexts): lengths 1..NEW all occur
        model.lm_head.weight[EOS] = 0.8 * model.lm_head.weight[3]
    return model


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    return tiny_llama(0)


def params(temperature=1.0, top_k=0, top_p=1.0, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=NEW, temperature=temperature, top_k=top_k, top_p=top_p, **kw)


@torch.no_grad()
def exact_distribution(model, p: SamplingParams) -> dict[tuple, float]:
    """Probability of every complete response (ended by EOS or by the budget), level by level over the tree."""
    done, frontier = {}, {(): 1.0}
    for _ in range(NEW):
        prefixes = list(frontier)
        logits = model(torch.tensor([PROMPT + list(x) for x in prefixes])).logits[:, -1]
        probs = target_distribution(logits, p.temperature, p.top_k, p.top_p)[0].double()
        nxt = {}
        for x, row in zip(prefixes, probs):
            for t in row.nonzero().squeeze(1).tolist():
                mass = frontier[x] * float(row[t])
                (done if t == EOS else nxt)[x + (t,)] = mass
        frontier = nxt
    done.update(frontier)
    return done


def chi2_pvalue(observed: list[float], expected: list[float]) -> float:
    """Pearson goodness of fit; cells expected below 5 are pooled into one (the chi-square approximation)."""
    big = [(o, e) for o, e in zip(observed, expected) if e >= 5]
    rest = (sum(observed) - sum(o for o, _ in big), sum(expected) - sum(e for _, e in big))
    cells = big + ([rest] if rest[1] > 0 else [])
    if len(cells) < 2:  # one possible outcome: nothing to test
        return 1.0
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return float(torch.special.gammaincc(torch.tensor((len(cells) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def fit(samples: list[tuple], exact: dict[tuple, float]) -> dict[str, float]:
    """p-values of the whole responses, their lengths and their token frequencies against the exact distribution."""
    n = len(samples)
    seqs = sorted(exact)
    counts = {s: 0 for s in seqs}
    for s in samples:
        counts[s] += 1  # a response the policy cannot produce raises KeyError: a failure by itself
    out = {"responses": chi2_pvalue([counts[s] for s in seqs], [n * exact[s] for s in seqs])}
    lengths = range(1, NEW + 1)
    out["lengths"] = chi2_pvalue([sum(len(s) == L for s in samples) for L in lengths],
                                 [n * sum(pr for s, pr in exact.items() if len(s) == L) for L in lengths])
    # Token frequencies, position by position (each response is one draw of its j-th token, "ended" included;
    # pooling a response's tokens would not be a multinomial sample), Bonferroni over the positions.
    worst = 1.0
    for j in range(NEW):
        cats = list(range(VOCAB)) + [None]
        observed = [sum((s[j] if j < len(s) else None) == c for s in samples) for c in cats]
        expected = [n * sum(pr for s, pr in exact.items() if (s[j] if j < len(s) else None) == c) for c in cats]
        worst = min(worst, chi2_pvalue(observed, expected))
    out["tokens"] = min(1.0, NEW * worst)
    return out


def sample_speculative(model, p, spec, seed=0, drafter=None, draft_model=None):
    torch.manual_seed(seed)
    out, totals = speculative_generate(model, [PROMPT] * SAMPLES, p, spec, EOS, drafter=drafter,
                                       draft_model=draft_model)
    return [tuple(o["tokens"]) for o in out], totals


ALWAYS = SpeculativeConfig(drafter="ngram", num_draft_tokens=3, ngram_max=2, min_acceptance=0.0, adaptive_k=False)


@pytest.mark.parametrize("temperature,top_k,top_p", SHAPES)
def test_ngram_speculation_samples_the_policy_distribution(policy, temperature, top_k, top_p):
    p = params(temperature, top_k, top_p)
    samples, totals = sample_speculative(policy, p, ALWAYS)
    pvalues = fit(samples, exact_distribution(policy, p))
    assert min(pvalues.values()) > 1e-3, pvalues
    # The check is only meaningful if drafts were both kept and rejected, and speculation saved forwards.
    assert 0.05 < totals["accepted"] / totals["drafted"] < 0.9, totals
    assert totals["tokens"] / totals["row_forwards"] > 1.1, totals


@pytest.mark.parametrize("temperature,top_k,top_p", [SHAPES[0], SHAPES[2]])
def test_model_drafter_samples_the_policy_distribution(policy, temperature, top_k, top_p):
    """A draft model with real q distributions (another random Llama): the min(1, p/q) branch and the
    norm(max(0, p - q)) residual."""
    p = params(temperature, top_k, top_p)
    spec = SpeculativeConfig(drafter="model", draft_model="test", num_draft_tokens=3, min_acceptance=0.0,
                             adaptive_k=False)
    samples, totals = sample_speculative(policy, p, spec, draft_model=tiny_llama(1))
    pvalues = fit(samples, exact_distribution(policy, p))
    assert min(pvalues.values()) > 1e-3, pvalues
    assert 0.1 < totals["accepted"] / totals["drafted"] < 0.95, totals
    assert totals["draft_forwards"] > 0


def test_the_policy_as_its_own_drafter_accepts_everything(policy):
    spec = SpeculativeConfig(drafter="model", draft_model="test", num_draft_tokens=3, min_acceptance=0.0)
    torch.manual_seed(0)
    out, totals = speculative_generate(policy, [PROMPT] * 64, params(), spec, None, draft_model=policy)
    assert totals["accepted"] / totals["drafted"] > 0.999, totals
    assert totals["forwards"] == 1  # budget 4: three drafts and the bonus token in one verifying forward


@pytest.mark.parametrize("rule", ["always_accept", "no_residual"])
def test_a_biased_rule_fails_the_same_check(policy, monkeypatch, rule):
    """What the checks above would catch: accepting every draft, or drawing a rejected position from p instead of
    the residual (so the rejected draft can come back)."""
    if rule == "always_accept":
        monkeypatch.setattr(speculative, "accept_probability", lambda p_x, q_x: torch.ones_like(p_x))
    else:
        monkeypatch.setattr(speculative, "verify", functools.partial(_no_residual, speculative.verify))
    p = params()
    samples, _ = sample_speculative(policy, p, ALWAYS)
    try:
        pvalues = fit(samples, exact_distribution(policy, p))
    except KeyError:  # produced a response the policy never can: failed outright
        return
    assert min(pvalues.values()) < 1e-6, pvalues


def _no_residual(verify, probs, drafts, lengths, q=None):
    accepted, _ = verify(probs, drafts, lengths, q)
    return accepted, speculative.sample(probs[torch.arange(len(accepted)), accepted])


@torch.no_grad()
def test_speculative_matches_plain_generate_two_sample(policy):
    """Speculative vs plain sampling (transformers' own `generate`), same prompt: homogeneity of lengths and tokens."""
    p = params(1.3, 0, 0.8)
    spec_samples, _ = sample_speculative(policy, p, ALWAYS, seed=1)
    torch.manual_seed(2)
    gen = policy.generate(torch.tensor([PROMPT] * SAMPLES), generation_config=GenerationConfig(
        do_sample=True, temperature=1.3, top_p=0.8, top_k=0, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=EOS))
    plain = []
    for row in gen[:, len(PROMPT):].tolist():
        plain.append(tuple(row[:row.index(EOS) + 1] if EOS in row else row))
    for key in (len, lambda s: s[0], lambda s: s[-1]):
        cats = sorted({key(s) for s in spec_samples + plain}, key=str)
        a = [sum(key(s) == c for s in spec_samples) for c in cats]
        b = [sum(key(s) == c for s in plain) for c in cats]
        # 2 x C homogeneity test as goodness of fit of both rows to the pooled frequencies.
        pooled = [(x + y) / (2 * SAMPLES) for x, y in zip(a, b)]
        assert chi2_pvalue(a + b, [SAMPLES * w for w in pooled] * 2) > 1e-3, (a, b)


@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_logprobs_are_the_policy_forward_of_the_same_tokens(policy, drafter):
    """Returned log-probs (and entropies) equal a plain full forward's over prompt + response, within 1e-5: the
    mismatch monitor sees what it sees without speculation. Prompts of several lengths exercise padding and holes."""
    prompts = [PROMPT, [5, 6, 5, 6, 5], [7], [3, 3, 3, 3, 3, 3, 3]] * 3
    p = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=5)
    spec = SpeculativeConfig(drafter=drafter, draft_model="x" if drafter == "model" else None, num_draft_tokens=4,
                             min_acceptance=0.0)
    torch.manual_seed(3)
    out, totals = speculative_generate(policy, prompts, p, spec, EOS, draft_model=tiny_llama(1))
    assert totals["drafted"] > 0
    for prompt, o in zip(prompts, out):
        logits = policy(torch.tensor([prompt + o["tokens"]])).logits[:, len(prompt) - 1:-1]
        ref = token_logprobs(logits, torch.tensor([o["tokens"]]), 0.8, 5)[0]
        assert torch.allclose(torch.tensor(o["logprobs"]), ref, atol=1e-5, rtol=0)
        probs, logp = target_distribution(logits[0], 0.8, 5)
        ent = -torch.where(probs > 0, probs * logp, 0.0).sum(-1)
        assert torch.allclose(torch.tensor(o["entropies"]), ent, atol=1e-5)
        assert (o["finish_reason"] == "stop") == (o["tokens"][-1] == EOS)


def test_greedy_speculation_is_greedy_decoding(policy):
    p = SamplingParams(max_new_tokens=10, greedy=True)
    out, totals = speculative_generate(policy, [PROMPT, [5, 6, 5, 6, 5]], p, ALWAYS, None)
    ref = policy.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=10, eos_token_id=None,
                          pad_token_id=EOS)[0, len(PROMPT):].tolist()
    assert out[0]["tokens"] == ref and totals["drafted"] > 0


def test_ngram_lookup_proposes_the_latest_continuation():
    d = NgramDrafter(1, 3)
    assert d.lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]  # latest 3-gram match
    assert d.lookup([4, 8, 5, 8], 3) == [5, 8]  # only a 1-gram matches
    assert d.lookup([1, 2, 3], 3) == [] and d.lookup([1, 2, 3, 1], 0) == []


def test_adaptive_k_follows_acceptance():
    assert best_k(0.1, 8, 0.35) == 1
    assert best_k(0.95, 8, 0.35) > best_k(0.7, 8, 0.35) > 1
    assert best_k(0.5, 8, 0.0) == 8  # verification free (the tail): draft as much as allowed


def test_config_defaults_off_and_errors_name_the_key():
    assert load_config(overrides=[]).rollout.speculative.drafter == "none"
    assert load_config(overrides=["rollout.speculative.drafter=ngram"]).rollout.speculative.enabled
    for bad, key in ((["rollout.speculative.drafter=model"], "rollout.speculative.draft_model"),
                     (["rollout.speculative.drafter=ngram", "rollout.speculative.ngram_min=4"],
                      "rollout.speculative.ngram_min"),
                     (["rollout.speculative.num_draft_tokens=0"], "rollout.speculative.num_draft_tokens")):
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=bad)


@pytest.mark.parametrize("backend", ["transformers", "continuous"])
def test_rollout_worker_speculates_when_configured(backend):
    """The worker's code path: rollout.speculative routes both backends through the speculative loop; the batch
    has the plain path's layout, the learner's log-probs, and its speculation stats."""
    from rl.learner.batch import pad_pairs, response_logprobs
    from rl.models import resolve_model
    from rl.rollout.worker import RolloutWorker

    worker = RolloutWorker(resolve_model("tiny:llama"), num_threads=1, backend=backend,
                           speculative={"drafter": "ngram", "min_acceptance": 0.0})
    prompts = ["Count: one, two, one, two, one, two,", "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"]
    p = SamplingParams(n=3, max_new_tokens=10, temperature=0.7, top_p=0.9, batch_size=4)
    out = worker.generate(prompts, p, seed=0)
    assert len(out) == 6 and out.prompt_ids[0] == out.prompt_ids[2] != out.prompt_ids[3]
    batch = pad_pairs(out.prompt_ids, out.response_ids, worker.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = response_logprobs(worker.model, batch, temperature=0.7, top_p=0.9)
    for i, lp in enumerate(out.logprobs):
        assert len(lp) == len(out.response_ids[i]) > 0
        assert torch.allclose(torch.tensor(lp), ref[i, :len(lp)], atol=1e-4)
    stats = out.speculation_stats()
    assert stats["drafted"] > 0 and 1.0 <= stats["tokens_per_forward"] <= 5.0
    assert worker.generate(prompts, p, seed=0).response_ids == out.response_ids
    with pytest.raises(ValueError, match="draft_model"):
        RolloutWorker(resolve_model("tiny:llama"), speculative={"drafter": "model"})


def test_schedule_speculates_in_the_tail_or_at_high_acceptance():
    spec = SpeculativeConfig(drafter="ngram", num_draft_tokens=6, tail_batch_size=4, min_acceptance=0.5,
                             probe_every=4)
    s = speculative.Schedule(spec)
    assert s.k(32) == 6  # nothing measured yet: speculate to measure
    s.update(accepted=1, trials=10)
    assert [s.k(32) for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]  # low acceptance: plain, a probe every 4th step
    assert s.k(3) == 6  # the tail: verification is nearly free, draft all k
    for _ in range(20):
        s.update(accepted=9, trials=10)
    # High acceptance: the k that maximises tokens per unit of verification cost at the measured rate, above 1.
    assert s.k(32) == best_k(s.acceptance, 6, spec.verify_token_cost) > 1


def test_step_metrics_report_what_drafting_paid():
    """rollout_metrics carries the batch's acceptance and tokens per forward; a plain batch logs neither."""
    from rewards.isolation import RewardResult
    from rl.contracts import RolloutBatch
    from rl.scoring.score import ScoredBatch
    from rl.steps.base import rollout_metrics
    from rl.steps.samples import StepSamples

    def metrics(batch, scored):
        samples = StepSamples.build([{"id": "q", "prompt": "p"}], [len(batch)], batch)
        samples.add_scores(scored)
        return rollout_metrics(samples)

    batch = RolloutBatch()
    batch.append([1], [5, 6, 7, 8], [], 0.0, "stop", "a", {"forwards": 2, "drafted": 6, "accepted": 3})
    batch.append([1], [5, 6], [], 0.0, "stop", "b", {"forwards": 2, "drafted": 2, "accepted": 0})
    row = metrics(batch, ScoredBatch([1.0, 0.0], [1.0, 0.0], RewardResult({"r": [1.0, 0.0]})))
    assert row["spec_acceptance_rate"] == 3 / 8 and row["spec_tokens_per_forward"] == 6 / 4
    plain = RolloutBatch()
    plain.append([1], [5], [], 0.0, "stop", "c")
    assert not any(k.startswith("spec_") for k in metrics(plain, ScoredBatch([1.0], [1.0], RewardResult({"r": [1.0]}))))


def test_online_distillation_raises_the_draft_models_acceptance(policy):
    """TLT's online drafter: a random draft (another Llama) trained on the policy's own samples, round by round as a
    run would, is accepted more often; the policy's samples stay exact (the distribution tests above cover any q)."""
    from rl.rollout.draft_training import DraftDistiller

    draft = tiny_llama(7)
    spec = SpeculativeConfig(drafter="model", draft_model="test", num_draft_tokens=3, min_acceptance=0.0,
                             adaptive_k=False)
    p = SamplingParams(max_new_tokens=8)
    prompts = [PROMPT[:i] for i in range(3, len(PROMPT) + 1)] * 8

    def acceptance() -> float:
        torch.manual_seed(123)
        _, totals = speculative_generate(policy, prompts, p, spec, EOS, EOS, draft_model=draft)
        return totals["accepted"] / totals["drafted"]

    before = acceptance()
    distiller = DraftDistiller(draft, every=1, steps=10, lr=3e-3, buffer=512, batch_size=32, pad_id=EOS)
    for r in range(6):
        torch.manual_seed(r)
        res, _ = speculative_generate(policy, prompts, p, spec, EOS, EOS, draft_model=draft)
        stats = distiller.observe(prompts, [x["tokens"] for x in res])
        assert stats["draft_version"] == r + 1
    after = acceptance()
    assert after > before + 0.3, (before, after)  # measured: 0.07 -> 0.58
    with pytest.raises(ConfigError, match="distill_every"):
        load_config(None, ["rollout.speculative.drafter=ngram", "rollout.speculative.distill_every=2"])


def test_the_rollout_worker_distils_its_draft_after_generating():
    """Worker wiring: with distill_every 1 each generate call trains the draft once (its version in ping), and the
    policy the learner syncs is untouched by it."""
    from rl.models import resolve_model
    from rl.rollout.worker import RolloutWorker

    worker = RolloutWorker(resolve_model("tiny:llama"), num_threads=1, speculative={
        "drafter": "model", "draft_model": "tiny:llama", "min_acceptance": 0.0, "distill_every": 1, "distill_steps": 2})
    draft_before = {k: v.clone() for k, v in worker.draft_model.state_dict().items()}
    policy_before = {k: v.clone() for k, v in worker.model.state_dict().items()}
    worker.generate(["Count: one, two, one, two,"], SamplingParams(n=4, max_new_tokens=6, batch_size=4), seed=0)
    assert worker.ping()["draft_version"] == 1
    assert any(not torch.equal(v, draft_before[k]) for k, v in worker.draft_model.state_dict().items())
    assert all(torch.equal(v, policy_before[k]) for k, v in worker.model.state_dict().items())

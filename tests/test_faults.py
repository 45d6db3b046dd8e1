"""Cluster pieces that run without a Ray cluster: bucketed collective weight sync over a real gloo group, job
staging for `reasonrl submit`, placement config errors, and kill -9 during a checkpoint write."""
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from rl.store import checkpoint
from rl.config.schema import ConfigError, load_config
from rl.sync.transport import Endpoint, bucket_plan

ROOT = Path(__file__).resolve().parent.parent


def test_bucket_plan_keeps_order_and_size_limit():
    plan = bucket_plan([10, 10, 30, 5, 5, 100], bucket_bytes=25 * 4)
    assert [i for b in plan for i in b] == list(range(6))  # every parameter once, in order
    assert plan == [[0, 1], [2], [3, 4], [5]]  # 30 and 100 exceed the limit alone: a bucket each


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 50))


def _member(rank, port, queue):
    model = _model(seed=rank + 1)  # every member starts from different weights
    manifest = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    ep = Endpoint("127.0.0.1", port, rank, 3, "gloo", 600, 30.0, manifest)  # 600 bytes: several buckets
    params = list(model.named_parameters())
    total = ep.send(params) if rank == 0 else ep.receive(params)
    queue.put((rank, total, {n: p.detach().numpy().copy() for n, p in params}, len(ep.plan)))  # numpy: plain pickle


def test_collective_broadcast_delivers_rank0_weights_in_buckets():
    from tests.ray_cluster import free_ports

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_ports(1)[0]
    procs = [ctx.Process(target=_member, args=(r, port, queue)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        out = {rank: (total, state, buckets) for rank, total, state, buckets in (queue.get(timeout=120)
                                                                                 for _ in procs)}
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    sent, source, buckets = out[0]
    assert buckets > 2
    before = dict(_model(seed=2).named_parameters())
    for rank in (1, 2):
        total, state, _ = out[rank]
        assert total == sent
        for name, value in source.items():
            assert (state[name] == value).all(), (rank, name)
    assert not (before["1.weight"].detach().numpy() == source["1.weight"]).all()  # the receivers really changed


def test_checksum_is_exact_and_independent_of_summation_order():
    from rl.sync.transport import checksum

    flat = torch.randn(1 << 20)
    sums, threads = {checksum(flat), checksum(flat.flip(0).contiguous())}, torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # a different reduction split
    try:
        sums.add(checksum(flat))
    finally:
        torch.set_num_threads(threads)
    assert len(sums) == 1
    changed = flat.clone()
    changed[12345] = torch.nextafter(changed[12345], torch.tensor(float("inf")))  # one ulp of one element
    assert checksum(changed) != checksum(flat)


def test_endpoint_rejects_a_different_model():
    ep = Endpoint.__new__(Endpoint)  # only the manifest matters for the check
    ep.manifest = [("0.weight", (50, 8))]
    with pytest.raises(RuntimeError, match="parameters differ"):
        ep.check(list(_model(0).named_parameters()))


def test_submit_stages_config_and_reward_files(tmp_path, monkeypatch, request):
    from launch.submit import EXCLUDES, PACKAGE, PROJECT_ROOT, build_job

    monkeypatch.setenv("REASONRL_CACHE", str(tmp_path / "cache"))
    reward = tmp_path / "elsewhere" / "my_reward.py"
    reward.parent.mkdir()
    reward.write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    job = build_job(str(ROOT / "configs/tiny.yaml"),
                    [f"reward.functions=[{{fn: '{reward}:score'}}, {{fn: boxed_format, weight: 0.1}}]",
                     f"reward.accuracy={reward}:score", "trainer.output_dir=relative/run"], resume=None)
    request.addfinalizer(lambda: shutil.rmtree(job["stage"], ignore_errors=True))  # `submit` removes it itself
    env = job["runtime_env"]
    assert env["working_dir"] == str(PROJECT_ROOT) and ".venv" in EXCLUDES and "runs" in EXCLUDES
    assert env["env_vars"]["RAY_AUTH_MODE"] == "disabled"
    stage = Path(env["py_modules"][0])
    assert stage.name == PACKAGE
    staged = yaml.safe_load((stage / "tiny.yaml").read_text())
    fn = staged["reward"]["functions"][0]["fn"]
    assert fn.startswith(f"{PACKAGE}.r_") and fn.endswith("_my_reward:score")
    assert staged["reward"]["accuracy"] == fn and staged["reward"]["functions"][1]["fn"] == "boxed_format"
    assert (stage / f"{fn.split('.')[1].split(':')[0]}.py").read_text() == reward.read_text()
    assert staged["trainer"]["output_dir"] == str(Path("relative/run").resolve())
    assert job["entrypoint"] == "python -m launch.job tiny.yaml"
    # The staged config is valid where the package is importable, as it is on the cluster.
    monkeypatch.syspath_prepend(str(stage.parent))
    assert load_config(stage / "tiny.yaml").reward.accuracy == fn


def test_placement_keys_are_checked():
    with pytest.raises(ConfigError, match="placement.rollout.strategy"):
        load_config(ROOT / "configs/tiny.yaml", ["placement.rollout.strategy=ROUND_ROBIN"])
    with pytest.raises(ConfigError, match="weight_sync.mode"):
        load_config(ROOT / "configs/tiny.yaml", ["weight_sync.mode=nccl"])


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rl.store import checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(sys.argv[1])
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    tmp = checkpoint.begin(out, 1)
    model.save_pretrained(tmp / "model")
    checkpoint.commit(tmp, 1, {"sampler": {"epoch": 0, "position": 2}, "seed": 0}, keep=2)
    tmp = checkpoint.begin(out, 2)
    with open(tmp / "big.bin", "wb") as fh:  # step 2 is being written when the kill comes
        print("writing", flush=True)
        for _ in range(600):  # bounded: at most 60 s and 40 MB if the kill never came
            fh.write(b"x" * 65536)
            fh.flush()
            time.sleep(0.1)
""")


def test_kill_9_during_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        lines = iter(proc.stdout.readline, "")
        assert "writing" in (line.strip() for line in lines)  # returns once the marker is read
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert list((tmp_path / "checkpoints").glob(".tmp-step-000002"))  # the half-written step is there...
    last = checkpoint.latest(tmp_path)  # ...and ignored
    assert last.name == "step-000001" and checkpoint.load_state(last)["step"] == 1
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(last / "model").config.hidden_size == 16
    assert (last / "model" / "model.safetensors").is_file()


def test_job_commands_fail_in_one_line_without_a_cluster(capsys):
    from launch.cli import main
    from tests.ray_cluster import free_ports

    address = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    assert main(["status", "raysubmit_x", "--address", address]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reasonrl status:") and address in err and len(err.splitlines()) == 1

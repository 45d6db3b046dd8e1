"""Security defaults, each checked against the thing it defends: a crafted checkpoint does not run code, the
weight-sync rendezvous listens on loopback only, and a local run's Ray cluster refuses a client without its token.

Ray itself cannot be confined to loopback (ray.init turns `_node_ip_address="127.0.0.1"` back into the routable
address, and its gRPC servers bind every interface), so token authentication is what guards a local cluster.
"""
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_loader_refuses_any_class_outside_the_allow_list(tmp_path):
    """The loader DeepSpeed's checkpoint engine gets (rl.learner.engine._weights_only_loads): tensors, containers and
    DeepSpeed's three data classes load; another class, or a pickle that names a callable, does not."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from rl.learner.engine import _weights_only_loads
    from tests.fixtures.fault_paths import RunsCode, Unlisted

    class FakeEngine:  # only the attribute DeepSpeed reads its state through
        class checkpoint_engine:
            load = None

    engine = FakeEngine()
    _weights_only_loads(engine)
    load = engine.checkpoint_engine.load

    weights = {"w": torch.arange(6.0).reshape(2, 3), "step": 3, "names": ["a", "b"]}
    trusted = tmp_path / "trusted.pt"
    torch.save({**weights, "scaler": LossScaler(1.0), "stage": ZeroStageEnum(2),
                "frag": fragment_address(numel=6, start=0)}, trusted)
    state = load(str(trusted), map_location="cpu")
    assert torch.equal(state["w"], weights["w"]) and state["stage"] == ZeroStageEnum(2)
    assert isinstance(state["scaler"], LossScaler) and state["frag"].numel == 6

    unlisted = tmp_path / "unlisted.pt"
    torch.save({**weights, "extra": Unlisted()}, unlisted)
    with pytest.raises(Exception, match="Unlisted") as err:
        load(str(unlisted), map_location="cpu")
    assert "Unsupported global" in str(err.value)

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({**weights, "extra": RunsCode(str(marker))}, crafted)
    with pytest.raises(Exception, match="mkdir"):
        load(str(crafted), map_location="cpu")
    assert not marker.exists()
    torch.load(crafted, weights_only=False)  # what DeepSpeed's own loader does: the crafted file really runs code
    assert marker.is_dir()


def _real_engine_loads(root: str, queue) -> None:
    """In a child process (DeepSpeed joins a one-rank gloo group): the learner rank's real Engine saves a checkpoint,
    loads it back, then loads a copy whose DeepSpeed state file was crafted to run code when unpickled."""
    import shutil

    os.environ["DS_ACCELERATOR"] = "cpu"
    from rl.config.schema import AlgorithmConfig, LearnerConfig
    from rl.learner.engine import Engine, LearnerSetup
    from rl.models import resolve_model
    from tests.fixtures.fault_paths import RunsCode
    from tests.ray_cluster import free_ports

    root = Path(root)
    engine = Engine(0, 1, resolve_model("tiny:llama"), LearnerSetup(LearnerConfig(zero_stage=0), AlgorithmConfig()))
    engine.build("127.0.0.1", free_ports(1)[0])
    engine.save_checkpoint(str(root / "good"))
    engine.load_checkpoint(str(root / "good"))  # an honest checkpoint loads
    shutil.copytree(root / "good", root / "crafted")
    files = sorted((root / "crafted").rglob("*model_states.pt"))
    state = torch.load(files[0], weights_only=False)
    state["extra"] = RunsCode(str(root / "code-ran"))
    torch.save(state, files[0])
    try:
        engine.load_checkpoint(str(root / "crafted"))
        queue.put(("loaded", len(files)))
    except Exception as e:  # noqa: BLE001
        queue.put((type(e).__name__ + ": " + str(e)[:2000], len(files)))


def test_the_real_engines_load_checkpoint_refuses_a_crafted_file(tmp_path):
    """rl.learner.engine.Engine.load_checkpoint itself (DeepSpeed ZeRO-0 on the tiny model): a DeepSpeed state file
    that names a callable is refused and the callable never runs."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_real_engine_loads, args=(str(tmp_path), queue))
    proc.start()
    try:
        outcome, files = queue.get(timeout=600)
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    assert files == 1
    assert outcome.startswith("UnpicklingError: Weights only load failed"), outcome
    assert not (tmp_path / "code-ran").exists()


# ------------------------------------------------------------------------------------- weight-sync group
def _member(rank: int, port: int, queue) -> None:
    import psutil

    from rl.sync.transport import Endpoint

    model = torch.nn.Linear(4, 4)
    manifest = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    ep = Endpoint("127.0.0.1", port, rank, 2, "gloo", 1 << 20, 60.0, manifest)
    params = list(model.named_parameters())
    total = ep.send(params) if rank == 0 else ep.receive(params)
    listening = sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN})
    queue.put((rank, total, listening))
    ep.pg.barrier().wait()  # both have looked before either closes its sockets


def test_weight_sync_group_listens_on_loopback_only():
    """Every member on one node: the store (which TCPStore would bind to `::`) and gloo's pair sockets listen on
    127.0.0.1 only, on the member hosting the store as on the others."""
    from tests.ray_cluster import free_ports

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_ports(1)[0]
    procs = [ctx.Process(target=_member, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        seen = {rank: (total, listening) for rank, total, listening in (queue.get(timeout=120) for _ in procs)}
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert seen[0][0] == seen[1][0]  # the group worked
    for rank, (_, listening) in seen.items():
        assert listening == ["127.0.0.1"], (rank, listening)


# ----------------------------------------------------------------------------------------- local cluster
@pytest.mark.slow
def test_local_cluster_refuses_a_client_without_its_token():
    """What `reasonrl train` starts without ray.address: token authentication with a token made for the run. A
    gRPC call to its GCS without the token is refused, the same call with it answered; the token is in no file Ray
    wrote and in no runtime_env."""
    import grpc
    import ray
    from ray._raylet import AuthenticationTokenLoader
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    from rl.cluster.session import init_ray
    from rl.config.schema import load_config

    ray.shutdown()
    had_file = (Path.home() / ".ray" / "auth_token").exists()
    init_ray(load_config(ROOT / "configs/tiny.yaml"))
    try:
        assert os.environ["RAY_AUTH_MODE"] == "token"
        token = os.environ["RAY_AUTH_TOKEN"]
        assert ray.get(ray.remote(lambda: os.environ.get("RAY_AUTH_MODE")).remote()) == "token"  # workers run

        node = ray._private.worker.global_worker.node
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(grpc.insecure_channel(node.gcs_address))
        request = gcs_service_pb2.GetClusterIdRequest()
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetClusterId(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            stub.GetClusterId(request, metadata=[("authorization", "Bearer " + "0" * 64)], timeout=30)
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        header = AuthenticationTokenLoader.instance().get_token_for_http_header()
        assert stub.GetClusterId(request, metadata=list(header.items()), timeout=30).cluster_id

        assert (Path.home() / ".ray" / "auth_token").exists() == had_file  # no token file written
        leaked = []
        for path in Path(node.get_session_dir_path()).rglob("*"):
            if path.is_file() and not path.is_socket() and path.stat().st_size < 50 * 2 ** 20:
                if token.encode() in path.read_bytes():
                    leaked.append(str(path))
        assert not leaked
    finally:
        ray.shutdown()

"""The collective weight sync alone: learner rank 0 -> one rollout worker, two processes on this machine, SmolLM2's
parameters through rl.sync.transport.Endpoint (gloo), as `reasonrl train` runs it with `weight_sync.mode: collective`.

    python bench/weight_sync.py --rounds 5      # writes bench/results/weight_sync.json

Each process uses `--threads` intra-op threads (the learner and the rollout worker both use all cores in the
synchronous loop). Round 1 builds the staging buffers and warms gloo up; the mean is over the rest.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _member(rank: int, port: int, args: argparse.Namespace, queue) -> None:
    import torch

    from rl.models import load_policy, resolve_model
    from rl.sync.transport import Endpoint

    torch.set_num_threads(args.threads)
    params = list(load_policy(resolve_model(args.model)).named_parameters())
    manifest = [(n, tuple(p.shape)) for n, p in params]
    ep = Endpoint("127.0.0.1", port, rank, 2, "gloo", int(args.bucket_mb * 2 ** 20), 120.0, manifest)
    seconds, sums = [], set()
    for _ in range(args.rounds):
        t = time.perf_counter()
        sums.add(ep.send(params) if rank == 0 else ep.receive(params))
        seconds.append(time.perf_counter() - t)
    queue.put((rank, seconds, sorted(sums), sum(p.numel() for _, p in params) * 4 / 2 ** 20, len(ep.plan)))


def main() -> int:
    from tests.ray_cluster import free_ports

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "weight_sync.json"))
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_ports(1)[0]
    procs = [ctx.Process(target=_member, args=(rank, port, args, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = {rank: rest for rank, *rest in (queue.get(timeout=600) for _ in procs)}
    for p in procs:
        p.join()
    (send, sent, mb, buckets), (recv, received, _, _) = results[0], results[1]
    if sent != received or len(sent) != 1:
        raise SystemExit(f"checksums differ: sent {sent}, received {received}")
    walls = [max(a, b) for a, b in zip(send, recv)]
    timed = walls[1:] or walls
    summary = {"command": " ".join(["python", *sys.argv]), "megabytes": round(mb, 1), "buckets": buckets,
               "threads": args.threads, "seconds": walls, "mean_after_first": sum(timed) / len(timed)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"{mb:.0f} MB in {buckets} buckets, {args.threads} threads a side: "
          f"{', '.join(f'{s:.2f}' for s in walls)} s; mean after the first {summary['mean_after_first']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Weight sync, the default `weight_sync.mode: collective`: a torch.distributed group of learner rank 0 (rank 0
here) and every rollout worker (ranks 1..W), gloo on CPU and NCCL when both roles sit on GPUs, broadcasting the
parameters in flat buckets.

The group is separate from the learner's DeepSpeed group, so it is built from a TCPStore and a ProcessGroup object
directly (a process has one default group, and the rollout workers are not part of DeepSpeed's). Unlike the
numpy-through-the-object-store path (`object_store`, rl.rollout.group.RolloutGroup.load_weights, the one vLLM uses), it
leaves no copy of the weights mapped in the learner and the workers after a sync. Each side checksums what it
sent / received (`checksum`), and the driver compares them, so a sync that silently delivered other bytes fails
the run.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("reasonrl")


def bucket_plan(numels: list[int], bucket_bytes: int, elem_bytes: int = 4) -> list[list[int]]:
    """Consecutive parameter indices grouped so each bucket holds at most `bucket_bytes` (a bigger parameter is
    a bucket of its own)."""
    buckets: list[list[int]] = []
    size = 0
    for i, n in enumerate(numels):
        if buckets and size + n * elem_bytes <= bucket_bytes:
            buckets[-1].append(i)
            size += n * elem_bytes
        else:
            buckets.append([i])
            size = n * elem_bytes
    return buckets


LOOPBACK = "127.0.0.1"


def is_loopback(addr: str) -> bool:
    return addr in ("localhost", "::1") or addr.startswith("127.")


def new_store(addr: str, port: int, rank: int, world: int, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store of a group; rank 0 hosts it at addr:port.

    Left to itself TCPStore's server listens on every interface (`::`), whatever address it is given; so rank 0
    binds the listening socket itself, to `addr` only (loopback when every member is on this node), and hands it
    over (master_listen_fd)."""
    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(max(128, 8 * world))
    except OSError:
        sock.close()
        raise
    return dist.TCPStore(addr, port, world, is_master=True, timeout=timeout, master_listen_fd=sock.detach())


def new_group(addr: str, port: int, rank: int, world: int, backend: str, timeout_s: float):
    """A process group of `world` members outside the default group; rank 0 hosts the store at addr:port. With a
    loopback address gloo's pair sockets listen on loopback too (its default device is the interface the host
    name resolves to)."""
    timeout = timedelta(seconds=timeout_s)
    store = new_store(addr, port, rank, world, timeout_s)
    if backend == "nccl":
        # Without options NCCL's collectives time out after torch's default (10 min), not after the watchdog's
        # trainer.watchdog_seconds that the gloo group and the store get.
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts), store
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=addr) if is_loopback(addr)
                     else dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(store, rank, world, opts), store


def checksum(flat: torch.Tensor) -> int:
    """The bytes of a float32 tensor read as int32 and summed modulo 2**32: exact and independent of summation order
    and thread count, so sender and receiver agree bit for bit, and any one changed element changes it. A float64
    sum did the same job many times slower, costing more than the transfer itself (docs/performance.md)."""
    return int(flat.view(torch.int32).sum(dtype=torch.int32))


@contextlib.contextmanager
def _one_thread():
    """Pack/unpack/checksum with one intra-op thread: they are memory-bound, and when learner and rollout
    worker share the cores, two OpenMP teams spinning in both processes next to gloo's threads made a sync
    up to twice as slow (docs/performance.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _broadcast(pg, tensor: torch.Tensor):
    """Start rank 0's broadcast of `tensor` (async: the returned work's wait() ends it)."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return pg.broadcast([tensor], opts)


class Endpoint:
    """One member of the sync group; `send` on rank 0, `receive` on the others."""

    def __init__(self, addr: str, port: int, rank: int, world: int, backend: str, bucket_bytes: int,
                 timeout_s: float, manifest: list[tuple[str, tuple]]):
        self.rank, self.backend = rank, backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.manifest = [(n, tuple(s)) for n, s in manifest]
        numels = [int(torch.Size(s).numel()) for _, s in self.manifest]
        self.plan = bucket_plan(numels, bucket_bytes)
        self._buffers: list[torch.Tensor | None] = [None, None]
        self.pg, self._store = new_group(addr, port, rank, world, backend, timeout_s)

    def close(self) -> None:
        """Destroy the group (a rebuilt one replaces it): NCCL communicators hold GPU memory and a watchdog thread
        until shut down; the store's port is released with it."""
        pg, self.pg, self._store = getattr(self, "pg", None), None, None
        if pg is not None and self.backend == "nccl":
            shutdown = getattr(pg, "shutdown", None) or getattr(pg, "_shutdown", None)
            if shutdown is not None:
                shutdown()
        self._buffers = [None, None]

    def _synchronize(self) -> None:
        # NCCL work.wait() only orders the current stream after the collective; before storage it reads is freed
        # or rewritten by other code (gathered ZeRO-3 shards, parameters the optimizer updates) the host waits too.
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def check(self, named_params: list[tuple[str, torch.Tensor]]) -> None:
        ours = [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in named_params]
        if ours != self.manifest:
            diff = [(a, b) for a, b in zip(ours, self.manifest) if a != b][:3]
            raise RuntimeError(f"weight sync: parameters differ between learner and rollout model "
                               f"({len(ours)} vs {len(self.manifest)}; first differences {diff})")

    def _flat(self, n: int, slot: int) -> torch.Tensor:
        """The first n floats of staging buffer `slot` (two, so one bucket travels while the next is packed or the
        last unpacked), kept across syncs: fresh 64 MB buffers cost a page fault per 4 KB on every sync, a large share
        of the sync time)."""
        if self._buffers[slot] is None or self._buffers[slot].numel() < n:
            self._buffers[slot] = torch.empty(n, dtype=torch.float32, device=self.device)
        return self._buffers[slot][:n]

    def _direct(self, tensors: list[torch.Tensor]) -> bool:
        # A bucket of one float32 parameter where the transport reads it: sent from / received into the
        # parameter itself, no staging copy (the 108 MB embedding of SmolLM2-135M is one).
        t = tensors[0]
        return len(tensors) == 1 and t.dtype == torch.float32 and t.device == self.device and t.is_contiguous()

    @torch.no_grad()
    def send(self, named_params: list[tuple[str, torch.Tensor]], gather=None) -> int:
        """Broadcast full parameters bucket by bucket; returns their checksum. Bucket k+1 is packed while bucket k
        is on the wire. `gather(tensors)`: a context in which those (ZeRO-3 sharded) parameters are whole, entered
        per bucket (rl.learner.engine.Engine._gather), so only one bucket is ever gathered."""
        self.check(named_params)
        with _one_thread():
            return self._send(named_params, gather)

    def _send(self, named_params: list[tuple[str, torch.Tensor]], gather=None) -> int:
        total, in_flight = 0, None
        for k, bucket in enumerate(self.plan):
            params = [named_params[i][1] for i in bucket]
            with gather(params) if gather is not None else contextlib.nullcontext():
                tensors = [p.detach() for p in params]
                if gather is None and self._direct(tensors):
                    flat = tensors[0].view(-1)
                else:  # gathered storage is freed when the bucket's gather ends: always staged
                    flat = self._flat(sum(t.numel() for t in tensors), k % 2)
                    torch.cat([t.reshape(-1).to(self.device, torch.float32) for t in tensors], out=flat)
            work = _broadcast(self.pg, flat)
            total += checksum(flat)
            if in_flight is not None:
                in_flight.wait()  # bucket k-1 has left: its buffer may be packed again at k+1
            in_flight = work
        if in_flight is not None:
            in_flight.wait()
        self._synchronize()
        return total % 2 ** 32

    @torch.no_grad()
    def receive(self, named_params: list[tuple[str, torch.Tensor]]) -> int:
        """Receive every bucket (into the parameter itself, or a staging buffer then copied into the parameters;
        bucket k+1 arrives while bucket k is unpacked); returns the checksum of what arrived."""
        buckets = [[named_params[i][1].data for i in bucket] for bucket in self.plan]
        direct = [self._direct(params) for params in buckets]

        def start(k: int) -> tuple:
            if direct[k]:
                flat = buckets[k][0].view(-1)
            else:
                flat = self._flat(sum(p.numel() for p in buckets[k]), k % 2)
            return _broadcast(self.pg, flat), flat

        total, next_ = 0, start(0) if buckets else None
        for k, params in enumerate(buckets):
            work, flat = next_
            work.wait()
            if k + 1 < len(buckets):
                next_ = start(k + 1)  # its buffer's previous bucket (k-1) was unpacked last iteration
            total += checksum(flat)
            if not direct[k]:
                offset = 0
                for param in params:
                    param.copy_(flat[offset:offset + param.numel()].view_as(param))  # casts to its dtype/device
                    offset += param.numel()
        self._synchronize()
        return total % 2 ** 32

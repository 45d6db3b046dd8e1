"""The driver's single owner of weight sync: which version the rollout workers must hold, how the learner's
weights reach them (`weight_sync.mode`), and how a rollout worker Ray recreated gets them back.

- `collective`: a torch.distributed group of learner rank 0 and the rollout workers (rl.sync.transport.Endpoint)
  broadcasts the parameters; both sides checksum what moved and this class compares, so a sync that delivered other
  bytes fails the run. A recreated worker has lost its membership: it is refilled through the object store and the
  group is rebuilt before the next push.
- `object_store`: rank 0's numpy state dict through Ray's object store (what vLLM workers load).

The rollout group only generates: it is told the version to expect and calls `restore` on a worker it had to
re-dispatch to (rl.cluster.watchdog.call_all's before_retry hook).
"""
from __future__ import annotations

import logging
import time

import ray

from rl.cluster.watchdog import StuckError, call_all, dead

log = logging.getLogger("reasonrl")
# Longest an NCCL weight broadcast may take: GBs move in seconds between GPUs, so minutes mean a dead member.
NCCL_TIMEOUT_S = 300.0


class WeightSync:
    """The run's one weight version: `learner_version` is the step whose update the learner holds, `version` what
    every rollout worker holds (and must hold when it generates); `sync` brings the second to the first."""

    def __init__(self, cfg, rollouts, learner, learner_version: int = 0):
        self.cfg, self.rollouts, self.learner = cfg, rollouts, learner
        self.mode = cfg.weight_sync.mode
        self.version = 0  # the workers start from the model folder; a resumed run's first sync refills them
        self.learner_version = learner_version
        self.restarts = 0  # recreated rollout workers refilled so far
        # One step off-policy the learner trains on while the workers generate, so a recreated worker cannot fetch
        # the synced version from it: the object-store ref of that version is kept (pinned) until the next sync.
        self.kept_ref = None
        self._group_built = False
        self._rebuild = False
        self.address: tuple[str, int] | None = None  # collective mode: the group's rendezvous, once built
        gpu = cfg.learner.num_gpus_per_rank > 0 and cfg.rollout.num_gpus > 0
        self.backend = "nccl" if gpu else "gloo"  # gloo stages GPU tensors through host memory
        self.timeout_s = float(cfg.trainer.watchdog_seconds or 1800.0)
        if self.backend == "nccl":
            # A receiver that dies mid-broadcast leaves rank 0 inside an NCCL collective that only its timeout
            # ends (gloo sees the closed socket at once): bounded, so the learner is not blocked for 30 minutes.
            self.timeout_s = min(self.timeout_s, NCCL_TIMEOUT_S)
        # Weights ship through the object store in the rollout dtype: bf16 as int16 bits, not fp32 (twice the bytes).
        self.wire_dtype = "bfloat16" if cfg.model.dtype == "bfloat16" else None

    # ------------------------------------------------------------------------------------------ pushing
    def updated(self, step: int) -> None:
        """The learner now holds step `step`'s update."""
        self.learner_version = step

    def sync(self) -> None:
        """Bring the rollout workers to the learner's weights, if they are behind."""
        if self.version != self.learner_version:
            self.push(self.learner_version)

    def push(self, version: int) -> None:
        """The learner's current weights into every rollout worker; afterwards they hold `version`."""
        if self.mode == "object_store":
            ref = self.learner.weights(self.wire_dtype)
            # On-policy every sync ends a step, so whenever a worker generates the learner holds exactly the synced
            # weights and a recreated worker can fetch them again: keeping the ref would pin a second copy of the
            # weights in the object store through every train phase.
            self.kept_ref = ref if self.cfg.trainer.max_staleness else None
            workers = self.rollouts.workers
            call_all("rollout", "load_weights", [(w, (ref, version)) for w in workers],
                     self.cfg.trainer.watchdog_seconds, self.cfg.placement.max_restarts)
        else:
            if not self._group_built or self._rebuild:
                self._build_group()
            self._broadcast(version)
        self.version = version

    def restore(self, worker) -> None:
        """A worker Ray recreated starts with the initial weights: give it the current version back."""
        self.restarts += 1
        self._rebuild = True  # its collective membership died with it
        if self.version == 0:
            return  # its own initial weights are current
        ref = self.kept_ref if self.kept_ref is not None else self.learner.weights(self.wire_dtype)
        ray.get(worker.load_weights.remote(ref, self.version))

    # ------------------------------------------------------------------------------------- collective mode
    def _build_group(self) -> None:
        rank0, workers = self.learner.ranks[0], self.rollouts.workers
        # Every member on rank 0's node: the group listens on loopback only (else on that node's address only).
        nodes = {m["node"] for m in ray.get([rank0.ping.remote()] + [w.ping.remote() for w in workers])}
        addr, port = ray.get(rank0.address.remote(loopback=len(nodes) == 1))
        manifest = ray.get(rank0.weight_manifest.remote())
        bucket_bytes = int(self.cfg.weight_sync.bucket_mb * 2 ** 20)
        args = (addr, port, 1 + len(workers), self.backend, bucket_bytes, self.timeout_s, manifest)
        refs = [rank0.join_weight_sync.remote(0, *args)]
        refs += [w.join_weight_sync.remote(i + 1, *args) for i, w in enumerate(workers)]
        ray.get(refs, timeout=self.timeout_s)  # the store waits for every member: they must join together
        self._group_built, self._rebuild = True, False
        self.address = (addr, port)  # where the group's store listens (rank 0 hosts it)
        log.info("weight sync: %s group of learner rank 0 + %d rollout workers at %s:%d", self.backend,
                 len(workers), addr, port)

    def _broadcast(self, version: int) -> None:
        """Every learner rank takes part (ZeRO-3 gathers are collective), rank 0 sends, every worker receives;
        then the checksums are compared. A worker dying mid-broadcast breaks the group: all workers are recreated
        (they are refilled by `restore` on their next generate) and the group is rebuilt."""
        bucket_bytes = int(self.cfg.weight_sync.bucket_mb * 2 ** 20)  # ZeRO-3: every rank gathers rank 0's buckets
        sends = [r.broadcast_weights.remote(bucket_bytes) for r in self.learner.ranks]
        receives = {w.receive_weights.remote(version): i for i, w in enumerate(self.rollouts.workers)}
        pending, received, died, send_error = list(sends) + list(receives), {}, None, None
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                if send_error is not None:
                    raise send_error
                raise StuckError(f"watchdog: weight sync (learner rank 0 -> {len(receives)} rollout workers) made "
                                 f"no progress for {self.timeout_s:.0f} s")
            ref = ready[0]
            if ref in sends:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    if died is None:  # a dead learner rank: the run stops (resume from the last checkpoint)
                        raise
                except Exception as err:
                    # Rank 0 also fails when a receiver died; that death may be reported a moment later.
                    if died is None and send_error is None:
                        send_error, deadline = err, min(deadline, time.monotonic() + 30.0)
                continue
            try:
                received[receives[ref]] = ray.get(ref)
            except Exception as err:
                if not dead(err) or died is not None:
                    if died is None:
                        raise
                    continue
                died = receives[ref]  # the others would wait for data that never comes
                log.warning("rollout worker %d died during weight sync (%s); recreating the rollout workers, they "
                            "get the weights through the object store", died, type(err).__name__)
                for w in self.rollouts.workers:
                    ray.kill(w, no_restart=False)
        if died is None and send_error is not None:
            raise send_error
        if died is not None:
            self._rebuild = True
            return
        sent = ray.get(sends[0])
        for i, got in sorted(received.items()):
            if got != sent:
                raise RuntimeError(f"weight sync: rollout worker {i} received parameters with checksum {got}, "
                                   f"learner rank 0 sent {sent}")

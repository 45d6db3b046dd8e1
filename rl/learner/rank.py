"""Learner group member: one Ray actor per DeepSpeed ZeRO rank (gloo on CPU, NCCL on GPU).

The actor is only an address for Ray: the DeepSpeed side lives in rl.learner.engine, what a rank computes in rl.learner.updates
(looked up by name, so a new algorithm never edits this class). The weight and checkpoint methods keep their
names because other actors and rl.sync.transport call them by name through Ray.
"""
from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np
import torch

from rl.learner.engine import Engine, LearnerSetup
from rl.learner.updates import run_query, run_update
from rl.sync.transport import LOOPBACK


class LearnerRank:
    def __init__(self, rank: int, world_size: int, model_path: str, setup: LearnerSetup,
                 num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.rank, self.world_size = rank, world_size
        self.engine = Engine(rank, world_size, model_path, setup)

    def address(self, loopback: bool = False) -> tuple[str, int]:
        """Rank 0's address for a rendezvous and a port free on it: loopback when every member runs on this node
        (the store and gloo then listen on nothing another machine reaches), else this node's IP (that interface
        only, rl.sync.transport.new_store)."""
        import ray

        host = LOOPBACK if loopback else ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        return host, port

    def setup(self, master_addr: str, master_port: int) -> dict:
        """Join the process group and build the DeepSpeed engine (collective: call on all ranks together)."""
        return self.engine.build(master_addr, master_port)

    def ping(self) -> dict:
        import ray

        return {"rank": self.rank, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    # ------------------------------------------------------------------------------- updates and queries
    def update(self, name: str, shard: list, plan: Any) -> Any:
        """Registered update `name` of rl.learner.updates on this rank's shard (collective: all ranks together)."""
        return run_update(self.engine, name, shard, plan)

    def query(self, name: str, shard: list, plan: Any = None) -> Any:
        """Registered no-grad query `name` of rl.learner.updates (collective under ZeRO-3: all ranks together)."""
        return run_query(self.engine, name, shard, plan)

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Policy log-probs of given responses (used by tests and diagnostics)."""
        return self.query("logprobs", list(zip(prompt_ids, response_ids)))

    # ------------------------------------------------------------------------------ weights, checkpoints
    def get_weights(self, wire_dtype: str | None = None) -> dict[str, np.ndarray] | None:
        return self.engine.get_weights(wire_dtype)

    def weight_manifest(self) -> list[tuple[str, tuple]]:
        return self.engine.weight_manifest()

    def join_weight_sync(self, rank: int, *args) -> None:
        self.engine.join_weight_sync(rank, *args)

    def broadcast_weights(self, bucket_bytes: int | None = None) -> int | None:
        return self.engine.broadcast_weights(bucket_bytes)

    def save_checkpoint(self, path: str) -> None:
        self.engine.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> None:
        self.engine.load_checkpoint(path)

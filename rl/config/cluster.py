"""Config sections of the cluster side: where actors go (placement), how weights reach the rollout workers, and
which Ray cluster runs the job (assembled into the one schema by rl/config/schema.py)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from rl.config.base import Section


class RolePlacement(Section):
    num_cpus: float = Field(0, ge=0, description="Logical CPUs reserved per actor of this role (0: none; threads "
                            "are set explicitly, so a 2-core laptop fits every role).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per actor, e.g. "
                                        "{node_b: 0.01} to pin the role to nodes started with --resources "
                                        "'{\"node_b\": 1}'.")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement-group strategy over this role's actors (one bundle each): PACK fills few "
        "nodes, SPREAD spreads them; STRICT_* fail instead of bending.")


class PlacementConfig(Section):
    """Where actors go (rl/cluster/placement.py). A role whose bundle would be empty (no CPUs, GPUs or custom resources)
    is scheduled without a placement group, as on one machine."""
    rollout: RolePlacement = Field(default_factory=RolePlacement, description="Each rollout worker "
                                   "(count and GPUs: rollout.num_workers / rollout.num_gpus).")
    reward: RolePlacement = Field(default_factory=RolePlacement, description="Each reward worker (count: "
                                  "reward.num_workers).")
    learner: RolePlacement = Field(default_factory=RolePlacement, description="Each learner rank (count and "
                                   "GPUs: learner.num_ranks / learner.num_gpus_per_rank).")
    colocate: bool = Field(False, description="Rollout worker i shares learner rank i % num_ranks's bundle (same "
                           "node, same devices); off: the roles are placed independently.")
    max_restarts: int = Field(3, ge=0, description="How often Ray recreates a dead rollout or reward worker; its "
                              "unfinished requests are re-issued and the step completes. A dead learner rank "
                              "always stops the run (resume from the last checkpoint).")


class WeightSyncConfig(Section):
    mode: Optional[Literal["object_store", "collective"]] = Field(
        None, description="How new weights reach rollout workers: `collective` (torch.distributed broadcast from "
        "learner rank 0 to every rollout worker, gloo on CPU / NCCL on GPU, straight into the workers' parameters) "
        "or `object_store` (numpy arrays through Ray's object store: the bytes stay mapped in the learner and every "
        "worker, so summed RSS is higher, docs/performance.md; the one vLLM loads from). Default (null): collective, "
        "object_store for rollout.backend vllm. A restarted worker is always resynced through the object store.")
    bucket_mb: float = Field(64.0, gt=0, description="Collective mode: parameters are flattened into buckets of "
                             "at most this size, one broadcast each.")


class RayConfig(Section):
    address: Optional[str] = Field(None, description="Existing cluster (`auto`, `ray://...`); null starts a local one.")
    num_cpus: Optional[int] = Field(None, description="CPUs of a local cluster (default: all).")
    auth_mode: Optional[Literal["disabled", "token"]] = Field(
        None, description="Ray authentication, exported as RAY_AUTH_MODE so it never depends on leftovers in "
        "~/.ray. Default (null): a local cluster uses `token` with a token generated for the run (held in the "
        "processes' environment, never written or logged); joining (`ray.address`) or submitting to an existing "
        "cluster uses `disabled`. Name the mode that cluster was started with: `token` reads the cluster's token "
        "from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray does.")

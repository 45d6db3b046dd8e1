"""rl/seeds.py: every derived seed keeps the value the project always used, so runs reproduce bit for bit."""
import pytest

from rl.seeds import derive_seed


def test_derived_seeds_are_the_historical_values():
    for seed in (0, 1, 7, 12345):
        for step in (0, 1, 5, 200):
            assert derive_seed(seed, "rollout", step) == seed * 100003 + step
            for r in range(3):
                assert derive_seed(seed, "rollout", step, r) == seed * 100003 + step + 1_000_003 * r
            assert derive_seed(seed, "held_out", step) == seed + 7919 * (step + 1)
        for i in range(4):
            assert derive_seed(seed, "worker", index=i) == seed * 1000 + i
    with pytest.raises(ValueError, match="unknown seed purpose"):
        derive_seed(0, "rollouts")


def test_the_weight_version_has_one_owner():
    from types import SimpleNamespace

    from rl.sync.owner import WeightSync

    cfg = SimpleNamespace(weight_sync=SimpleNamespace(mode="object_store"),
                          learner=SimpleNamespace(num_gpus_per_rank=0), rollout=SimpleNamespace(num_gpus=0),
                          trainer=SimpleNamespace(watchdog_seconds=None))
    sync = WeightSync(cfg, None, None, learner_version=3)  # a run resumed at step 3
    pushed = []
    sync.push = lambda version: (pushed.append(version), setattr(sync, "version", version))
    sync.sync()
    sync.sync()  # already current: nothing moves
    sync.updated(4)
    sync.sync()
    assert pushed == [3, 4] and sync.version == sync.learner_version == 4

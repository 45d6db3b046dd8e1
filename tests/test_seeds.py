"""rl/seeds.py: every derived seed keeps the value the project always used, so runs reproduce bit for bit."""
import pytest

import numpy as np

from rl.seeds import GDRO_KEY, PAIRS_KEY, derive_seed, numpy_rng


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


def test_numpy_streams_are_the_historical_ones():
    """GDRO's sampler, the preference pairs, the data order: the same draws as the generators they replaced."""
    def draws(rng):
        return rng.integers(0, 2**31, 5).tolist()

    for seed in (0, 3, 2**40):
        assert draws(numpy_rng(seed, GDRO_KEY)) == draws(np.random.default_rng([seed, 0x6D647230]))
        assert draws(numpy_rng(seed, 7, PAIRS_KEY)) == draws(np.random.default_rng([seed & (2**63 - 1), 7, 5]))
        assert draws(numpy_rng(seed, 2)) == draws(np.random.default_rng([seed, 2]))
    assert draws(numpy_rng(-1, 0)) == draws(np.random.default_rng([2**64 - 1, 0]))  # negative seeds are accepted
    assert draws(numpy_rng(0, 1)) != draws(numpy_rng(0, 2))


def test_the_weight_version_has_one_owner():
    from rl.config.schema import load_config
    from rl.sync.owner import WeightSync

    cfg = load_config(None, ["weight_sync.mode=object_store"], check_environment=False)
    sync = WeightSync(cfg, None, None, learner_version=3)  # a run resumed at step 3
    pushed = []
    sync.push = lambda version: (pushed.append(version), setattr(sync, "version", version))
    sync.sync()
    sync.sync()  # already current: nothing moves
    sync.updated(4)
    sync.sync()
    assert pushed == [3, 4] and sync.version == sync.learner_version == 4

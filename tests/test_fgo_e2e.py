"""FGO end to end on the tiny model: real Ray actors, DeepSpeed learner, math-verify as the correctness reward."""
import json
from pathlib import Path

import pytest
import ray

from rl.config.schema import load_config
from rl.trainer import train

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    ray.shutdown()


def test_fgo_uses_every_group_where_grpo_wastes_them(tmp_path):
    out = tmp_path / "fgo"
    # The random tiny model never answers correctly, so every group is all-wrong: GRPO's +-1 rewards are constant
    # in each group (zero advantage), FGO's length/entropy weights are not.
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"trainer.output_dir={out}", "algorithm.name=fgo",
                                                   "logging.progress=false", "trainer.eval_at_start=false",
                                                   "trainer.save_every=0"])
    assert cfg.algorithm.scale_by_std is False  # the poster's form is FGO's default
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["accuracy"] == 0.0
        assert r["zero_adv_groups_grpo"] == 1.0  # what GRPO would do with the same rollouts
        assert r["zero_adv_groups"] == 0.0
        assert r["fgo_weight_spread"] > 0 and r["fgo_entropy"] > 0
        assert r["tokens_correct_mean"] is None and r["tokens_incorrect_mean"] > 0
        assert r["grad_norm"] > 0  # the all-wrong groups really produced a gradient
    saved = (out / "config.yaml").read_text()
    assert "name: fgo" in saved and "scale_by_std: false" in saved

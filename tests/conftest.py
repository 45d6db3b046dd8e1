import os

import pytest

# Tests never touch a model hub; Ray must not depend on a token file left in ~/.ray.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="module", autouse=True)
def _no_ray_session_crosses_modules():
    """`train_run` reuses a live local Ray session (as a notebook user expects), so a module that trains through it
    leaves Ray up; tests elsewhere assert that nothing started Ray. Each module ends with Ray down."""
    yield
    import sys
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()

"""Where the benchmark files the eval tests read live: shared/data beside the repository (present in CI, absent in a
user's clone), or $REASONRL_DATA_DIR. Tests that need them are skipped, with the reason, when they are absent."""
import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("REASONRL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

needs_shared_data = pytest.mark.skipif(
    not (DATA / "math500.jsonl").is_file(),
    reason=f"benchmark files absent ({DATA}): they live in shared/data beside the repo or $REASONRL_DATA_DIR")

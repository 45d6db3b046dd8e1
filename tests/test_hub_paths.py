"""The hub code paths (datasets hub names, model hub ids), exercised offline on local files."""
import importlib
import json
import shutil
from pathlib import Path

from rl.data.loading import load_rows
from rl.models import resolve_model


def test_dataset_by_name_goes_through_datasets_load_dataset(tmp_path):
    # A dataset "name" that is a folder with split files is resolved by datasets.load_dataset like a hub repo.
    repo = tmp_path / "org__mathset"
    repo.mkdir()
    for split, n in (("train", 3), ("test", 2)):
        rows = [{"question": f"{split} {i}?", "final": str(i)} for i in range(n)]
        (repo / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rows, stats = load_rows(str(repo), split="test", problem_key="question", answer_key="final")
    assert [r["problem"] for r in rows] == ["test 0?", "test 1?"] and stats["rows"] == 2


def test_model_hub_id_resolves_through_snapshot_download_offline(tmp_path, monkeypatch):
    # Lay the tiny model out as the HF cache stores a downloaded repo; offline, snapshot_download returns it.
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(resolve_model("tiny:llama"), snapshot)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)  # constants are read from the environment at import
    try:
        path = Path(resolve_model("acme/tiny"))
        assert (tmp_path / "hub").resolve() in path.resolve().parents
        assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 2
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)

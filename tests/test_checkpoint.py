import json

from rl.store import checkpoint


def _fake_save(out, step, keep=2):
    tmp = checkpoint.begin(out, step)
    (tmp / "model").mkdir()
    (tmp / "model" / "weights").write_text(str(step))
    return checkpoint.commit(tmp, step, {"sampler": {"epoch": 0, "position": step}}, keep=keep)


def test_commit_latest_and_prune(tmp_path):
    for step in (1, 2, 3):
        _fake_save(tmp_path, step)
    latest = checkpoint.latest(tmp_path)
    assert latest.name == "step-000003"
    assert checkpoint.load_state(latest) == {"sampler": {"epoch": 0, "position": 3}, "step": 3}
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]


def test_interrupted_write_keeps_previous_checkpoint(tmp_path):
    _fake_save(tmp_path, 5)
    # A crash after begin() and half the files: no trainer_state.json, never renamed.
    tmp = checkpoint.begin(tmp_path, 6)
    (tmp / "model").mkdir()
    assert checkpoint.latest(tmp_path).name == "step-000005"
    # A damaged pointer falls back to scanning for complete checkpoints.
    (tmp_path / "checkpoints" / "latest").write_text("{not json")
    assert checkpoint.latest(tmp_path).name == "step-000005"
    # The next save cleans the stale temporary.
    _fake_save(tmp_path, 6)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert json.loads((tmp_path / "checkpoints" / "latest").read_text())["step"] == 6


def test_final_link_points_at_model(tmp_path):
    final = _fake_save(tmp_path, 2)
    link = checkpoint.link_final(tmp_path, final)
    assert (link / "weights").read_text() == "2"
    final = _fake_save(tmp_path, 4)
    assert (checkpoint.link_final(tmp_path, final) / "weights").read_text() == "4"


def test_no_checkpoint(tmp_path):
    assert checkpoint.latest(tmp_path) is None


def test_pruning_never_touches_newer_checkpoints(tmp_path):
    for step in (40, 50):
        _fake_save(tmp_path, step)
    kept = _fake_save(tmp_path, 10)  # e.g. leftovers of another run in the same folder
    assert kept.is_dir() and checkpoint.latest(tmp_path) == kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-000010", "step-000040", "step-000050"]

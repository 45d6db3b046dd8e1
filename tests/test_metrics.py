import json
import math
import os
import re

import numpy as np
import pytest
import torch

from rl.store.metrics import MetricsLogger, plot_curves, read_metrics, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _age_event_files(tb_dir, seconds=100):
    """Make existing TensorBoard event files look `seconds` older, as a real earlier run's would be.

    TensorBoard reads a log dir's files in name order, and names start with the creation second: a resume
    within the same second of the same process (only in tests) would otherwise order by a counter."""
    for name in os.listdir(tb_dir):
        m = re.match(r"(events\.out\.tfevents\.)(\d{10})(\..*)", name)
        if m:
            os.rename(os.path.join(tb_dir, name),
                      os.path.join(tb_dir, f"{m[1]}{int(m[2]) - seconds:010d}{m[3]}"))


def _tb_scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    assert tag in acc.Tags()["scalars"]
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_metrics_jsonl_content(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False, progress=False, total_steps=3) as log:
        log.log(1, {"reward": 0.5, "loss": torch.tensor(1.25), "n": np.float32(2.0)})
        log.log(2, {"reward": float("nan"), "loss": np.float64(0.75)})
        log.log(3, {"reward/math_verify": 1, "loss": float("inf")})
    rows = _lines(tmp_path / "metrics.jsonl")
    assert rows == [
        {"step": 1, "reward": 0.5, "loss": 1.25, "n": 2.0},
        {"step": 2, "reward": None, "loss": 0.75},
        {"step": 3, "reward/math_verify": 1.0, "loss": None},
    ]
    assert all(isinstance(v, float) for r in rows for k, v in r.items() if k != "step" and v is not None)
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    assert read_metrics(tmp_path / "metrics.jsonl") == rows


def test_each_line_on_disk_before_close(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=False, progress=False, total_steps=2)
    log.log(1, {"reward": 0.25})
    # Written and flushed without close(): a crash now keeps step 1.
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "reward": 0.25}]
    log.log_event("reward_failure", {"step": 1, "error": "timeout"})
    assert _lines(tmp_path / "events.jsonl") == [{"event": "reward_failure", "step": 1, "error": "timeout"}]
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError):
        log.log(2, {"reward": 0.5})


def test_resume_truncates_steps_after_start_step(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False, progress=False, total_steps=10) as log:
        for s in range(1, 6):
            log.log(s, {"reward": s / 10})
    with MetricsLogger(str(tmp_path), tensorboard=False, progress=False, total_steps=10, start_step=3) as log:
        log.log(4, {"reward": 0.99})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["reward"] for r in rows] == [0.1, 0.2, 0.3, 0.99]


def test_resume_drops_truncated_line_and_fresh_start_truncates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.1}\n{"step": 2, "reward": 0.2}\n{"step": 3, "rew')
    with MetricsLogger(str(tmp_path), tensorboard=False, progress=False, total_steps=10, start_step=2) as log:
        log.log(3, {"reward": 0.3})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    with MetricsLogger(str(tmp_path), tensorboard=False, progress=False, total_steps=10) as log:
        log.log(1, {"reward": 0.7})
    assert read_metrics(path) == [{"step": 1, "reward": 0.7}]


def test_resume_filters_events_by_step(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False, progress=False, total_steps=10) as log:
        log.log_event("eval", {"step": 2, "accuracy": 0.4})
        log.log_event("eval", {"step": 4, "accuracy": 0.6})
        log.log_event("note", {"text": "no step"})
    with MetricsLogger(str(tmp_path), tensorboard=False, progress=False, total_steps=10, start_step=3) as log:
        log.log_event("eval", {"step": 4, "accuracy": 0.65, "bad": float("nan")})
    assert _lines(tmp_path / "events.jsonl") == [
        {"event": "eval", "step": 2, "accuracy": 0.4},
        {"event": "note", "text": "no step"},
        {"event": "eval", "step": 4, "accuracy": 0.65, "bad": None},
    ]


def test_read_metrics_skips_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": null}\n{"step": 3, "rew')
    assert read_metrics(path) == [{"step": 1, "reward": 0.5}, {"step": 2, "reward": None}]
    path.write_text('{"step": 1}\n{"step": 2, "re\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_tensorboard_scalars_and_resume_purge(tmp_path):
    with MetricsLogger(str(tmp_path), progress=False, total_steps=5) as log:
        for s in range(1, 6):
            log.log(s, {"reward/math_verify": s / 10, "loss": 1.0})
    files = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.out.tfevents")]
    assert files
    got = _tb_scalars(tmp_path / "tb", "reward/math_verify")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5]
    assert [v for _, v in got] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])

    _age_event_files(tmp_path / "tb")
    with MetricsLogger(str(tmp_path), progress=False, total_steps=5, start_step=3) as log:
        log.log(4, {"reward/math_verify": 0.9})
    got = _tb_scalars(tmp_path / "tb", "reward/math_verify")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert got[-1][1] == pytest.approx(0.9)


def test_progress_bar_postfix(tmp_path, capsys):
    with MetricsLogger(str(tmp_path), tensorboard=False, total_steps=4, start_step=1) as log:
        log.log(2, {"reward": 0.5, "accuracy": 0.25, "response_tokens_mean": 123.4, "loss": 0.1, "other": 7})
    err = capsys.readouterr().err
    assert "2/4" in err
    for part in ("reward=0.5", "acc=0.25", "tok=123", "loss=0.1", "s/step="):
        assert part in err
    assert "other" not in err


def test_plot_curves(tmp_path):
    import matplotlib.image as mpimg

    with MetricsLogger(str(tmp_path), tensorboard=False, progress=False, total_steps=30) as log:
        for s in range(1, 31):
            log.log(s, {"reward": math.sin(s / 5), "accuracy": s / 30,
                        "reward/math_verify": float("nan") if s == 3 else 0.5})
        log.log_event("eval", {"step": 10, "accuracy": 0.4})
        log.log_event("eval", {"step": 20, "accuracy": 0.7})
    out = tmp_path / "plots"
    paths = plot_curves(str(tmp_path / "metrics.jsonl"), str(out),
                        keys=("reward", "accuracy", "response_tokens_mean", "reward/math_verify"))
    assert paths == [str(out / "curve_reward.png"), str(out / "curve_accuracy.png"),
                     str(out / "curve_reward_math_verify.png")]
    assert sorted(os.listdir(out)) == ["curve_accuracy.png", "curve_reward.png", "curve_reward_math_verify.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert plot_curves(str(tmp_path / "metrics.jsonl"), str(out), keys=("missing",)) == []

    # The eval markers are drawn: without events.jsonl the accuracy plot comes out different.
    os.remove(tmp_path / "events.jsonl")
    (no_eval,) = plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "plots2"), keys=("accuracy",))
    assert not np.array_equal(mpimg.imread(no_eval), mpimg.imread(str(out / "curve_accuracy.png")))


def test_summarize():
    assert summarize([]) == {"mean": 0.0, "max": 0.0, "min": 0.0}
    assert summarize([1, 2, 6]) == {"mean": 3.0, "max": 6.0, "min": 1.0}
    assert summarize(torch.tensor([2.0, 4.0])) == {"mean": 3.0, "max": 4.0, "min": 2.0}


def test_rejects_bad_metrics(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False, progress=False, total_steps=1) as log:
        with pytest.raises(TypeError, match="'reward'"):
            log.log(1, {"reward": "high"})
        with pytest.raises(ValueError):
            log.log(1, {"step": 2})
    assert read_metrics(tmp_path / "metrics.jsonl") == []

"""Training metrics: a durable JSONL log per step, TensorBoard scalars, a progress bar, and PNG curves.

`<output_dir>/metrics.jsonl` holds one `{"step": s, ...}` object per logged step and `events.jsonl` one
`{"event": name, ...}` object per event (eval results, reward failures). Every line is flushed and fsync'ed
as it is written, so a crash loses at most the line being written; `read_metrics` skips such a truncated
last line. A resumed run (`start_step > 0`) first drops the lines of steps after `start_step` (they will be
re-run), and a fresh run (`start_step == 0`) starts both files empty. Non-finite values are written as null.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from rl.store.atomic import write_atomic

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
TB_DIR = "tb"
# Metric name -> short label for the progress bar postfix, shown when present.
_POSTFIX_KEYS = {"reward": "reward", "accuracy": "acc", "response_tokens_mean": "tok", "loss": "loss"}


def _to_float(name: str, value: Any) -> Optional[float]:
    """float(value) for Python/numpy/0-d torch numbers; None (JSON null) when not finite."""
    try:
        x = float(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"metric {name!r}: expected a number, got {type(value).__name__}: {e}") from None
    return x if math.isfinite(x) else None


def _rewrite_jsonl(path: Path, keep_upto_step: Optional[int]) -> None:
    """Atomically rewrite `path`, keeping the lines whose "step" is <= keep_upto_step (None keeps nothing).

    Unparsable lines (a crash's truncated last line) are dropped. In events.jsonl, events without a "step"
    key are kept too: an event not tied to a step survives a resume.
    """
    kept: list[str] = []
    if keep_upto_step is not None and path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if path.name == EVENTS_FILE and isinstance(row, dict) and step is None:
                kept.append(line)
            elif isinstance(step, (int, float)) and step <= keep_upto_step:
                kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


def _append_line(f, obj: Mapping[str, Any]) -> None:
    f.write(json.dumps(obj, allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


class MetricsLogger:
    """Logs per-step metrics to `<output_dir>/metrics.jsonl`, TensorBoard (`<output_dir>/tb`) and a tqdm bar."""

    def __init__(self, output_dir: str, *, tensorboard: bool = True, progress: bool = True, total_steps: int,
                 start_step: int = 0):
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.events_path = self.output_dir / EVENTS_FILE
        keep = start_step if start_step > 0 else None
        _rewrite_jsonl(self.metrics_path, keep)
        _rewrite_jsonl(self.events_path, keep)
        self._metrics_f = open(self.metrics_path, "a", encoding="utf-8")
        self._events_f = open(self.events_path, "a", encoding="utf-8")

        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step writes a SessionLog.START: TensorBoard then hides this run's earlier events at steps
            # >= purge_step (those logged after the checkpoint we resume from, or a whole previous fresh run).
            self._writer = SummaryWriter(log_dir=str(self.output_dir / TB_DIR),
                                         purge_step=start_step + 1 if start_step > 0 else 0)
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, file=sys.stderr, dynamic_ncols=True,
                             unit="step")
        self._last_step = start_step
        self._last_time = time.monotonic()
        self._closed = False

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("MetricsLogger.log() after close()")
        if "step" in metrics:
            raise ValueError("'step' is reserved: pass it as the step argument, not as a metric")
        step = int(step)
        values = {str(k): _to_float(str(k), v) for k, v in metrics.items()}
        _append_line(self._metrics_f, {"step": step, **values})

        if self._writer is not None:
            for name, v in values.items():
                self._writer.add_scalar(name, float("nan") if v is None else v, global_step=step)
            self._writer.flush()

        now = time.monotonic()
        sec_per_step = (now - self._last_time) / max(1, step - self._last_step)
        self._last_time = now
        if self._bar is not None:
            postfix = {}
            for key, label in _POSTFIX_KEYS.items():
                if key in values:
                    v = values[key]
                    postfix[label] = "nan" if v is None else (f"{v:.0f}" if key == "response_tokens_mean"
                                                              else f"{v:.3g}")
            postfix["s/step"] = f"{sec_per_step:.2f}"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(max(0, step - self._bar.n))
        self._last_step = step

    def log_event(self, name: str, payload: Mapping[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("MetricsLogger.log_event() after close()")
        if "event" in payload:
            raise ValueError("'event' is reserved: pass it as the name argument")
        row = {"event": name, **payload}
        # Payloads may hold strings and nested data; only non-finite floats need replacing for strict JSON.
        _append_line(self._events_f, json.loads(json.dumps(row, default=_json_default), parse_constant=lambda c: None))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._metrics_f.close()
        self._events_f.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_default(obj: Any) -> Any:
    """Numpy/torch scalars and small arrays in event payloads become Python numbers/lists."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _read_jsonl(path: str | os.PathLike) -> list[dict]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a crash mid-write: the last line is incomplete
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {line[:80]!r}") from None
    return rows


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl (null values stay None), skipping a truncated last line."""
    return _read_jsonl(path)


def summarize(values: Iterable[Any]) -> dict[str, float]:
    """mean/max/min of a list of numbers (e.g. response token counts); all zeros when empty."""
    xs = [float(v) for v in values]
    if not xs:
        return {"mean": 0.0, "max": 0.0, "min": 0.0}
    return {"mean": sum(xs) / len(xs), "max": max(xs), "min": min(xs)}


def _moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` points (fewer at the start)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(metrics_path: str, out_dir: str, keys=("reward", "accuracy", "response_tokens_mean")) -> list[str]:
    """One `curve_<key>.png` per key with at least one finite value: raw values and a moving average of
    window max(1, n // 10) against step. Eval accuracies from events.jsonl (next to metrics_path) are drawn
    as markers on the accuracy plot. Returns the written paths."""
    # Figure + savefig without pyplot renders with Agg and leaves the process-wide backend alone.
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    events_path = Path(metrics_path).with_name(EVENTS_FILE)
    evals = []
    if events_path.exists():
        for ev in _read_jsonl(events_path):
            if ev.get("event") == "eval" and isinstance(ev.get("step"), (int, float)) \
                    and isinstance(ev.get("accuracy"), (int, float)):
                evals.append((ev["step"], ev["accuracy"]))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys:
        pts = [(r["step"], float(r[key])) for r in rows
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.add_subplot()
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, linewidth=1, label=key)
        window = max(1, len(ys) // 10)
        ax.plot(xs, _moving_average(ys, window), color="tab:blue", linewidth=2, label=f"moving avg ({window})")
        if key == "accuracy" and evals:
            ax.plot([e[0] for e in evals], [e[1] for e in evals], "o", color="tab:red", label="eval")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        path = os.path.join(out_dir, f"curve_{key.replace('/', '_')}.png")
        fig.savefig(path, format="png")
        written.append(path)
    return written

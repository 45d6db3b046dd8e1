"""Benchmarks by name: where each one lives on the hub and in a local data folder, and loading them as rows.

By default a named benchmark loads from the hub dataset the community evaluates on (through `datasets`, the same
code path as training data: rl.data.loading.load_rows). With a data folder (`--data-dir DIR` or $REASONRL_DATA_DIR)
it reads `DIR/<file>.jsonl` with `id`/`problem`/`answer` instead. Anything else with `problem`/`answer` columns
works too: a `.jsonl`/`.json`/`.parquet` path, or a hub id (`org/name`, optionally `org/name:split`). Gold answers
are normalised at load (`_normalized`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from rewards.answers import normalize_gold
from rl.data.loading import DataError, load_rows

DATA_DIR_ENV = "REASONRL_DATA_DIR"


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub: str  # hub dataset id
    split: str
    file: str  # file name inside a local data folder
    config: str | None = None  # hub configuration name
    problem_key: str = "problem"
    answer_key: str = "answer"
    id_key: str | None = None  # hub column holding a stable problem id (else the row index)
    answer_after: str | None = None  # the answer is the text after this marker (gsm8k's "#### 72")


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("math500", "HuggingFaceH4/MATH-500", "test", "math500.jsonl", id_key="unique_id"),
    Benchmark("aime24", "HuggingFaceH4/aime_2024", "train", "aime24.jsonl", id_key="id"),
    Benchmark("aime25", "math-ai/aime25", "test", "aime25.jsonl", id_key="id"),
    Benchmark("amc23", "math-ai/amc23", "test", "amc23.jsonl", problem_key="question", id_key="id"),
    Benchmark("minerva", "math-ai/minervamath", "test", "minerva_math.jsonl", problem_key="question"),
    Benchmark("gsm8k", "openai/gsm8k", "test", "gsm8k_test.jsonl", config="main", problem_key="question",
              answer_after="####"),
]}

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def parse_benchmarks(text: str | list[str]) -> list[str]:
    """Split `a,b,c`, check each entry, and return them in order without duplicates.

    An entry is a known name, a data file path or a hub id (`org/name[:split]`); anything else is an error that
    lists the known names.
    """
    items = text if isinstance(text, list) else str(text).split(",")
    names = list(dict.fromkeys(s.strip() for s in items if s and s.strip()))
    if not names:
        raise DataError(f"no benchmark given; known: {', '.join(BENCHMARKS)}")
    for name in names:
        if name in BENCHMARKS or name.endswith(_FILE_SUFFIXES) or re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", name):
            continue
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} "
                        "(or a .jsonl/.json/.parquet file, or a hub dataset id org/name[:split])")
    return names


def slug(name: str) -> str:
    """A benchmark's file-system name: `math500`, `my_set` for `data/my_set.jsonl`, `org__name` for a hub id."""
    if name in BENCHMARKS:
        return name
    if name.endswith(_FILE_SUFFIXES):
        return Path(name).stem
    return re.sub(r"[^\w.-]+", "__", name)


def data_dir_from(arg: str | None) -> Path | None:
    value = arg or os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder {value!r} ({'--data-dir' if arg else DATA_DIR_ENV}) does not exist")
    return path


def _normalized(row: dict) -> dict:
    """The gold as math-verify reads it as meant (rewards.answers.normalize_gold: Minerva's `4.5e33`, `-1./3`,
    `np.arcsin(10/13)`); the file's own string stays in `answer_original` where the two differ."""
    gold = normalize_gold(row["answer"])
    if gold == row["answer"]:
        return row
    return {**row, "answer": gold, "answer_original": row.get("answer_original", row["answer"])}


def load_benchmark(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> tuple[list[dict], dict]:
    """Rows `{"id", "problem", "answer", ...}` of one benchmark (the first `limit` of them) and load statistics
    (`rows`, `skipped_no_answer`, `skipped_no_problem`, `source`). Rows without an answer are skipped and counted."""
    spec = BENCHMARKS.get(name)
    if spec is not None and data_dir is not None:
        path = Path(data_dir) / spec.file
        if not path.is_file():
            raise DataError(f"benchmark {name!r}: {path} does not exist in the data folder")
        rows, stats = load_rows(str(path))
        source = str(path)
    elif spec is not None:
        try:
            rows, stats = load_rows(spec.hub, spec.split, spec.problem_key, spec.answer_key, config=spec.config)
        except DataError as err:
            raise DataError(f"benchmark {name!r}: {err} (offline? read local files with --data-dir DIR or "
                            f"${DATA_DIR_ENV})") from err
        source = f"{spec.hub}:{spec.split}"
        if spec.answer_after:
            rows = [dict(r, answer=r["answer"].split(spec.answer_after)[-1].strip().replace(",", "")) for r in rows]
        if spec.id_key:
            rows = [dict(r, id=str(r[spec.id_key])) if r.get(spec.id_key) not in (None, "") else r for r in rows]
    elif name.endswith(_FILE_SUFFIXES):
        rows, stats = load_rows(name)
        source = name
    else:
        hub, _, split = name.partition(":")
        rows, stats = load_rows(hub, split or "test")
        source = f"{hub}:{split or 'test'}"
    rows = [_normalized(r) for r in rows]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):  # results are paired by id in `compare`; duplicates would pair wrongly
        rows = [dict(r, id=f"{r['id']}#{i}") for i, r in enumerate(rows)]
    if limit is not None:
        rows = rows[:limit]
    return rows, dict(stats, rows=len(rows), source=source)

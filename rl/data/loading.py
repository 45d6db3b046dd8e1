"""Training/eval prompts: the built-in arithmetic generator, dataset loading, prompt rendering and sampling.

Every row handed to the rest of the framework is normalised to `{"id", "problem", "answer", **other columns}`
with `answer` a string; the other columns travel along so reward functions can use them (TRL contract).
"""
from __future__ import annotations

import copy

import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rl.seeds import numpy_rng

log = logging.getLogger("reasonrl")


class DataError(ValueError):
    """Raised for unusable data: a missing file or column, an empty dataset, an impossible request."""


# ----------------------------------------------------------------------------------------------- arithmetic

D2, D3, D4 = (10, 99), (100, 999), (1000, 9999)  # 2-, 3- and 4-digit operands
SMALL = (2, 12)  # small multiplication factor
TINY_ADD = (1, 30)  # level 0: sums a 135M model can already do sometimes

# difficulty -> templates; a template is (format string, operand ranges). Each template has a fixed
# operator pattern, so a problem text identifies its template and operands.
ARITH_TEMPLATES: dict[int, list[tuple[str, list[tuple[int, int]]]]] = {
    0: [("{} + {}", [TINY_ADD, TINY_ADD])],
    1: [("{} + {}", [D2, D2]), ("{} - {}", [D2, D2])],
    2: [("{} + {}", [D2, D2]), ("{} - {}", [D2, D2]), ("{} * {}", [SMALL, D2]),
        ("{} + {}", [D3, D3]), ("{} - {}", [D3, D3])],
    3: [("{} + {} * {}", [D2, D2, SMALL]), ("{} - {} * {}", [D2, D2, SMALL]),
        ("{} * {} + {}", [SMALL, D2, D2]), ("{} * {} - {}", [SMALL, D2, D2]),
        ("{} + {} - {}", [D2, D2, D2]), ("{} - {} + {}", [D2, D2, D2])],
    4: [("{} * {}", [D2, D2]), ("{} + {} * {}", [D3, D2, SMALL]), ("{} - {} * {}", [D3, D2, SMALL]),
        ("{} * {} - {}", [D2, D2, D3]), ("({} + {}) * {}", [D2, D2, SMALL]), ("({} - {}) * {}", [D2, D3, SMALL]),
        ("{} + {} - {}", [D4, D3, D3])],
    5: [("{} + {} * {} - {}", [D3, D2, SMALL, D3]), ("{} * {} + {} * {}", [D2, SMALL, D2, SMALL]),
        ("{} - {} * {} + {}", [D3, D2, D2, D3]), ("({} + {}) * {} - {}", [D2, D2, SMALL, D3]),
        ("{} * {} - {} + {}", [D2, D2, D3, D3]), ("{} * ({} - {}) + {}", [SMALL, D2, D3, D3])],
}
_ENUMERATE_LIMIT = 200_000  # spaces up to this size are enumerated and shuffled instead of rejection-sampled


def _evaluate(expr: str) -> int:
    # The expression comes from the fixed templates above: digits, + - * and parentheses only.
    return int(eval(compile(expr, "<arith>", "eval"), {"__builtins__": {}}, {}))


def _space(templates) -> int:
    return sum(math.prod(hi - lo + 1 for lo, hi in ranges) for _, ranges in templates)


def _unique_problems(templates, need: int, rng: np.random.Generator) -> list[str]:
    """`need` distinct expressions, in a deterministic random order."""
    if _space(templates) <= _ENUMERATE_LIMIT:
        every = sorted({fmt.format(*ops) for fmt, ranges in templates
                        for ops in itertools.product(*(range(lo, hi + 1) for lo, hi in ranges))})
        return [every[i] for i in rng.permutation(len(every))[:need]]
    seen: dict[str, None] = {}  # insertion-ordered set
    max_draws, drawn, chunk = 20 * need + 100_000, 0, 4096
    width = max(len(r) for _, r in templates)
    while len(seen) < need:
        if drawn >= max_draws:
            raise DataError(f"could only draw {len(seen)} distinct problems of the {need} requested; "
                            "lower num_train/num_test or raise the difficulty")
        which = rng.integers(0, len(templates), size=chunk)
        u = rng.random((chunk, width))
        for t, row in zip(which, u):
            fmt, ranges = templates[t]
            ops = [lo + int(x * (hi - lo + 1)) for x, (lo, hi) in zip(row, ranges)]
            seen.setdefault(fmt.format(*ops))
            if len(seen) == need:
                break
        drawn += chunk
    return list(seen)


def generate_arith(difficulty: int, num_train: int, num_test: int, seed: int) -> dict[str, list[dict]]:
    """Integer arithmetic problems, `{"train": rows, "test": rows}`; train and test texts are disjoint.

    The same (difficulty, num_train, num_test, seed) always yields the same rows. Answers are Python's value
    of the expression (standard precedence) as a plain integer string, possibly negative.
    """
    if difficulty not in ARITH_TEMPLATES:
        raise DataError(f"arith difficulty must be one of {sorted(ARITH_TEMPLATES)}, got {difficulty!r}")
    if num_train < 0 or num_test < 0:
        raise DataError(f"arith num_train/num_test must be >= 0, got {num_train}/{num_test}")
    templates = ARITH_TEMPLATES[difficulty]
    space, need = _space(templates), num_train + num_test
    if need > space:
        raise DataError(f"arith difficulty {difficulty} has only {space} distinct problems, but num_train + "
                        f"num_test = {need} were requested")
    rng = numpy_rng(seed, difficulty)
    exprs = _unique_problems(templates, need, rng)  # train first, then test from what train does not hold
    out: dict[str, list[dict]] = {}
    for split, chunk in (("train", exprs[:num_train]), ("test", exprs[num_train:])):
        out[split] = [{"id": f"arith-{split}-{i}", "problem": f"What is {e}?", "answer": str(_evaluate(e))}
                      for i, e in enumerate(chunk)]
    return out


# -------------------------------------------------------------------------------------------------- loading

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MAX_BAD_LINES = 20  # line numbers of skipped rows kept in the stats (and events.jsonl): enough to find them


def blank(value: Any) -> bool:
    """A field that is absent for the purpose of a row: None, an empty or whitespace string, an empty list."""
    return value is None or (isinstance(value, (str, list)) and len(value) == 0) or \
        (isinstance(value, str) and not value.strip())


def as_text(value: Any) -> Any:
    """A string field as a string. `datasets` reads a JSON column mixing chat lists and strings as JSON-encoded
    values and decodes them, which turns the string "42" into the number 42: such a number was a plain-string
    field. Anything else (a string, a message list) is returned as it is."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


@dataclass
class JsonlRecords:
    """What `read_jsonl` kept: `records[i]` came from file line `lines[i]` (1-based); every record has every
    column of the file (`columns`, in first-seen order; a key a row lacks is None, as `datasets` reads it)."""
    records: list[dict]
    lines: list[int]
    columns: list[str]
    stats: dict


def read_jsonl(source: str, required: tuple[str, ...] = (), required_if_present: tuple[str, ...] = (),
               what: str = "rows") -> JsonlRecords:
    """One JSON object per line, read line by line, so one bad row costs that row and not the file.

    A line that is not valid UTF-8 / JSON, or holds no JSON object, is skipped (`skipped_bad_json`); so is a row
    whose `required` field (or `required_if_present` field, once any row of the file has that column) is blank
    (`skipped_no_<field>`, the first blank field counts). Blank lines are ignored. `stats`: `lines` (non-blank
    lines read), `rows` (kept), those counts and `bad_lines`, the first MAX_BAD_LINES skipped line numbers
    (1-based). Raises DataError naming the file if it does not exist, a required field is in no row at all, or
    nothing usable is left (`what` names the unit in that message)."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"data file {source!r} does not exist")
    parsed: list[tuple[int, dict]] = []
    bad_json: list[int] = []
    lines = 0
    with open(path, "rb") as fh:  # bytes: an invalid UTF-8 sequence spoils its line only
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            lines += 1
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if isinstance(record, dict):
                parsed.append((number, record))
            else:
                bad_json.append(number)
    columns = list(dict.fromkeys(k for _, r in parsed for k in r))
    for key in required:
        if parsed and key not in columns:
            raise DataError(f"data file {source!r} has no column {key!r} in any row; available columns: {columns}")
    checked = [*required, *(k for k in required_if_present if k in columns)]
    missing = {k: 0 for k in checked}
    skipped = list(bad_json)
    out = JsonlRecords([], [], columns, {})
    for number, record in parsed:
        absent = next((k for k in checked if blank(record.get(k))), None)
        if absent is not None:
            missing[absent] += 1
            skipped.append(number)
            continue
        out.records.append({k: record.get(k) for k in columns})
        out.lines.append(number)
    skipped.sort()
    out.stats = {"lines": lines, "rows": len(out.records), "skipped_bad_json": len(bad_json),
                 **{f"skipped_no_{k}": n for k, n in missing.items()}, "bad_lines": skipped[:MAX_BAD_LINES]}
    if skipped:
        log.warning("data file %s: skipped %d of %d lines (%d not a JSON object%s); first bad lines: %s", source,
                    len(skipped), lines, len(bad_json),
                    "".join(f", {n} without {k!r}" for k, n in missing.items() if n), skipped[:MAX_BAD_LINES])
    if not out.records:
        detail = "empty file" if not lines else ", ".join(
            [f"{lines} lines read", f"{len(bad_json)} not a JSON object"] +
            [f"{n} without {k!r}" for k, n in missing.items() if n]) + f"; bad lines {skipped[:MAX_BAD_LINES]}"
        raise DataError(f"data file {source!r} has no usable {what} ({detail})")
    return out


def load_dataset(source: str, split: str, config: str | None = None):
    """A .jsonl/.json/.parquet file or a `datasets` hub dataset (`split`, `config`) as a `datasets.Dataset`; None for
    an empty file. Raises DataError naming the source if it is missing or unreadable. (JSONL files whose bad lines
    should be skipped one by one go through `read_jsonl` instead.)"""
    import datasets

    fmt = _FILE_FORMATS.get(Path(source).suffix.lower())
    if fmt is not None:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"data file {source!r} does not exist")
        if path.stat().st_size == 0:
            return None  # `datasets` fails obscurely on an empty file; report it as empty instead
        try:
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as e:
            raise DataError(f"could not read data file {source!r}: {type(e).__name__}: {e}") from e
    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as e:
        raise DataError(f"could not load dataset {source!r} (split {split!r}): {type(e).__name__}: {e}") from e


def _answer_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 85.0 -> "85"
    text = str(value).strip()
    return text or None


def load_rows(source: str, split: str = "train", problem_key: str = "problem", answer_key: str = "answer",
              arith: dict | None = None, config: str | None = None) -> tuple[list[dict], dict]:
    """Load and normalise rows from `arith`, a .jsonl/.json/.parquet file or a `datasets` hub name (`config`: the
    hub dataset's configuration name, e.g. gsm8k's `main`).

    Returns (rows, stats); rows are `{"id", "problem", "answer", **other columns}` and stats counts the
    kept rows and the rows skipped for a missing/blank problem or answer.
    """
    if source == "arith":
        if hasattr(arith, "model_dump"):  # an ArithConfig
            arith = arith.model_dump()
        params = {"difficulty": 1, "num_train": 2000, "num_test": 200, "seed": 0, **(arith or {})}
        if split not in ("train", "test"):
            raise DataError(f"arith has splits 'train' and 'test', not {split!r}")
        rows = generate_arith(**params)[split]
        if not rows:
            raise DataError(f"dataset 'arith' has no usable rows in split {split!r} (num_{split} is 0)")
        return rows, {"rows": len(rows), "skipped_no_answer": 0, "skipped_no_problem": 0}

    if Path(source).suffix.lower() == ".jsonl":
        # Line by line: `datasets` rejects a whole file for one malformed line (without saying which).
        data = read_jsonl(source, required=(problem_key, answer_key))
        rows = []
        mapped = {problem_key, answer_key, "id", "problem", "answer"}
        for line, record in zip(data.lines, data.records):
            rid = record.get("id")
            rid = f"{split}-{line - 1}" if rid is None or str(rid) == "" else str(rid)  # = the row index
            rows.append({"id": rid, "problem": str(record[problem_key]), "answer": _answer_text(record[answer_key]),
                         **{k: v for k, v in record.items() if k not in mapped}})
        s = data.stats
        return rows, {"rows": len(rows), "skipped_no_answer": s[f"skipped_no_{answer_key}"],
                      "skipped_no_problem": s[f"skipped_no_{problem_key}"], "skipped_bad_json": s["skipped_bad_json"],
                      "bad_lines": s["bad_lines"]}

    ds = load_dataset(source, split, config)
    records: list[dict] = []
    if ds is not None:
        columns = list(ds.column_names)
        for key, what in ((problem_key, "problem_key"), (answer_key, "answer_key")):
            if key not in columns:
                raise DataError(f"dataset {source!r} has no column {key!r} ({what}); available columns: {columns}")
        records = ds.to_list()
    rows, no_answer, no_problem = [], 0, 0
    mapped = {problem_key, answer_key, "id", "problem", "answer"}
    for index, record in enumerate(records):
        problem = record.get(problem_key)
        if problem is None or not str(problem).strip():
            no_problem += 1
            continue
        answer = _answer_text(record.get(answer_key))
        if answer is None:
            no_answer += 1
            continue
        rid = record.get("id")
        rid = f"{split}-{index}" if rid is None or str(rid) == "" else str(rid)
        rows.append({"id": rid, "problem": str(problem), "answer": answer,
                     **{k: v for k, v in record.items() if k not in mapped}})
    stats = {"rows": len(rows), "skipped_no_answer": no_answer, "skipped_no_problem": no_problem}
    if not rows:
        raise DataError(f"dataset {source!r} has no usable rows (split {split!r}, {len(records)} read, "
                        f"{no_problem} without {problem_key!r}, {no_answer} without {answer_key!r})")
    return rows, stats


# ------------------------------------------------------------------------------------------------ prompting

def render_prompt(tokenizer, problem: str, system_prompt: str | None, suffix: str = "") -> str:
    """The prompt text the policy sees: the chat template with the assistant header opened.

    Without a system prompt the template's own default (if any) applies. A tokenizer without a chat
    template gets plain `system\\n\\nproblem\\n` text.
    """
    user = problem + suffix
    if getattr(tokenizer, "chat_template", None) is None:
        return (f"{system_prompt}\n\n" if system_prompt is not None else "") + f"{user}\n"
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def filter_long_prompts(rows: list[dict], prompts: list[str], tokenizer,
                        max_tokens: int) -> tuple[list[dict], list[str], int]:
    """Drop the rows whose rendered prompt has more than `max_tokens` tokens; returns (rows, prompts, dropped)."""
    if len(rows) != len(prompts):
        raise DataError(f"filter_long_prompts: {len(rows)} rows but {len(prompts)} prompts")
    if not prompts:
        return [], [], 0
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= max_tokens]
    return [rows[i] for i in keep], [prompts[i] for i in keep], len(rows) - len(keep)


class PromptSampler:
    """Walks the rows in epochs: epoch e visits every row once, in the order of a permutation seeded by
    `[seed, e]` (identity order without shuffle). Batches run across epoch boundaries without repeats or
    gaps, and `state_dict`/`load_state_dict` make a resumed sampler continue exactly where it stopped."""

    def __init__(self, rows: list[dict], seed: int, shuffle: bool = True):
        if not rows:
            raise DataError("PromptSampler needs at least one row")
        self.rows, self.seed, self.shuffle = list(rows), seed, shuffle
        self._epoch, self._position = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    @property
    def epoch(self) -> int:
        """Completed passes over the rows (the epoch the next row comes from)."""
        return self._epoch

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.rows)
            self._order = (numpy_rng(self.seed, epoch).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        return self._order

    def next_batch(self, n: int) -> list:
        if n < 0:
            raise DataError(f"next_batch: n must be >= 0, got {n}")
        batch: list[dict] = []
        while len(batch) < n:
            order = self._order_for(self._epoch)
            take = min(n - len(batch), len(order) - self._position)
            # Copies, so a step that annotates its rows never changes the sampler's.
            batch.extend(copy.copy(self.rows[i]) for i in order[self._position:self._position + take])
            self._position += take
            if self._position == len(order):
                self._epoch, self._position = self._epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        rows = state.get("num_rows", len(self.rows))
        if rows != len(self.rows):
            raise DataError(f"sampler state was saved for {rows} rows, but this sampler has {len(self.rows)}")
        if epoch < 0 or not 0 <= position < len(self.rows):
            raise DataError(f"invalid sampler state: epoch={epoch}, position={position} for {len(self.rows)} rows")
        self._epoch, self._position = epoch, position

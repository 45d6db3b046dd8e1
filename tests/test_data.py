import json
import re
from pathlib import Path

import pytest

from rl.data.loading import (DataError, PromptSampler, filter_long_prompts, generate_arith, load_rows,
                     render_prompt)
from tests.shared_data import DATA, needs_shared_data

MATH500 = DATA / "math500.jsonl"
PROBLEM_RE = re.compile(r"^What is ([0-9 +\-*()]+)\?$")


@pytest.fixture(scope="module")
def tok():
    from rl.models import load_tokenizer, resolve_model
    return load_tokenizer(resolve_model("tiny:llama"))


def _expr(problem: str) -> str:
    m = PROBLEM_RE.match(problem)
    assert m, problem
    return m.group(1)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------------- arith

def test_arith_deterministic_per_seed():
    a = generate_arith(2, 300, 50, seed=7)
    assert a == generate_arith(2, 300, 50, seed=7)
    b = generate_arith(2, 300, 50, seed=8)
    assert [r["problem"] for r in a["train"]] != [r["problem"] for r in b["train"]]
    assert len(a["train"]) == 300 and len(a["test"]) == 50
    assert [r["id"] for r in a["train"][:2]] == ["arith-train-0", "arith-train-1"]
    assert a["test"][0]["id"] == "arith-test-0"


@pytest.mark.parametrize("difficulty", [0, 1, 2, 3, 4, 5])
def test_arith_disjoint_and_correct(difficulty):
    data = generate_arith(difficulty, 400, 100, seed=3)
    train = [r["problem"] for r in data["train"]]
    test = [r["problem"] for r in data["test"]]
    assert len(set(train)) == 400 and len(set(test)) == 100
    assert not set(train) & set(test)
    n_ops = set()
    for row in data["train"] + data["test"]:
        expr = _expr(row["problem"])
        assert row["answer"] == str(eval(expr))  # plain integer string, Python precedence
        assert re.fullmatch(r"-?\d+", row["answer"])
        n_ops.add(len(re.findall(r" [+\-*] ", expr)))
        numbers = [int(x) for x in re.findall(r"\d+", expr)]
        if difficulty == 1:
            assert re.fullmatch(r"\d+ [+-] \d+", expr) and all(10 <= x <= 99 for x in numbers)
    expected_ops = {0: {1}, 1: {1}, 2: {1}, 3: {2}, 4: {1, 2}, 5: {3}}[difficulty]
    assert n_ops == expected_ops


def test_arith_difficulty2_has_multiplication_and_three_digits():
    exprs = [_expr(r["problem"]) for r in generate_arith(2, 500, 0, seed=0)["train"]]
    assert any("*" in e for e in exprs)
    assert any(re.fullmatch(r"\d{3} [+-] \d{3}", e) for e in exprs)
    for e in exprs:
        if "*" in e:
            a, b = map(int, e.split(" * "))
            assert 2 <= a <= 12 and 10 <= b <= 99


def test_arith_negative_answers_occur_and_whole_space_usable():
    # difficulty 1 has 2 * 90 * 90 = 16200 distinct problems: all of them can be drawn, one more cannot.
    data = generate_arith(1, 16000, 200, seed=1)
    assert len({r["problem"] for r in data["train"] + data["test"]}) == 16200
    assert any(r["answer"].startswith("-") for r in data["train"])
    with pytest.raises(DataError, match="16200"):
        generate_arith(1, 16000, 201, seed=1)
    with pytest.raises(DataError):
        generate_arith(6, 10, 10, seed=1)


# -------------------------------------------------------------------------------------------------- loading

def test_load_rows_arith_splits():
    params = {"difficulty": 1, "num_train": 20, "num_test": 5, "seed": 0}
    train, stats = load_rows("arith", "train", arith=params)
    test, _ = load_rows("arith", "test", arith=params)
    assert len(train) == 20 and len(test) == 5 and stats["rows"] == 20
    assert train == generate_arith(1, 20, 5, 0)["train"]
    with pytest.raises(DataError):
        load_rows("arith", "validation", arith=params)


def test_load_rows_jsonl_skips_and_counts(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "problem": "1+1?", "answer": "2", "level": 1},
        {"id": "b", "problem": "no answer", "answer": None, "level": 2},
        {"id": "c", "problem": "empty answer", "answer": "   ", "level": 3},
        {"id": None, "problem": "numeric answer", "answer": 7, "level": 4},
        {"id": "e", "problem": "", "answer": "3", "level": 5},
    ])
    rows, stats = load_rows(path)
    assert stats == {"rows": 2, "skipped_no_answer": 2, "skipped_no_problem": 1, "skipped_bad_json": 0,
                     "bad_lines": [2, 3, 5]}
    assert rows[0] == {"id": "a", "problem": "1+1?", "answer": "2", "level": 1}
    assert rows[1] == {"id": "train-3", "problem": "numeric answer", "answer": "7", "level": 4}


def test_load_rows_custom_columns(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": f"q{i}", "solution": i, "src": "x"} for i in range(4)])
    rows, stats = load_rows(path, split="test", problem_key="question", answer_key="solution")
    assert stats["rows"] == 4
    assert rows[2] == {"id": "test-2", "problem": "q2", "answer": "2", "src": "x"}


def test_load_rows_missing_column_names_it(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "solution": "1"}])
    with pytest.raises(DataError) as err:
        load_rows(path)
    msg = str(err.value)
    assert "'problem'" in msg and "question" in msg and "solution" in msg
    with pytest.raises(DataError, match="'answer_col'"):
        load_rows(path, problem_key="question", answer_key="answer_col")


def test_load_rows_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no usable rows"):
        load_rows(str(empty))
    no_answers = _write_jsonl(tmp_path / "na.jsonl", [{"problem": "p", "answer": ""}, {"problem": "q", "answer": None}])
    with pytest.raises(DataError, match="no usable rows"):
        load_rows(no_answers)
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_load_rows_skips_malformed_jsonl_lines_and_names_them(tmp_path):
    """One malformed line costs that row, not the file (`datasets` rejected the whole file, naming no line)."""
    good = [json.dumps({"problem": f"q{i}", "answer": str(i)}).encode() for i in range(4)]
    lines = [good[0], b'{"problem": "cut off', good[1], b"", b"[1, 2]", b"\xff\xfe{}", good[2],
             json.dumps({"problem": "no answer"}).encode(), good[3]]  # line 6 is not even UTF-8
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows, stats = load_rows(str(path))
    assert [r["problem"] for r in rows] == ["q0", "q1", "q2", "q3"]
    assert [r["id"] for r in rows] == ["train-0", "train-2", "train-6", "train-8"]  # ids stay the line index
    assert stats == {"rows": 4, "skipped_no_answer": 1, "skipped_no_problem": 0, "skipped_bad_json": 3,
                     "bad_lines": [2, 5, 6, 8]}
    path.write_text('{"problem": "a", "answer": \n[]\n')
    with pytest.raises(DataError, match=r"d\.jsonl.*no usable rows.*2 not a JSON object.*\[1, 2\]"):
        load_rows(str(path))


def test_read_jsonl_required_fields_columns_and_bad_line_cap(tmp_path):
    from rl.data.loading import MAX_BAD_LINES, read_jsonl

    path = tmp_path / "x.jsonl"
    body = [json.dumps({"messages": [{"role": "user", "content": "hi"}], "tag": 1, "tie": False}),
            json.dumps({"messages": []}),
            json.dumps({"messages": "x", "tie": None}), json.dumps({"messages": "y", "tie": True})]
    path.write_text("\n".join(body + ["not json"] * 30) + "\n")
    data = read_jsonl(str(path), required=("messages",), required_if_present=("tie", "absent"))
    assert data.columns == ["messages", "tag", "tie"] and data.lines == [1, 4]
    assert data.records[1] == {"messages": "y", "tag": None, "tie": True}  # every column, None where absent
    assert data.stats["skipped_no_messages"] == 1 and data.stats["skipped_no_tie"] == 1  # False is a value
    assert data.stats["skipped_bad_json"] == 30 and data.stats["lines"] == 34
    assert data.stats["bad_lines"] == [2, 3, *range(5, 5 + MAX_BAD_LINES - 2)]  # the first MAX_BAD_LINES
    with pytest.raises(DataError, match="no column 'prompt' in any row"):
        read_jsonl(str(path), required=("prompt",))


def test_load_rows_parquet(tmp_path):
    import pandas as pd
    path = tmp_path / "d.parquet"
    pd.DataFrame({"problem": ["a", "b", "c"], "answer": ["1", None, "3"], "extra": [1, 2, 3]}).to_parquet(
        path, index=False)
    rows, stats = load_rows(str(path))
    assert stats == {"rows": 2, "skipped_no_answer": 1, "skipped_no_problem": 0}
    assert rows[1] == {"id": "train-2", "problem": "c", "answer": "3", "extra": 3}


@needs_shared_data
def test_load_rows_math500():
    rows, stats = load_rows(str(MATH500), split="test")
    assert stats == {"rows": 500, "skipped_no_answer": 0, "skipped_no_problem": 0, "skipped_bad_json": 0,
                     "bad_lines": []}
    assert len({r["id"] for r in rows}) == 500
    assert all(isinstance(r["answer"], str) and r["answer"] and r["problem"] for r in rows)
    assert "solution" in rows[0]  # other columns travel along


# ------------------------------------------------------------------------------------------------ prompting

def test_render_prompt_chat_template(tok):
    text = render_prompt(tok, "What is 2 + 3?", "Use \\boxed{}.", suffix=" Think.")
    assert "Use \\boxed{}." in text and "What is 2 + 3? Think." in text
    assert text.endswith("<|im_start|>assistant\n")
    assert text.index("Use \\boxed{}.") < text.index("What is 2 + 3?")
    assert "<|im_start|>assistant" in render_prompt(tok, "Q", None)


def test_render_prompt_without_chat_template():
    class Plain:
        chat_template = None
    assert render_prompt(Plain(), "Q?", "SYS") == "SYS\n\nQ?\n"
    assert render_prompt(Plain(), "Q?", None, suffix="!") == "Q?!\n"


def test_filter_long_prompts(tok):
    rows = [{"id": str(i)} for i in range(3)]
    prompts = [render_prompt(tok, p, "S") for p in ("short", "word " * 200, "also short")]
    limit = len(tok(prompts[0], add_special_tokens=False)["input_ids"]) + 5
    kept_rows, kept_prompts, dropped = filter_long_prompts(rows, prompts, tok, limit)
    assert dropped == 1
    assert [r["id"] for r in kept_rows] == ["0", "2"] and kept_prompts == [prompts[0], prompts[2]]


# -------------------------------------------------------------------------------------------------- sampler

ROWS = [{"id": str(i)} for i in range(10)]


def _ids(batch):
    return [r["id"] for r in batch]


def test_sampler_covers_each_row_once_per_epoch():
    s = PromptSampler(ROWS, seed=0)
    stream = _ids(s.next_batch(3) + s.next_batch(3) + s.next_batch(3) + s.next_batch(3) + s.next_batch(8))
    epoch0, epoch1 = stream[:10], stream[10:]
    assert sorted(epoch0) == sorted(epoch1) == sorted(_ids(ROWS))
    assert epoch0 != epoch1  # reshuffled per epoch
    assert s.epoch == 2


def test_sampler_no_shuffle_is_identity_order():
    s = PromptSampler(ROWS, seed=0, shuffle=False)
    assert _ids(s.next_batch(4)) == ["0", "1", "2", "3"]
    assert _ids(s.next_batch(8)) == ["4", "5", "6", "7", "8", "9", "0", "1"]
    assert s.epoch == 1


def test_sampler_resume_matches_uninterrupted():
    a = PromptSampler(ROWS, seed=5)
    for _ in range(3):
        a.next_batch(3)
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint round trip
    b = PromptSampler(ROWS, seed=5)
    b.load_state_dict(state)
    expected = [_ids(a.next_batch(3)) for _ in range(5)]  # 9..24: crosses the epoch 0->1 and 1->2 boundaries
    assert [_ids(b.next_batch(3)) for _ in range(5)] == expected
    assert a.epoch == b.epoch == 2
    with pytest.raises(DataError):
        PromptSampler(ROWS[:5], seed=5).load_state_dict(state)

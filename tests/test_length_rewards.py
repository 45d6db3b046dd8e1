"""Length-control baselines (rewards/length.py) on hand-made groups, with the real math-verify as the verifier."""
import math

import pytest

from rewards import resolve

RIGHT, WRONG = r"so \boxed{7}", r"so \boxed{8}"


def call(name, completions, tokens, **kw):
    n = len(completions)
    kw.setdefault("answer", ["7"] * n)
    return resolve(name)(["q"] * n, completions, completion_tokens=tokens, **kw)


def test_kimi_length_per_group():
    # group 0: lengths 10..40, last two wrong; group 1: equal lengths -> all 0
    out = call("kimi_length", [RIGHT, RIGHT, WRONG, WRONG, RIGHT, WRONG], [10, 20, 30, 40, 5, 5],
               group_id=[0, 0, 0, 0, 1, 1])
    # lambda = 0.5 - (L - 10) / 30 -> 0.5, 1/6, -1/6, -0.5; wrong ones get min(0, lambda)
    assert out == pytest.approx([0.5, 1 / 6, -1 / 6, -0.5, 0.0, 0.0])
    # a short wrong answer is not rewarded for being short
    assert call("kimi_length", [WRONG, RIGHT], [10, 20], group_id=[0, 0]) == pytest.approx([0.0, -0.5])


def test_groups_fall_back_to_prompt_text():
    f = resolve("kimi_length")
    out = f(["a", "a", "b", "b"], [RIGHT] * 4, completion_tokens=[10, 20, 100, 300], answer=["7"] * 4)
    assert out == pytest.approx([0.5, -0.5, 0.5, -0.5])


def test_l1_exact_and_max():
    out = call("l1_exact", [RIGHT, WRONG, RIGHT], [100, 100, 400], target_tokens=[100, 100, 200])
    assert out == pytest.approx([1.0, 0.0, 1.0 - 0.0003 * 200])
    out = call("l1_max", [RIGHT, RIGHT, RIGHT, WRONG], [100, 1000, 3000, 50], target_tokens=[2000] * 4)
    # clip(0.0003 * (2000 - n) + 0.5, 0, 1): 1.07 -> 1; 0.8; 0.2; wrong -> 0
    assert out == pytest.approx([1.0, 0.8, 0.2, 0.0])
    # the target column is configurable, and a missing one is a clear error
    assert call("l1_max", [RIGHT], [10], budget=[10], target_column="budget") == [0.5]
    with pytest.raises(ValueError, match="target_tokens"):
        call("l1_exact", [RIGHT], [10])


def test_shorter_better():
    out = call("shorter_better", [RIGHT, RIGHT, WRONG], [50, 80, 20], group_id=[0, 0, 0])
    # SOL = shortest correct = 50: 2 - 0, 2 - 0.03, 0 - 0.03
    assert out == pytest.approx([2.0, 2.0 - 0.03, -0.03])
    out = call("shorter_better", [WRONG, WRONG], [10, 30], group_id=[0, 0])
    assert out == pytest.approx([-0.01, -0.01])  # no correct answer: SOL = mean length 20


def test_efficient_reasoning():
    out = call("efficient_reasoning", [RIGHT, RIGHT, WRONG, RIGHT], [10, 30, 5, 60], group_id=[0] * 4,
               finish_reason=["stop", "stop", "stop", "length"])
    # correct and finished: lengths 10, 30 -> mean 20, population std 10; truncated and wrong score 0
    sig = lambda z: 1 / (1 + math.exp(-z))
    assert out == pytest.approx([1 - 0.1 * sig(-1), 1 - 0.1 * sig(1), 0.0, 0.0])
    assert call("efficient_reasoning", [WRONG, WRONG], [1, 2], group_id=[0, 0]) == [0.0, 0.0]


def test_dapo_overlong():
    out = call("dapo_overlong", [RIGHT] * 4, [60, 70, 80, 90], max_tokens=80, cache_tokens=20)
    assert out == pytest.approx([0.0, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="cache_tokens"):
        call("dapo_overlong", [RIGHT], [1], max_tokens=10, cache_tokens=20)


def test_other_verifier_can_define_correctness():
    # last_number: "... = 7" counts as right without a box
    out = call("shorter_better", ["3 + 4 = 7", "3 + 4 = 7 indeed 7"], [5, 9], group_id=[0, 0], correct="last_number")
    assert out == pytest.approx([2.0, 2.0 - 0.004])

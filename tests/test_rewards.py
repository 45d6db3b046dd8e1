"""Built-in math rewards (real math-verify, main thread) and reward spec resolution. Fast, no Ray."""
import sys
import textwrap

import pytest

import rewards
from rewards import REGISTRY, RewardSpecError, register, resolve
from rewards.math import boxed_format, last_boxed, math_verify


def mv(pred: str, gold: str) -> float:
    return math_verify(["p"], [pred], answer=[gold])[0]


# ------------------------------------------------------------------------------------------------- last_boxed
def test_last_boxed_nested_and_last_wins():
    assert last_boxed(r"so \boxed{\frac{a}{b}} done") == r"\frac{a}{b}"
    assert last_boxed(r"first \boxed{1}, then \boxed{2}, finally \fbox{3}") == "3"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces are not grouping
    assert last_boxed(r"\boxed {7}") == "7"


def test_last_boxed_absent_or_unbalanced():
    assert last_boxed("the answer is 5") is None
    assert last_boxed(r"\boxed{1} and then \boxed{\frac{1}{2}") is None  # truncated last box: no answer
    assert last_boxed(None) is None


# ------------------------------------------------------------------------------------------------ math_verify
@pytest.mark.parametrize("pred,gold", [
    (r"The answer is $\boxed{\frac{1}{2}}$.", "0.5"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
    (r"\boxed{(1,2)}", "(1, 2)"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{[1,2)}", "[1, 2)"),
    (r"\boxed{0.5}", r"$\frac{1}{2}$"),  # gold already in $...$ is left alone
    (r"\boxed{0.5}", r"\boxed{\frac{1}{2}}"),  # ... and so is a boxed gold
    (r"draft \boxed{3} no wait \boxed{4}", "4"),  # the last box is the answer
])
def test_math_verify_equivalent(pred, gold):
    assert mv(pred, gold) == 1.0


@pytest.mark.parametrize("pred,gold", [
    (r"\boxed{48}", "47"),
    ("12 + 35 = 47", "47"),  # no box -> 0 even if the number is right
    (r"\boxed{(1,2)}", "[1,2)"),  # open vs half-open interval
    (r"\boxed{4} no wait \boxed{3}", "4"),
    (r"\boxed{}", "0"),
    (r"\boxed{5}", ""),  # gold that does not parse never scores 1
    (r"\boxed{}", r"\text{}"),
    (r"\boxed{5}", None),
])
def test_math_verify_not_equivalent(pred, gold):
    assert mv(pred, gold) == 0.0


def test_math_verify_batch_extra_columns_and_conversational():
    comps = [r"\boxed{1}", r"\boxed{2}", [{"role": "assistant", "content": r"\boxed{3}"}]]
    out = math_verify(["a", "b", "c"], comps, answer=["1", "3", 3], level=[1, 2, 3], other=["x"] * 3)
    assert out == [1.0, 0.0, 1.0]


def test_boxed_format():
    comps = [r"\boxed{x}", r"\boxed{ }", "no box", r"\boxed{1} \boxed{2", r"\fbox{\frac{1}{2}}"]
    assert boxed_format(["p"] * 5, comps, answer=["1"] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------------- resolve
def test_builtins_registered():
    assert REGISTRY["math_verify"] is math_verify and REGISTRY["boxed_format"] is boxed_format
    assert resolve("math_verify") is math_verify
    assert resolve(" boxed_format ") is boxed_format


def test_register_conflict():
    @register("_test_tmp_reward")
    def f(prompts, completions, **kw):
        return [1.0] * len(completions)

    try:
        assert resolve("_test_tmp_reward") is f
        with pytest.raises(ValueError, match="already registered"):
            register("_test_tmp_reward")(lambda p, c, **kw: [])
    finally:
        REGISTRY.pop("_test_tmp_reward")


def test_resolve_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_reward_mod.py").write_text(textwrap.dedent("""
        NOT_CALLABLE = 3
        def length(prompts, completions, **kw):
            return [float(len(c)) for c in completions]
        class R:
            @staticmethod
            def one(prompts, completions, **kw):
                return [1.0] * len(completions)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_reward_mod", raising=False)
    fn = resolve("my_reward_mod:length")
    assert fn(["p", "q"], ["ab", "c"], answer=["1", "2"]) == [2.0, 1.0]
    assert resolve("my_reward_mod:R.one")(["p"], ["x"]) == [1.0]
    with pytest.raises(RewardSpecError, match="has no attribute 'nope'"):
        resolve("my_reward_mod:nope")
    with pytest.raises(RewardSpecError, match="not callable"):
        resolve("my_reward_mod:NOT_CALLABLE")


def test_resolve_file_path(tmp_path, monkeypatch):
    f = tmp_path / "sub" / "rw.py"
    f.parent.mkdir()
    f.write_text("def half(prompts, completions, **kw):\n    return [0.5] * len(completions)\n")
    assert resolve(f"{f}:half")(["p"], ["c"]) == [0.5]
    monkeypatch.chdir(tmp_path)  # relative paths are taken against the cwd
    assert resolve("sub/rw.py:half")(["p"], ["c"]) == [0.5]
    with pytest.raises(RewardSpecError, match="no attribute 'missing'"):
        resolve("sub/rw.py:missing")


def test_resolve_errors(tmp_path):
    with pytest.raises(RewardSpecError, match=r"unknown reward 'nope'; known names: boxed_format, .*kimi_length, .*math_verify, shorter_better"):
        resolve("nope")
    with pytest.raises(RewardSpecError, match="cannot import module 'no_such_module_xyz'"):
        resolve("no_such_module_xyz:fn")
    with pytest.raises(RewardSpecError, match="file not found"):
        resolve(f"{tmp_path}/missing.py:fn")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('broken at import')\n")
    with pytest.raises(RewardSpecError, match="broken at import"):
        resolve(f"{bad}:fn")
    with pytest.raises(RewardSpecError, match="expected 'module:function'"):
        resolve("rewards.math:")
    with pytest.raises(RewardSpecError, match="non-empty string"):
        resolve("")
    assert issubclass(RewardSpecError, ValueError)
    assert rewards.resolve("rewards.math:last_boxed") is last_boxed


def test_exact_match_requires_the_value_itself():
    from rewards.math import exact_match, math_verify

    completions = ["11 + 11 = \\boxed{22}", "\\boxed{ 22. }", "\\boxed{11 + 11}", "\\boxed{23}", "22", "\\boxed{$22$}",
                   "\\boxed{1,234}"]
    gold = ["22", "22", "22", "22", "22", "22", "1234"]
    assert exact_match(None, completions, answer=gold) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    # The reason it exists: math_verify evaluates the boxed expression, so copying the question scores.
    assert math_verify(None, ["\\boxed{11 + 11}"], answer=["22"]) == [1.0]
    assert exact_match(None, ["\\boxed{}"], answer=[""]) == [0.0]


def test_last_number_gives_credit_for_the_value_in_any_format():
    from rewards.math import last_number

    completions = ["21 + 22 = 43", "The answer is \\boxed{43}.", "43 is it, or maybe 44", "no number", "-5", "1,234.0"]
    gold = ["43", "43", "43", "43", "-5", "1234"]
    assert last_number(None, completions, answer=gold) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert last_number(None, ["x = 2"], answer=["\\frac{1}{2}"]) == [0.0]  # non-numeric gold: no credit


def test_a_gold_parse_that_failed_once_is_tried_again(monkeypatch):
    """A gold whose parse came back empty (math-verify's timeout under load) is not remembered as unparseable."""
    import rewards.math as rm

    real, calls = rm.parse_answer, []

    def flaky(text, extraction):
        calls.append(text)
        return [] if len(calls) == 1 else real(text, extraction)

    monkeypatch.setattr(rm, "parse_answer", flaky)
    gold = "\\frac{7}{13}"  # not parsed by any earlier test in this process
    assert math_verify(None, ["\\boxed{7/13}"], [gold]) == [0.0]  # the "timed out" parse
    assert math_verify(None, ["\\boxed{7/13}"], [gold]) == [1.0]
    assert math_verify(None, ["\\boxed{7/13}"], [gold]) == [1.0] and len(calls) == 2  # now cached

"""IsolatedRewards: reward functions in a child process (real math-verify, real crashes/hangs, no mocks)."""
import logging
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.processes import wait_for_pid_file

from rewards.isolation import IsolatedRewards, RewardResult, weighted_total
from rewards.math import boxed_format, math_verify

FAULTS = str(Path(__file__).resolve().parent / "fixtures" / "fault_paths.py")

BAD_REWARDS = textwrap.dedent('''
    import math, os, time

    def boom(prompts, completions, **kw):
        if any("BOOM" in c for c in completions):
            raise RuntimeError("boom in reward")
        return [1.0] * len(completions)

    def weird(prompts, completions, **kw):
        table = {"NAN": math.nan, "INF": math.inf, "NONE": None, "STR": "x", "INT": 3}
        return [table.get(c, 1.0) for c in completions]

    def wrong_len(prompts, completions, **kw):
        return [1.0] * (len(completions) + 1)

    def not_a_list(prompts, completions, **kw):
        return 1.0

    def die(prompts, completions, **kw):
        if any("EXIT" in c for c in completions):
            os._exit(1)
        return [1.0] * len(completions)

    def scaled(prompts, completions, answer, scale=1.0, **kw):
        return [scale * float(c == a) for c, a in zip(completions, answer)]
''')


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    path = tmp_path_factory.mktemp("rw") / "bad_rewards.py"
    path.write_text(BAD_REWARDS)
    return lambda fn: f"{path}:{fn}"


def test_exception_only_failing_samples_zero(bad, caplog):
    with IsolatedRewards([(bad("boom"), {}), (bad("weird"), {}), (bad("wrong_len"), {}), (bad("not_a_list"), {})],
                         timeout=20) as iso:
        comps = ["a", "BOOM", "NAN", "NONE", "INF", "STR", "INT"]
        with caplog.at_level(logging.WARNING, logger="reasonrl.rewards"):
            res = iso.score(["p"] * 7, comps, {"answer": ["1"] * 7})
    b, w, wl, nl = (bad(n) for n in ("boom", "weird", "wrong_len", "not_a_list"))
    assert res.scores[b] == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert res.failures[b] == 1 and res.timeouts[b] == 0
    # NaN, inf, "x" are failures; None is "not applicable": 0.0 but not a failure; an int is a fine score.
    assert res.scores[w] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 3.0]
    assert res.failures[w] == 3 and res.nones[w] == 1
    assert res.scores[wl] == [0.0] * 7 and res.failures[wl] == 7
    assert res.scores[nl] == [0.0] * 7 and res.failures[nl] == 7
    assert any("boom in reward" in e for e in res.errors)
    assert any("non-finite" in e for e in res.errors) and any("8 values for 7" in e for e in res.errors)
    assert any("boom in reward" in r.getMessage() for r in caplog.records)


def test_hang_is_killed_and_worker_recovers(tmp_path):
    """Checked by what happened, not by the clock (a loaded machine stretches any time bound): the call log shows
    each hang cut once, by killing its process, and the retry going sample by sample."""
    calls = tmp_path / "calls"
    name = f"{FAULTS}:log_calls"
    iso = IsolatedRewards([(name, {"log_file": str(calls)})], timeout=2)
    try:
        res = iso.score(["p"] * 5, ["a", "bb", "HANG", "dddd", "eeeee"], {})
        assert res.scores[name] == [1.0, 2.0, 0.0, 4.0, 5.0]
        assert res.timeouts[name] == 1 and res.failures[name] == 1
        log = [line.split() for line in calls.read_text().splitlines()]
        # (samples, hangs) per call: the whole chunk, then one by one; the hanging sample once more, not again.
        assert [(int(n), int(h)) for _, n, h in log] == [(5, 1), (1, 0), (1, 0), (1, 1), (1, 0), (1, 0)]
        pids = [pid for pid, _, _ in log]
        # Each hung process was killed and replaced (had it been waited out, the next call would share its pid).
        assert pids[0] != pids[1] == pids[2] == pids[3] != pids[4] == pids[5]
        res2 = iso.score(["p"] * 2, ["x", "yy"], {})  # the respawned worker keeps serving
        assert res2.scores[name] == [1.0, 2.0] and res2.failures[name] == 0
    finally:
        iso.close()


def test_child_death_handled(bad):
    # timeout=None: no time limit at all, but a dead worker still reads as EOF instead of blocking forever.
    with IsolatedRewards([(bad("die"), {}), (bad("boom"), {})], timeout=None) as iso:
        res = iso.score(["p"] * 3, ["a", "EXIT", "c"], {})
        assert res.scores[bad("die")] == [1.0, 0.0, 1.0]
        assert res.failures[bad("die")] == 1 and res.timeouts[bad("die")] == 0
        assert res.scores[bad("boom")] == [1.0, 1.0, 1.0]  # the next function runs on a fresh worker
        assert any("died" in e for e in res.errors)


def test_kwargs_columns_chunks_and_weights(bad):
    specs = [(bad("scaled"), {"scale": 2.0}), (bad("scaled"), {}), ("boxed_format", {})]
    with IsolatedRewards(specs, timeout=20, chunk_size=2) as iso:
        res = iso.score(["p"] * 5, ["1", "2", r"\boxed{3}", "4", "x"],
                        {"answer": ["1", "0", r"\boxed{3}", "4", "5"], "level": [1] * 5})
    s = bad("scaled")
    assert list(res.scores) == [s, f"{s}#2", "boxed_format"]  # same spec twice: unique names
    assert res.scores[s] == [2.0, 0.0, 2.0, 2.0, 0.0]
    assert res.scores[f"{s}#2"] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert weighted_total(res, {s: 0.5, "boxed_format": 10.0}) == [2.0, 0.0, 12.0, 2.0, 0.0]
    assert all(v >= 0 for v in res.seconds.values()) and not res.errors
    with pytest.raises(ValueError, match="unknown reward functions"):
        weighted_total(res, {"typo": 1.0})
    assert weighted_total(RewardResult()) == []


def test_bad_spec_raises_at_start():
    from rewards import RewardSpecError
    iso = IsolatedRewards([("no_such_reward", {})], timeout=5)
    with pytest.raises(RewardSpecError, match="unknown reward 'no_such_reward'"):
        iso.start()
    iso.close()


def test_math_verify_isolated_matches_direct_even_from_a_thread():
    comps = [r"\boxed{\frac{1}{2}}", r"\boxed{2\sqrt{2}}", r"\boxed{(1,2)}", r"\boxed{48}", "47",
             r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\boxed{[1,2)}", r"\boxed{5}"]
    gold = ["0.5", r"\sqrt{8}", "(1, 2)", "47", "47", r"\left( 3, \frac{\pi}{2} \right)", "[1, 2)", ""]
    prompts = ["p"] * len(comps)
    direct = math_verify(prompts, comps, answer=gold)
    assert direct == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    out = {}
    with IsolatedRewards([("math_verify", {}), ("boxed_format", {})], timeout=30) as iso:
        # math-verify raises off the main thread; through the worker it runs in the child's main thread.
        t = threading.Thread(target=lambda: out.setdefault("res", iso.score(prompts, comps, {"answer": gold})))
        t.start()
        t.join(60)
    res = out["res"]
    assert res.scores["math_verify"] == direct and res.failures["math_verify"] == 0
    assert res.scores["boxed_format"] == boxed_format(prompts, comps)


def test_hung_child_dies_with_its_parent(tmp_path):
    """kill -9 of the process that owns the rewards (e.g. a reward actor) must not leave a hung child behind."""
    import subprocess
    import sys
    import textwrap

    pid_file = tmp_path / "reward-pid"
    root = str(Path(__file__).resolve().parent.parent)
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys; sys.path.insert(0, {root!r})
        from rewards.isolation import IsolatedRewards
        IsolatedRewards([({FAULTS!r} + ":hang_and_report", {{"pid_file": {str(pid_file)!r}}})],
                        timeout=None).score(["p"], ["c"], {{}})
    """)])
    try:
        # The reward itself says it is hanging, and where: not a guess among the owner's children (the spawn
        # context's resource tracker is one too, and it exits on its own).
        child = wait_for_pid_file(pid_file, owner)
        assert open(f"/proc/{child}/stat").read().split()[3] == str(owner.pid)  # the owner's reward process
    finally:
        owner.kill()
        owner.wait()

    def alive(pid):
        try:
            return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 60  # the kernel's SIGKILL (PR_SET_PDEATHSIG) comes at once; this only bounds a failure
    while time.time() < deadline and alive(child):
        time.sleep(0.1)
    assert not alive(child)

"""One record per sample (rl/steps/samples.py) and the filters that set its keep flag (rl/steps/filters.py)."""
import pytest

from rewards.isolation import RewardResult
from rl.contracts import RolloutBatch
from rl.scoring.score import ScoredBatch
from rl.steps.filters import drop_constant_groups, drop_truncated
from rl.steps.samples import StepSamples


def _batch(sizes, finish=None):
    batch = RolloutBatch()
    for g, n in enumerate(sizes):
        for j in range(n):
            k = len(batch)
            batch.append([g, g], [j] * (1 + j), [-0.5] * (1 + j), 0.1 * k, (finish or {}).get(k, "stop"), f"g{g}s{j}",
                         {"forwards": 1, "drafted": 2, "accepted": 1} if k == 0 else None)
    return batch


def _rows(n):
    return [{"id": f"q{g}", "prompt": f"P{g}"} for g in range(n)]


def _scored(total, correct=None):
    correct = correct if correct is not None else [0.0] * len(total)
    return ScoredBatch(list(total), correct, RewardResult({"a": list(total), "b": [0.0] * len(total)}, {"a": 1},
                                                          {"a": 1}, {}, {"a": 0.5}, ["boom"]))


def test_records_follow_the_rollout_and_give_it_back():
    batch = _batch([2, 3, 1])
    samples = StepSamples.build(_rows(3), [2, 3, 1], batch)
    assert samples.sizes() == [2, 3, 1] and samples.group_index() == [0, 0, 1, 1, 1, 2]
    assert [s.prompt_id for s in samples.samples] == ["q0", "q0", "q1", "q1", "q1", "q2"]
    assert samples.batch() == batch  # the wire format again, field for field
    with pytest.raises(ValueError):
        StepSamples.build(_rows(3), [2, 3], batch)  # a size per row
    with pytest.raises(ValueError):
        StepSamples.build(_rows(3), [2, 3, 2], batch)  # the sizes add up to the samples


def test_scores_are_written_into_the_records():
    samples = StepSamples.build(_rows(2), [2, 2], _batch([2, 2]))
    samples.add_scores(_scored([1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 1.0]))
    assert samples.totals() == [1.0, 2.0, 3.0, 4.0] and samples.verdicts() == [1.0, 0.0, 0.0, 1.0]
    assert samples.samples[2].rewards == {"a": 3.0, "b": 0.0} and samples.reward_names() == ["a", "b"]
    assert samples.reward_log.failures == {"a": 1} and samples.reward_log.scores == {}
    with pytest.raises(ValueError):
        samples.add_scores(_scored([1.0]))


def test_take_and_concat_renumber_groups_and_copy_records():
    a = StepSamples.build(_rows(2), [2, 3], _batch([2, 3]))
    a.add_scores(_scored([0.0, 1.0, 2.0, 3.0, 4.0]))
    b = StepSamples.build([{"id": "q9", "prompt": "P9"}], [1], _batch([1]))
    b.add_scores(_scored([9.0]))
    both = StepSamples.concat([a, b])
    assert both.sizes() == [2, 3, 1] and [r["id"] for r in both.rows] == ["q0", "q1", "q9"]
    assert both.totals() == [0.0, 1.0, 2.0, 3.0, 4.0, 9.0]
    assert both.reward_log.failures == {"a": 2} and both.reward_log.errors == ["boom", "boom"]
    part = both.take([2, 0])
    assert part.sizes() == [1, 2] and part.group_index() == [0, 1, 1] and part.totals() == [9.0, 0.0, 1.0]
    assert part.reward_log is both.reward_log  # the scoring calls' counts stay the step's
    part.samples[0].advantage, part.samples[0].keep = 1.5, False
    assert both.samples[5].advantage is None and both.samples[5].keep  # a copy: later stages write into their own


def test_dynamic_sampling_drops_whole_constant_groups():
    samples = StepSamples.build(_rows(3), [2, 3, 2], _batch([2, 3, 2]))
    samples.add_scores(_scored([0.3, 0.1 + 0.2, 0.0, 1.0, 0.0, 5.0, 5.0]))
    variances = drop_constant_groups(samples, 1e-6)
    assert variances[0] < 1e-20 and variances[1] == pytest.approx(2 / 9) and variances[2] == 0.0
    assert [s.keep for s in samples.samples] == [False, False, True, True, True, False, False]
    assert samples.kept_groups() == [1]


def test_overlong_filter_takes_truncated_samples_out_of_the_loss_only():
    samples = StepSamples.build(_rows(2), [2, 2], _batch([2, 2], finish={1: "length", 2: "length"}))
    assert drop_truncated(samples) == {"overlong_filtered": 2}
    assert [s.keep for s in samples.samples] == [True, False, False, True]
    assert samples.kept_groups() == [0, 1]  # a sample filter drops no group

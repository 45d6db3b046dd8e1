"""Filters over a step's samples: which groups and samples it trains on, as stages that set `Sample.keep`.

A filter never builds index lists or copies; it clears the keep flag of the records it drops and returns what the
metrics row (or the caller) needs. Where a filter runs decides what dropping means:
- a GROUP filter runs between scoring and advantages; the step then trains on the groups with a sample left
  (StepSamples.kept_groups), so a dropped group is out of the baseline, the metrics and the loss. DAPO's dynamic
  sampling is one (rl/steps/adaptive.py runs it on every drawn round, because the draw loop counts what is left).
- a SAMPLE filter runs after advantages; a dropped sample still entered its group's baseline and the step's
  metrics, and only leaves the loss. DAPO's overlong filter is one (PolicyGradientStep.sample_filters).
A new filter: a function here, called at the place whose meaning it needs.
"""
from __future__ import annotations

from rl.algo.groups import group_variances, is_varying
from rl.steps.samples import StepSamples


def drop_constant_groups(samples: StepSamples, min_variance: float) -> list[float]:
    """DAPO dynamic sampling (Yu et al. 2025, section 3.2): a group whose rewards do not vary (variance at most
    `min_variance`, rl.algo.groups.is_varying) has zero advantage and teaches nothing, so all of its samples are
    dropped. Returns every group's reward variance, in order: the draw loop (rl.algo.groups.dynamic_sampling)
    counts the varying groups by the same test, and the step logs them."""
    variances = group_variances(samples.totals(), samples.sizes())
    for members, variance in zip(samples.groups(), variances):
        if not is_varying(variance, min_variance):
            for s in members:
                s.keep = False
    return variances


def drop_truncated(samples: StepSamples) -> dict:
    """DAPO overlong filtering (section 3.4): a truncated response is not known to be wrong, only unfinished, so its
    reward is noise for the loss; it leaves the loss and its token denominators. Run after advantages: its reward
    has already entered its group's baseline, which it keeps (tests/test_dapo_gspo.py pins this)."""
    dropped = 0
    for s in samples.samples:
        if s.finish_reason == "length":
            s.keep = False
            dropped += 1
    return {"overlong_filtered": dropped}


__all__ = ["drop_constant_groups", "drop_truncated"]

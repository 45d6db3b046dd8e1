"""DAPO's dynamic sampling and overlong filtering, and GSPO's sequence-level ratio, against hand computation."""
import math
from types import SimpleNamespace

import pytest
import torch

from rl.algo.core import importance_log_weights, policy_loss
from rl.config.schema import ConfigError, load_config
from rl.algo.groups import dynamic_sampling, group_variances, is_varying

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# -------------------------------------------------------------------------------------------- dynamic sampling
def _drawer(groups):
    """draw(k) over a fixed list of hand-made reward groups (size 4), recording how many were asked each round."""
    asked, it = [], iter(groups)

    def draw(k):
        asked.append(k)
        return group_variances([r for _ in range(k) for r in next(it)], [4] * k)
    return draw, asked


def test_constant_is_a_variance_threshold_not_equality():
    # Float rewards equal up to rounding are constant (GRPO's std scaling would turn the noise into +-1 advantages);
    # a real continuous spread is not.
    noisy = [0.1 + 0.2, 0.3, 0.30000000000000004, 0.3 + 1e-12]
    assert len(set(noisy)) > 1 and not is_varying(group_variances(noisy, [4])[0], 1e-6)
    assert is_varying(group_variances([0.30, 0.31, 0.30, 0.32], [4])[0], 1e-6)
    assert group_variances([1.0, 0.0, 1.0, 2.0, 5.0], [2, 3]) == [pytest.approx(0.25), pytest.approx(26 / 9)]
    assert group_variances([3.0], [1]) == [0.0]


def test_dynamic_sampling_fills_the_step_with_varying_groups():
    const, vary = [1.0] * 4, [0.0, 1.0, 0.0, 0.0]
    cont = [0.5, 0.52, 0.5, 0.5]  # continuous rewards: varies
    draw, asked = _drawer([const, vary, const,  # round 1: 3 drawn, 1 kept
                           cont, const,  # round 2: the 2 missing drawn, 1 kept
                           vary])  # round 3: the 1 missing
    sel = dynamic_sampling(draw, need=3, max_extra=10, min_variance=1e-6)
    assert asked == [3, 2, 1]
    assert sel.kept == [1, 3, 5] and sel.dropped == [0, 2, 4]
    assert (sel.rounds, sel.drawn, sel.capped) == (3, 6, False)


def test_dynamic_sampling_stops_at_its_cap():
    const = [0.25] * 4
    draw, asked = _drawer([const, [0.0, 1.0, 1.0, 1.0], const, const, const, const])
    sel = dynamic_sampling(draw, need=2, max_extra=3, min_variance=1e-6)
    # Round 1 draws 2 (one varies), then one at a time: at most 3 extra groups in all.
    assert asked == [2, 1, 1, 1] and sel.drawn == 5
    assert sel.kept == [1] and sel.dropped == [0, 2, 3, 4] and sel.capped
    draw, asked = _drawer([const, const])
    sel = dynamic_sampling(draw, need=2, max_extra=0, min_variance=1e-6)
    assert asked == [2] and sel.kept == [] and sel.capped  # no extra draws allowed: the step has no varying group
    draw, asked = _drawer([[0.0, 1.0, 0.0, 1.0]] * 2)
    sel = dynamic_sampling(draw, need=2, max_extra=0, min_variance=1e-6)
    assert sel.kept == [0, 1] and not sel.capped


# ---------------------------------------------------------------------------------------------- overlong filter
class _Learner:
    def __init__(self):
        self.calls = []

    def train(self, sequences, mini_batches, max_len, on_policy=True):
        self.calls.append(sequences)
        from rl.steps.policy import NO_UPDATE

        return {**NO_UPDATE, "loss": 1.0, "ratio_sum": float(len(sequences)), "tokens": float(len(sequences)),
                "grad_norm": 1.0, "lr": 1e-4, "logprob_diff_tokens": 1.0}


def _step_run(cfg, finish, rewards):
    """PolicyGradientStep.run end to end (rollout -> scoring -> the configured advantages -> filter -> learner) on
    hand-made rollouts: one prompt per group of 4, sample i finishing with finish[i] and scoring rewards[i]."""
    from rl.contracts import RolloutBatch
    from rl.scoring.score import ScoredBatch
    from rewards.isolation import RewardResult
    from rl.steps.base import Draw
    from rl.steps.policy import PolicyGradientStep

    def generate(prompts, params, seed):
        out = RolloutBatch()
        for i in range(len(prompts) * params.n):
            out.append([1], [2, 3], [-0.5, -0.5], 0.0, finish[i], "ab")
        return out

    learner = _Learner()
    run = SimpleNamespace(cfg=cfg, learner=learner, sync=lambda: None, updated=lambda s: None, generate=generate,
                          score=lambda rows, batch, sizes: ScoredBatch(list(rewards), [0.0] * len(rewards),
                                                                       RewardResult({"r": list(rewards)})),
                          metrics=SimpleNamespace(log_event=lambda *a: None))
    step = PolicyGradientStep(cfg)
    step.start(run)
    row = step.run(run, 1, Draw([{"prompt": "p", "id": f"q{g}"} for g in range(len(rewards) // 4)], {}))
    step.finish(run)
    return row, learner.calls


def test_overlong_filter_masks_truncated_responses():
    """Truncated responses leave the loss but their rewards stay in their group's baseline: group 0's two finished
    responses (rewards 1 and 3) sit below the group mean 4 that the two truncated ones (6, 6) lift, so both train
    with negative advantages; a baseline over the kept samples alone would give them -0.71 and +0.71."""
    cfg = load_config(None, ["algorithm.overlong_filter=true", "logging.sample_every=0", "rollout.group_size=4"])
    finish = ["stop", "length", "stop", "length"] + ["stop"] * 4
    rewards = [1.0, 6.0, 3.0, 6.0, 0.0, 1.0, 2.0, 3.0]
    row, calls = _step_run(cfg, finish, rewards)
    assert row["overlong_filtered"] == 2 and len(calls) == 1 and len(calls[0]) == 6
    std0 = math.sqrt((9 + 4 + 1 + 4) / 3)  # unbiased, over the whole group
    std1 = math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3)
    expected = [-3 / std0, -1 / std0] + [x / std1 for x in (-1.5, -0.5, 0.5, 1.5)]
    assert [s.advantage for s in calls[0]] == pytest.approx(expected, rel=1e-5)
    # Every response truncated: no update at all.
    row, calls = _step_run(cfg, ["length"] * 8, rewards)
    assert calls == [] and row["loss"] == 0.0 and row["grad_norm"] == 0.0 and row["overlong_filtered"] == 8
    # Filter off: all 8 train, with the same advantages for the samples both runs keep.
    off = load_config(None, ["logging.sample_every=0", "rollout.group_size=4"])
    row, calls = _step_run(off, finish, rewards)
    assert "overlong_filtered" not in row and len(calls[0]) == 8
    assert [calls[0][i].advantage for i in (0, 2, 4, 5, 6, 7)] == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- GSPO
def _batch():
    """Two responses (3 and 2 tokens, one padded position), log pi - log pi_old chosen by hand."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]], dtype=torch.float64)
    d = torch.tensor([[0.001, -0.0005, 0.0008], [0.002, 0.001, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    new = (old + d).clone().requires_grad_(True)
    return new, old, mask, torch.tensor([1.0, 2.0], dtype=torch.float64)


def _loss_and_grad(level, agg, on_policy=False, clip=(3e-4, 4e-4)):
    new, old, mask, adv = _batch()
    loss, stats = policy_loss(new, new.detach() if on_policy else old, adv, mask, clip_low=clip[0],
                              clip_high=clip[1], loss_agg=agg, num_tokens=5, num_seqs=2, max_len=3,
                              importance_sampling_level=level)
    loss.backward()
    return loss.detach(), new.grad, stats


def test_gspo_sequence_ratio_and_clip_by_hand():
    s0 = math.exp((0.001 - 0.0005 + 0.0008) / 3)  # 1.000433: above 1 + 4e-4, clipped (A > 0)
    s1 = math.exp((0.002 + 0.001) / 2)  # 1.0015: clipped too
    new, old, mask, _ = _batch()
    w = importance_log_weights(torch.where(mask.bool(), new - old, 0.0), new, mask, "sequence").exp()
    assert w[0, :3].tolist() == pytest.approx([s0] * 3, abs=1e-12) and w[1, :2].tolist() == pytest.approx([s1] * 2)
    # Wider clip range: seq 0 inside, seq 1 clipped. Loss (seq-mean-token-mean) = mean_i -min(s_i A_i, clip(s_i) A_i).
    loss, grad, stats = _loss_and_grad("sequence", "seq-mean-token-mean", clip=(3e-4, 1e-3))
    assert float(loss) == pytest.approx(-(s0 * 1.0 + (1 + 1e-3) * 2.0) / 2, abs=1e-12)
    # d/d log pi_t of -s_0 A_0 / 2 is -A_0 s_0 / |y_0| / 2 on each of its tokens; the clipped sequence gives none.
    assert grad[0].tolist() == pytest.approx([-s0 / 3 / 2] * 3, abs=1e-12)
    assert grad[1].tolist() == [0.0, 0.0, 0.0]
    assert float(stats["clipped_tokens"]) == 2  # both tokens of sequence 1
    # GSPO's own clip range (3e-4 / 4e-4) clips both: no gradient at all.
    loss, grad, _ = _loss_and_grad("sequence", "seq-mean-token-mean")
    assert float(loss) == pytest.approx(-(1 + 4e-4) * 1.5, abs=1e-12) and not grad.any()


@pytest.mark.parametrize("agg", AGGS)
def test_gspo_token_equals_gspo_with_sequence_advantages(agg):
    for clip in ((3e-4, 4e-4), (3e-4, 1e-3), (0.2, 0.28)):
        a = _loss_and_grad("sequence", agg, clip=clip)
        b = _loss_and_grad("sequence_token", agg, clip=clip)
        assert float(a[0]) == pytest.approx(float(b[0]), abs=1e-14)
        assert torch.allclose(a[1], b[1], atol=1e-14)


@pytest.mark.parametrize("agg", AGGS)
def test_gspo_equals_grpo_on_policy(agg):
    grpo = _loss_and_grad("token", agg, on_policy=True)
    for level in ("sequence", "sequence_token"):
        gspo = _loss_and_grad(level, agg, on_policy=True)
        assert float(gspo[0]) == pytest.approx(float(grpo[0]), abs=1e-14)
        assert torch.allclose(gspo[1], grpo[1], atol=1e-14), level
        assert float(gspo[2]["ratio_sum"]) == float(grpo[2]["ratio_sum"]) == 5.0
    assert grpo[1].abs().sum() > 0


def test_the_configured_level_reaches_the_learners_loss():
    """algorithm.importance_sampling_level goes config -> LearnerSetup -> the rank's Engine -> policy_update: with
    old log-probs offset from the policy's (a stale batch), the learner's loss is policy_loss at the configured level,
    and the levels give different losses there (on-policy they could not be told apart)."""
    from rl.contracts import TrainSequence
    from rl.learner.batch import pad_pairs, response_logprobs
    from rl.learner.engine import Engine, LearnerSetup
    from rl.learner.updates import plan_policy, policy_update
    from rl.models import load_policy, load_tokenizer, resolve_model

    tiny = resolve_model("tiny:llama")
    model, pad = load_policy(tiny), load_tokenizer(tiny).pad_token_id
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 2000, (n,), generator=gen).tolist() for n in (3, 5, 4, 2)]
    responses = [torch.randint(10, 2000, (n,), generator=gen).tolist() for n in (4, 2, 6, 3)]
    adv = [1.0, -1.0, 0.5, -0.5]
    with torch.no_grad():
        batch = pad_pairs(prompts, responses, pad)
        lp = response_logprobs(model, batch, 1.0)
    # old = pi - offset, an offset that varies by token: the token and sequence ratios differ
    offset = torch.tensor([[0.03 * ((i + j) % 3) - 0.02 for j in range(lp.shape[1])] for i in range(4)])
    old = (lp - offset) * batch["response_mask"]

    class Plain(Engine):  # the plain model in place of DeepSpeed's engine (the loss is what is compared)
        lr = 0.0

        def boundary(self, last):
            pass

        def backward(self, loss):
            pass

        def step(self):
            return 0.0

    def learner_loss(level):
        cfg = load_config(None, [f"algorithm.importance_sampling_level={level}", "algorithm.clip_low=0.01",
                                 "algorithm.clip_high=0.02", "algorithm.loss_agg=seq-mean-token-mean",
                                 "learner.micro_batch_size=4"])
        engine = Plain(0, 1, tiny, LearnerSetup.of(cfg))  # the rank's own constructor: algo from the setup
        engine.policy, engine.tokenizer = model, load_tokenizer(tiny)
        seqs = [TrainSequence(p, r, old[i, :len(r)].tolist(), a)
                for i, (p, r, a) in enumerate(zip(prompts, responses, adv))]
        shards, plan = plan_policy(seqs, 1, 4, mini_batches=1, max_len=6, on_policy=False)
        return policy_update(engine, shards[0], plan)["loss"], cfg.algorithm

    losses = {}
    for level in ("token", "sequence"):
        losses[level], algo = learner_loss(level)
        expected, _ = policy_loss(lp, old, torch.tensor(adv), batch["response_mask"], clip_low=algo.clip_low,
                                  clip_high=algo.clip_high, loss_agg=algo.loss_agg, num_tokens=15, num_seqs=4,
                                  max_len=6, importance_sampling_level=level)
        assert losses[level] == pytest.approx(float(expected), rel=1e-5, abs=1e-7), level
    assert abs(losses["sequence"] - losses["token"]) > 1e-3, losses


def test_sequence_token_is_finite_next_to_padding_minus_inf():
    new, old, mask, adv = _batch()
    lp = torch.where(mask.bool(), new.detach(), torch.tensor(float("-inf"), dtype=new.dtype)).requires_grad_(True)
    loss, _ = policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, num_tokens=5, num_seqs=2,
                          importance_sampling_level="sequence_token")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


def test_clip_defaults_follow_the_importance_sampling_level():
    a = load_config(None).algorithm
    assert (a.importance_sampling_level, a.clip_low, a.clip_high) == ("token", 0.2, 0.28)
    a = load_config(None, ["algorithm.importance_sampling_level=sequence"]).algorithm
    assert (a.clip_low, a.clip_high) == (3e-4, 4e-4)  # GSPO paper v2 section 5.1, TRL's GSPO recipe
    a = load_config(None, ["algorithm.importance_sampling_level=sequence_token", "algorithm.clip_high=1e-3"]).algorithm
    assert (a.clip_low, a.clip_high) == (3e-4, 1e-3)
    with pytest.raises(ConfigError, match="algorithm.importance_sampling_level"):
        load_config(None, ["algorithm.importance_sampling_level=sentence"])


def test_adaptive_settings_refuse_what_cannot_work():
    for key in ("algorithm.dynamic_sampling=true", "data.sampler=gdro", "rollout.allocation=gdro"):
        with pytest.raises(ConfigError, match="max_staleness 0"):
            load_config(None, [key, "trainer.max_staleness=1"])
        with pytest.raises(ConfigError, match="grpo/fgo"):
            load_config(None, [key, "algorithm.name=sft"])
    with pytest.raises(ConfigError, match="rollout.gdro.max_group_size"):
        load_config(None, ["rollout.allocation=gdro", "rollout.group_size=4", "rollout.gdro.max_group_size=3"])
    cfg = load_config(None, ["algorithm.dynamic_sampling=true", "rollout.prompts_per_step=5"])
    assert cfg.algorithm.dynamic_sampling_max_extra == 15  # resolved, so the dumped config says what was used

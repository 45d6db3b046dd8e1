"""TODO / DPO: loss values and gradients against hand computation (docs/algorithms.md, "TODO and DPO"), the reduction
to DPO, the TOBT evaluation, the online pair builder on hand-made groups, and preference data loading."""
import json
import math

import numpy as np
import pytest
import torch

from rl.algo.core import dpo_loss, preference_correct, tobt_probabilities, todo_loss, todo_losses
from rl.config.schema import ConfigError, load_config
from rl.contracts import PreferencePair, RolloutBatch
from rl.data.loading import DataError
from rl.models import load_tokenizer, resolve_model
from rl.data.preference import (candidate_pairs, encode_pair, load_pairs, pair_batch, preference_metrics, rollout_pairs,
                           select_pairs, trainable)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _hand_loss(mu, tie, alpha):
    if tie:  # the paper's product form, not the softplus form the code uses
        return -math.log((math.exp(2 * alpha) - 1) / ((1 + math.exp(mu + alpha)) * (1 + math.exp(-mu + alpha))))
    return -math.log(_sig(mu - alpha))


def _logps(*rows):
    """Four [n] tensors (policy chosen, policy rejected, ref chosen, ref rejected), the policy ones with grad."""
    t = torch.tensor(rows, dtype=torch.float64)
    pc, pr = t[:, 0].clone().requires_grad_(True), t[:, 1].clone().requires_grad_(True)
    return pc, pr, t[:, 2], t[:, 3]


ROWS = [(-10.0, -14.0, -11.0, -12.0), (-20.0, -18.0, -19.0, -19.5), (-5.0, -5.5, -6.0, -4.0), (-7.0, -9.0, -7.5, -8.0)]
TIES = torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize("beta,alpha", [(0.01, 0.5), (0.5, 0.3), (1.0, 1.2)])
def test_todo_loss_and_gradient_match_hand_computation(beta, alpha):
    pc, pr, rc, rr = _logps(*ROWS)
    loss = todo_loss(pc, pr, rc, rr, TIES, beta=beta, alpha=alpha)
    mus = [beta * ((a - c) - (b - d)) for a, b, c, d in ROWS]
    expected = sum(_hand_loss(m, bool(t), alpha) for m, t in zip(mus, TIES.tolist())) / len(ROWS)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-10)

    loss.backward()
    for i, (mu, tie) in enumerate(zip(mus, TIES.tolist())):
        # dL_p/dmu = -sigma(alpha - mu); dL_t/dmu = sigma(mu + alpha) - sigma(alpha - mu); dmu/dpc = beta = -dmu/dpr
        dmu = (_sig(mu + alpha) - _sig(alpha - mu)) if tie else -_sig(alpha - mu)
        assert float(pc.grad[i]) == pytest.approx(beta * dmu / len(ROWS), rel=1e-8)
        assert float(pr.grad[i]) == pytest.approx(-beta * dmu / len(ROWS), rel=1e-8)


def test_tie_loss_is_symmetric_in_mu_and_flat_at_zero():
    alpha, tie = 0.5, torch.ones(5)
    mu = torch.tensor([-3.0, -0.7, 0.0, 0.4, 2.5], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(5, dtype=torch.float64)
    # With beta = 1 and zero reference the margin is pc - pr, so mu enters as pc = mu, pr = 0 ...
    forward = todo_losses(mu, zero, zero, zero, tie, beta=1.0, alpha=alpha)
    # ... and swapping chosen and rejected is mu -> -mu.
    swapped = todo_losses(zero, mu, zero, zero, tie, beta=1.0, alpha=alpha)
    assert torch.allclose(forward, swapped, rtol=0, atol=1e-12)
    hand = [_hand_loss(m, True, alpha) for m in mu.tolist()]
    assert torch.allclose(forward, forward.new_tensor(hand))
    assert hand[1] == pytest.approx(_hand_loss(0.7, True, alpha)) and hand[0] == pytest.approx(_hand_loss(3, True, alpha))
    forward.sum().backward()
    g = mu.grad
    assert float(g[2]) == 0.0  # no push at mu = 0
    assert float(g[0]) < 0 < float(g[4])  # descent moves mu toward 0 from either side
    assert float(g[1]) < 0 < float(g[3])
    # tie minimum: the loss is lowest at mu = 0
    assert int(forward.argmin()) == 2


def test_preference_gradient_is_larger_than_dpo_and_acts_as_margin():
    pc, pr, rc, rr = _logps((-3.0, -3.0, -3.0, -3.0))  # mu = 0
    todo_loss(pc, pr, rc, rr, torch.zeros(1), beta=1.0, alpha=0.5).backward()
    todo_grad = float(pc.grad)
    pc2, pr2, rc2, rr2 = _logps((-3.0, -3.0, -3.0, -3.0))
    dpo_loss(pc2, pr2, rc2, rr2, beta=1.0).backward()
    assert todo_grad == pytest.approx(-_sig(0.5)) and float(pc2.grad) == pytest.approx(-0.5)


def test_reduces_to_dpo_as_alpha_goes_to_zero():
    pc, pr, rc, rr = (x.detach() for x in _logps(*ROWS))
    none = torch.zeros(len(ROWS))
    dpo = float(dpo_loss(pc, pr, rc, rr, beta=0.3))
    mus = [0.3 * ((a - c) - (b - d)) for a, b, c, d in ROWS]
    assert dpo == pytest.approx(sum(-math.log(_sig(m)) for m in mus) / len(mus), rel=1e-10)
    gaps = [abs(float(todo_loss(pc, pr, rc, rr, none, beta=0.3, alpha=a)) - dpo) for a in (0.5, 0.1, 1e-2, 1e-4)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-4
    assert float(todo_loss(pc, pr, rc, rr, none, beta=0.3, alpha=0.0)) == pytest.approx(dpo, rel=1e-12)
    # ...while a tie cannot be modelled at alpha = 0: its likelihood is 0, its loss infinite
    assert math.isinf(float(todo_loss(pc, pr, rc, rr, torch.ones(len(ROWS)), beta=0.3, alpha=0.0)))


def test_tobt_probabilities_match_the_bradley_terry_form_and_sum_to_one():
    alpha, r1, r2 = 0.5, 0.8, -0.3
    lam1, lam2, phi = math.exp(r1), math.exp(r2), math.exp(alpha)
    win, lose, tie = tobt_probabilities(torch.tensor([r1 - r2], dtype=torch.float64), alpha)
    assert float(win) == pytest.approx(lam1 / (lam1 + phi * lam2))
    assert float(lose) == pytest.approx(lam2 / (lam2 + phi * lam1))
    assert float(tie) == pytest.approx((phi ** 2 - 1) * lam1 * lam2 / ((lam1 + phi * lam2) * (phi * lam1 + lam2)))
    mu = torch.linspace(-50, 50, 101, dtype=torch.float64)
    assert torch.allclose(sum(tobt_probabilities(mu, alpha)), torch.ones_like(mu))


def test_extreme_margins_stay_finite():
    pc, pr, rc, rr = _logps((0.0, -1e5, 0.0, 0.0), (-1e5, 0.0, 0.0, 0.0))
    loss = todo_loss(pc, pr, rc, rr, torch.tensor([0, 1]), beta=1.0, alpha=0.5)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_micro_batch_losses_add_up_to_the_batch_mean():
    pc, pr, rc, rr = _logps(*ROWS)
    full = todo_loss(pc, pr, rc, rr, TIES)
    parts = sum(todo_loss(pc[s], pr[s], rc[s], rr[s], TIES[s], num_pairs=len(ROWS)) for s in (slice(0, 1),
                                                                                             slice(1, 4)))
    assert float(parts.detach()) == pytest.approx(float(full.detach()), rel=1e-12)


def test_evaluation_argmax_and_sign():
    alpha = 0.5
    mu = torch.tensor([0.0, 2.0, -2.0, 0.3, 0.0], dtype=torch.float64)
    tie = torch.tensor([0, 0, 0, 1, 1], dtype=torch.bool)
    right = preference_correct(mu, tie, alpha)
    # mu = 0: win and lose are equally likely, so no strict winner: wrong (not a free 100% at the start)
    assert right["tobt"].tolist() == [False, True, False, False, False]
    assert right["sign"].tolist() == [False, True, False, True, False]
    # At alpha = 0.5 the tie is never the most likely outcome (it needs alpha > ln 2, see the README) ...
    assert not preference_correct(torch.linspace(-5, 5, 1001), torch.ones(1001), 0.5)["tobt"].any()
    # ... at alpha = 1 a small |mu| is predicted a tie
    assert preference_correct(torch.tensor([0.0, 0.2, 3.0]), torch.ones(3), 1.0)["tobt"].tolist() == [True, True,
                                                                                                      False]
    m = preference_metrics([[-1.0, -3.0, -2.0, -2.0], [-1.0, -1.0, -1.0, -1.0]], [False, True], beta=1.0,
                           alpha=alpha)
    assert m["pairs"] == 2 and m["ties"] == 1 and m["sign_acc"] == 1.0 and m["tobt_acc_pref"] == 1.0
    assert m["tobt_acc_tie"] == 0.0 and m["mu_mean"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ pair builder
def test_candidate_pairs_on_a_hand_made_group():
    correct = [True, True, False, True, False, False]
    lengths = [10, 11, 12, 30, 14, 60]
    kinds = {(a, b): k for a, b, k in candidate_pairs(correct, lengths, tie_length_ratio=1.25)}
    assert kinds[(0, 2)] == kinds[(3, 5)] == kinds[(1, 4)] == "preference"  # correct chosen over incorrect
    assert kinds[(0, 1)] == "tie_correct"  # 11 / 10 <= 1.25
    assert kinds[(0, 3)] == kinds[(1, 3)] == "shorter"  # 30 / 10: the shorter correct one is chosen
    assert kinds[(2, 4)] == "tie_incorrect"  # two wrong, 14 / 12 <= 1.25
    assert (4, 5) not in kinds and (5, 4) not in kinds  # two wrong, 60 / 14 apart: no reason to prefer either
    assert len(kinds) == 3 * 3 + 3 + 1  # 9 mixed, (0,1) (0,3) (1,3) among correct, one incorrect tie


def test_incorrect_ties_switch_and_identical_responses():
    correct, lengths = [False, False, True, True], [10, 11, 5, 5]
    pairs = candidate_pairs(correct, lengths, 1.25, incorrect_ties=False, responses=[[1], [2], [3], [3]])
    kinds = sorted(k for _, _, k in pairs)
    assert "tie_incorrect" not in kinds
    assert (2, 3, "tie_correct") not in pairs  # identical token ids: margin 0 whatever the weights
    assert kinds == ["preference"] * 4


def test_select_pairs_priority_and_random():
    cands = [(0, 1, "tie_correct"), (2, 3, "shorter"), (4, 5, "preference"), (6, 7, "tie_incorrect"),
             (8, 9, "preference")]
    got = select_pairs(cands, "priority", 3, np.random.default_rng(0))
    assert [k for _, _, k in got] == ["preference", "preference", "shorter"]
    assert len(select_pairs(cands, "priority", 0, np.random.default_rng(0))) == 5
    draws = {tuple(select_pairs(cands, "random", 2, np.random.default_rng(s))) for s in range(20)}
    assert len(draws) > 3 and all(len(d) == 2 for d in draws)
    with pytest.raises(ValueError, match="pairing"):
        select_pairs(cands, "best", 1, np.random.default_rng(0))


def test_rollout_pairs_counts_every_kind():
    cfg = load_config(None, ["algorithm.name=todo", "algorithm.todo.online=true", "algorithm.todo.pairs_per_group=0"])
    rollout = RolloutBatch(prompt_ids=[[1]] * 4 + [[2]] * 4,
                           response_ids=[[5] * 10, [6] * 11, [7] * 30, [8] * 12,  # group 0: correct x3, wrong
                                         [9] * 10, [10] * 40, [11] * 10, [12] * 40])  # group 1: all wrong
    correct = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    pairs, counts = rollout_pairs(rollout, correct, 4, cfg.algorithm.todo, True, np.random.default_rng(0))
    assert counts == {"pairs/preference": 3, "pairs/shorter": 2, "pairs/tie_correct": 1, "pairs/tie_incorrect": 2,
                      "groups_without_pairs": 0}
    assert all(p.prompt_ids == [2] for p in pairs if p.kind == "tie_incorrect")
    shorter = [p for p in pairs if p.kind == "shorter"]
    assert all(len(p.chosen_ids) < len(p.rejected_ids) for p in shorter)
    assert all(rollout.response_ids[p.index[0]] == p.chosen_ids and rollout.response_ids[p.index[1]] == p.rejected_ids
               for p in pairs)
    no_ties, counts = rollout_pairs(rollout, correct, 4, cfg.algorithm.todo, False, np.random.default_rng(0))
    assert counts["groups_without_pairs"] == 1 and not any(p.tie for p in no_ties)


def test_trainable_ties_per_algorithm():
    pair = lambda tie: PreferencePair([1], [2], [3], tie=tie)  # noqa: E731
    pairs = [pair(True), pair(False)]
    assert trainable(pairs, "todo", 0.5, "drop") == pairs
    assert trainable(pairs, "todo", 0.0, "drop") == [pair(False)]
    assert trainable(pairs, "dpo", 0.5, "drop") == [pair(False)]
    assert trainable(pairs, "dpo", 0.5, "as_preference") == [pair(False), pair(False)]


# ---------------------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("tiny:llama"))


def test_plain_and_chat_pairs_encode_to_the_same_tokens(tok):
    system = "Be brief."
    plain = encode_pair(tok, "What is 2 + 2?", "4", "5", False, system_prompt=system)
    chat = encode_pair(tok, [{"role": "system", "content": system}, {"role": "user", "content": "What is 2 + 2?"}],
                       [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}], False)
    assert plain == chat
    prompt = tok.apply_chat_template([{"role": "system", "content": system},
                                      {"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert plain.prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"]
    # a response ends with the end-of-turn token, as a sampled one does
    assert plain.chosen_ids[-1] == tok.eos_token_id and tok.decode(plain.chosen_ids[:-1]) == "4"
    batch = pair_batch([plain, chat], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["response_mask"].sum().item() == 4 * len(plain.chosen_ids)


def test_load_pairs_skips_and_counts_missing_fields(tmp_path, tok):
    rows = [{"prompt": "a?", "chosen": "x", "rejected": "y", "tie": False},
            {"prompt": "b?", "chosen": "x", "rejected": "x y", "tie": True},
            {"prompt": "", "chosen": "x", "rejected": "y", "tie": False},
            {"prompt": "c?", "chosen": None, "rejected": "y", "tie": False},
            {"prompt": "d?", "chosen": "x", "rejected": "y", "tie": None},
            {"prompt": [{"role": "user", "content": "e?"}], "chosen": [{"role": "assistant", "content": "1"}],
             "rejected": [{"role": "assistant", "content": "2"}], "tie": False},
            {"prompt": "f?", "chosen": "4", "rejected": "5", "tie": False}]  # numbers as text, next to chat lists
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = load_pairs(str(path), "train", tok)
    assert len(pairs) == 4 and stats["pairs"] == 4 and stats["ties"] == 1 and stats["skipped_bad_format"] == 0
    assert tok.decode(pairs[-1].chosen_ids[:-1]) == "4"
    assert stats["skipped_no_prompt"] == 1 and stats["skipped_no_chosen"] == 1 and stats["skipped_no_tie"] == 1
    # a file without any tie column is an ordinary preference set
    path.write_text(json.dumps({"prompt": "a?", "chosen": "x", "rejected": "y"}) + "\n")
    pairs, stats = load_pairs(str(path), "train", tok)
    assert stats["tie_column"] is False and pairs[0].tie is False
    path.write_text(json.dumps({"prompt": "", "chosen": "x", "rejected": "y", "tie": False}) + "\n")
    with pytest.raises(DataError, match="no usable pairs"):
        load_pairs(str(path), "train", tok)


def test_load_pairs_skips_malformed_jsonl_lines_with_their_numbers(tmp_path, tok):
    ok = json.dumps({"prompt": "a?", "chosen": "x", "rejected": "y", "tie": False})
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([ok, '{"prompt": "b?", "chosen": "x",', ok, json.dumps({"prompt": "c?"}),
                               json.dumps({"prompt": "d?", "chosen": 3.5, "rejected": {"x": 1}, "tie": True})]) + "\n")
    pairs, stats = load_pairs(str(path), "train", tok)
    assert len(pairs) == 2 and stats["read"] == 5
    assert stats["skipped_bad_json"] == 1 and stats["skipped_no_chosen"] == 1 and stats["skipped_bad_format"] == 1
    assert stats["bad_lines"] == [2, 4, 5]
    path.write_text("{oops\n")
    with pytest.raises(DataError, match=r"p\.jsonl.*no usable pairs.*1 not a JSON object"):
        load_pairs(str(path), "train", tok)


def test_config_errors_name_the_key(tmp_path):
    from rl.trainer import train

    with pytest.raises(ConfigError, match="algorithm.todo.train_data"):
        train(load_config(None, ["algorithm.name=todo", f"trainer.output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="algorithm.todo.eval_data"):
        train(load_config(None, ["algorithm.name=dpo", "algorithm.todo.online=true", f"trainer.output_dir={tmp_path}",
                                 f"algorithm.todo.eval_data={tmp_path / 'missing.jsonl'}"]))
    with pytest.raises(ConfigError, match="algorithm.todo.tie_lenght_ratio"):
        load_config(None, ["algorithm.todo.tie_lenght_ratio=2"])
    with pytest.raises(ConfigError, match="algorithm.todo.tie_length_ratio"):
        load_config(None, ["algorithm.todo.tie_length_ratio=0.5"])
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_cli_pref_commands_reject_bad_input_in_one_line(tmp_path, capsys):
    from launch.cli import main

    assert main(["pref-eval", str(tmp_path)]) == 2  # a folder without a run in it
    assert "config.yaml" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algorithm: {name: todo}\n")
    assert main(["pref-eval", str(cfg), "--policy", str(tmp_path)]) == 2  # no held-out pairs anywhere
    assert "algorithm.todo.eval_data" in capsys.readouterr().err
    assert main(["pref-build", str(cfg), "rollout.group_sise=2", "--out", str(tmp_path / "o")]) == 2
    assert "rollout.group_sise" in capsys.readouterr().err

"""Numerical cross-check against TRL: DPOTrainer's own loss on its own tokenized batch equals rl.algo.core.dpo_loss
on log-probs summed by rl.data.preference (our padding layout: left-padded prompts, one forward for chosen+rejected)."""
import pytest
import torch

from rl.algo.core import dpo_loss, todo_loss
from rl.contracts import PreferencePair
from rl.models import load_policy, load_tokenizer, resolve_model
from rl.data.preference import encode_pair, pair_batch, summed_logps


@pytest.mark.slow  # builds a TRL trainer (tens of seconds of imports and tokenization)
def test_dpo_loss_matches_trl_dpo_trainer(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    path = resolve_model("tiny:llama")
    tok = load_tokenizer(path)
    policy, ref = load_policy(path), load_policy(path).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that differs from its reference, so the loss is not log 2
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rows = [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
             "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "It is 5."}]},
            {"prompt": [{"role": "user", "content": "Name a colour."}],
             "chosen": [{"role": "assistant", "content": "Red, I think."}],
             "rejected": [{"role": "assistant", "content": "Seven"}]}]
    args = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=1.0, report_to="none",
                         per_device_train_batch_size=2, max_length=None)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    policy.train()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(policy, batch))

    pairs = [PreferencePair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    b = pair_batch(pairs, tok.pad_token_id)
    with torch.no_grad():
        pc, pr = summed_logps(policy, b)
        rc, rr = summed_logps(ref, b)
    assert float(dpo_loss(pc, pr, rc, rr, beta=1.0)) == pytest.approx(theirs, rel=1e-5)
    assert abs(theirs - 0.6931) > 1e-2
    # ...and TODO without ties at alpha -> 0 is that same loss
    assert float(todo_loss(pc, pr, rc, rr, torch.zeros(2), beta=1.0, alpha=1e-7)) == pytest.approx(theirs, rel=1e-5)

    # Our own encoding cuts the same prompt and response tokens out of the chat template (TRL keeps the newline
    # after the end-of-turn token; a sampled response stops at the end-of-turn token, so ours does too).
    mine = encode_pair(tok, rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"], False)
    ref_row = trainer.train_dataset[0]
    assert mine.prompt_ids == ref_row["prompt_ids"]
    assert mine.chosen_ids == ref_row["chosen_ids"][:len(mine.chosen_ids)]
    assert ref_row["chosen_ids"][len(mine.chosen_ids):] == tok("\n", add_special_tokens=False)["input_ids"]

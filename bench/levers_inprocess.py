"""Each speed lever of one GRPO step, measured in one process, interleaved round by round so that machine noise hits
every variant alike (separate runs of bench/grpo_vs_trl.py differ noticeably even with identical code on a shared
machine; docs/performance.md).

    python bench/levers_inprocess.py --rounds 3        # writes bench/results/levers_inprocess.json

Generation (SmolLM2, the bench's 8 prompts x 4 samples x 64 tokens, temperature 1, through RolloutWorker):
`generate` with and without the shared prompt prefill, with our inverse-CDF sampler or transformers' multinomial,
and transformers continuous batching. Training (the responses
of one such rollout, micro-batches of 8, forward + backward of the GRPO loss, no optimizer step): padded,
shared-prefix and packed layouts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from bench.grpo_vs_trl import SYSTEM_PROMPT
    from rl.algo.core import policy_loss
    from rl.learner.batch import pack_pairs, pad_pairs, prefix_pairs, response_logprobs
    from rl.data.loading import generate_arith, render_prompt
    from rl.models import load_policy, resolve_model
    from rl.rollout.worker import RolloutWorker, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--generation-only", action="store_true", help="skip the training layouts")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "levers_inprocess.json"))
    args = ap.parse_args()

    path = resolve_model("bundled:smollm2-135m-instruct")
    torch.set_num_threads(2)
    gen = {"generate": RolloutWorker(path, backend="transformers"),
           "continuous": RolloutWorker(path, backend="continuous")}
    tok = gen["generate"].tokenizer
    prompts = [render_prompt(tok, r["problem"], SYSTEM_PROMPT) for r in generate_arith(0, 8, 1, 0)["train"]]
    variants = {"generate, shared prompt prefill": ("generate", True, "inverse_cdf"),
                "generate, shared prefill, torch.multinomial": ("generate", True, "multinomial"),
                "generate, no prefill sharing": ("generate", False, "inverse_cdf"),
                "continuous batching": ("continuous", True, "inverse_cdf")}
    model = load_policy(path).train()
    layouts = {"padded": lambda p, r: pad_pairs(p, r, tok.pad_token_id), "shared prefix":
               lambda p, r: prefix_pairs(p, r, tok.pad_token_id), "packed": pack_pairs}
    if args.generation_only:
        layouts = {}
    seconds: dict[str, list[float]] = {name: [] for name in [*variants, *layouts]}
    tokens: dict[str, list[int]] = {name: [] for name in variants}
    rollout = None
    for rnd in range(args.rounds):
        for name, (backend, shared, sampler) in variants.items():
            params = SamplingParams(n=4, max_new_tokens=64, temperature=1.0, shared_prefix=shared, sampler=sampler)
            t = time.perf_counter()
            out = gen[backend].generate(prompts, params, seed=rnd)
            seconds[name].append(time.perf_counter() - t)
            tokens[name].append(sum(map(len, out.response_ids)))
            rollout = rollout or out
            print(f"round {rnd} {name}: {seconds[name][-1]:.1f} s, {tokens[name][-1]} tokens", flush=True)
        adv = torch.randn(len(rollout.response_ids))
        for name, layout in layouts.items():
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            n_tok = float(sum(map(len, rollout.response_ids)))
            for a in range(0, len(adv), args.micro_batch):
                batch = layout(rollout.prompt_ids[a:a + args.micro_batch],
                               rollout.response_ids[a:a + args.micro_batch])
                lp = response_logprobs(model, batch)
                loss, _ = policy_loss(lp, lp.detach(), adv[a:a + args.micro_batch], batch["response_mask"],
                                      num_tokens=n_tok, num_seqs=len(adv))
                loss.backward()
            seconds[name].append(time.perf_counter() - t)
            print(f"round {rnd} train {name}: {seconds[name][-1]:.1f} s", flush=True)
    timed = slice(1, None) if args.rounds > 1 else slice(None)  # round 0 warms every path up
    summary = {name: {"seconds": s, "mean": sum(s[timed]) / len(s[timed]), "tokens": tokens.get(name)}
               for name, s in seconds.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rounds": args.rounds,
                                          "results": summary}, indent=1))
    for name, s in summary.items():
        print(f"{name:34s} {s['mean']:6.1f} s  (all rounds, the first untimed: "
              f"{', '.join(f'{x:.1f}' for x in s['seconds'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

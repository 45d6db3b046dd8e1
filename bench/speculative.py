"""Speculative rollouts vs plain decoding, alternated in one run (issue 26): acceptance rate, tokens per verifying
forward, generation seconds and tokens/s per drafter, through the rollout worker as a run uses it.

    nice -n 19 python bench/speculative.py --model tiny:llama --prompts 2 --group 2 --max-new-tokens 16 --rounds 1
    python bench/speculative.py --model bundled:smollm2-135m-instruct --rounds 3 --out bench/results/speculative.json
    python bench/speculative.py --model runs/testbed2_starts/0.8 --data runs/testbed2/heldout.jsonl \
        --config configs/testbed2_grpo.yaml --max-new-tokens 224 --rounds 3
    python bench/speculative.py --drafters model --draft-model tiny:llama --distill-every 1 --rounds 8  # TLT's drafter

Variants: `plain` (the worker's default backend: transformers `generate`, shared prefill, inverse-CDF sampler) and
one per `--drafters` entry (`ngram`, `model` with --draft-model), each as `rollout.speculative` configures it
(--k, --tail, --min-acceptance). Every round runs every variant on the same prompts and seed, in an order rotated
by one each round, so drift of the machine's load spreads over all of them. Samples differ between variants (other
random streams), so compare tokens/s as well as seconds. A random-init model (tiny:llama) writes near-uniform
tokens, so its acceptance is ~0: it checks that the script runs and what speculation costs when it cannot win.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROBLEMS = [
    "A farmer has 17 sheep and buys 3 times as many goats as sheep. How many animals does he have now?",
    "What is 48 + 276 - 93? Check each column of the addition twice.",
    "A train travels 60 km in the first hour and 15 km more in each following hour. How far does it go in 4 hours?",
    "List the first 10 multiples of 7, then add them up.",
    "Sara reads 12 pages a day. Her book has 150 pages. After how many days has she finished it?",
    "Compute 23 * 17 step by step, writing out each partial product.",
    "A rectangle is 14 cm by 9 cm. What are its area and its perimeter?",
    "If 5 pencils cost 3 dollars, how much do 35 pencils cost?",
]


def prompts(tok, n: int) -> list[str]:
    rows = [PROBLEMS[i % len(PROBLEMS)] for i in range(n)]
    if getattr(tok, "chat_template", None):
        return [tok.apply_chat_template([{"role": "system", "content": "Think step by step. Put the final answer "
                                          "in \\boxed{}."}, {"role": "user", "content": r}], tokenize=False,
                                        add_generation_prompt=True) for r in rows]
    return [f"Question: {r}\nAnswer step by step:" for r in rows]


def data_prompts(tok, path: str, config: str | None, n: int) -> list[str]:
    """The first n problems of a JSONL, rendered as training renders them (chat template, the run's system prompt)."""
    from rl.config.schema import DataConfig, load_config
    from rl.data.loading import render_prompt

    data = load_config(config, [], check_environment=False).data if config else DataConfig()
    rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()][:n]
    return [render_prompt(tok, r["problem"], data.system_prompt, data.prompt_suffix) for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--drafters", default="ngram", help="comma-separated: ngram, model")
    ap.add_argument("--draft-model", default=None, help="model spec for drafter `model` (e.g. tiny:llama)")
    ap.add_argument("--distill-every", type=int, default=0, help="drafter `model`: train the draft online every N "
                    "of its generate calls on the policy's samples (rollout.speculative.distill_every; TLT's drafter)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--data", default=None, help="a JSONL of rows with `problem` (e.g. runs/testbed2/heldout.jsonl): "
                    "its first --prompts problems instead of the built-in word problems")
    ap.add_argument("--config", default=None, help="a run config whose system prompt and suffix frame --data (the "
                    "prompt the policy was trained on)")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--k", type=int, default=None, help="rollout.speculative.num_draft_tokens (default: schema's)")
    ap.add_argument("--tail", type=int, default=None, help="rollout.speculative.tail_batch_size")
    ap.add_argument("--min-acceptance", type=float, default=None, help="rollout.speculative.min_acceptance")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the runs and the summary as JSON here")
    args = ap.parse_args()

    import torch

    from rl.config.speculative import SpeculativeConfig
    from rl.models import load_policy, resolve_model
    from rl.rollout.worker import RolloutWorker, SamplingParams

    worker = RolloutWorker(resolve_model(args.model), num_threads=args.threads)
    draft = None
    variants = {"plain": SpeculativeConfig()}
    overrides = {k: v for k, v in (("num_draft_tokens", args.k), ("tail_batch_size", args.tail),
                                   ("min_acceptance", args.min_acceptance)) if v is not None}
    for name in filter(None, args.drafters.split(",")):
        if name == "model":
            if not args.draft_model:
                ap.error("drafter `model` needs --draft-model")
            draft = load_policy(resolve_model(args.draft_model)).eval()
        variants[name] = SpeculativeConfig(drafter=name, draft_model=args.draft_model if name == "model" else None,
                                           distill_every=args.distill_every if name == "model" else 0, **overrides)
    distiller = None
    if draft is not None and args.distill_every:
        from rl.rollout.draft_training import DraftDistiller

        s = variants["model"]
        distiller = DraftDistiller(draft, s.distill_every, s.distill_steps, s.distill_lr, s.distill_buffer,
                                   s.distill_batch, worker.tokenizer.pad_token_id or 0)
    texts = (data_prompts(worker.tokenizer, args.data, args.config, args.prompts) if args.data
             else prompts(worker.tokenizer, args.prompts))
    params = SamplingParams(n=args.group, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, batch_size=args.batch_size)
    names, runs = list(variants), []
    worker.generate(texts[:1], SamplingParams(n=1, max_new_tokens=4), seed=0)  # warm-up: first-call allocations
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            worker.speculative, worker.draft_model = variants[name], draft
            worker.distiller = distiller if name == "model" else None  # only the drafter's own calls train it
            t = time.perf_counter()
            out = worker.generate(texts, params, seed=args.seed + r)
            seconds = time.perf_counter() - t
            tokens = sum(out.tokens)
            row = {"round": r, "variant": name, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                   "stop_rate": out.finish_reason.count("stop") / len(out), **out.speculation_stats()}
            if worker.distiller is not None:
                row["draft_version"] = worker.distiller.version  # distillation rounds so far (after this call)
            runs.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    summary = {}
    base = statistics.median(x["tokens_per_s"] for x in runs if x["variant"] == "plain")
    for name in names:
        mine = [x for x in runs if x["variant"] == name]
        tps = statistics.median(x["tokens_per_s"] for x in mine)
        summary[name] = {"median_seconds": statistics.median(x["seconds"] for x in mine), "median_tokens_per_s": tps,
                         "speedup_tokens_per_s": tps / base,
                         **{k: statistics.mean(x[k] for x in mine) for k in ("acceptance_rate", "tokens_per_forward")
                            if k in mine[0]}}
    print(f"\n{'variant':<8} {'s (median)':>11} {'tokens/s':>9} {'vs plain':>9} {'accept':>7} {'tok/fwd':>8}")
    for name, s in summary.items():
        print(f"{name:<8} {s['median_seconds']:>11.2f} {s['median_tokens_per_s']:>9.1f} "
              f"{s['speedup_tokens_per_s']:>8.2f}x {s.get('acceptance_rate', float('nan')):>7.3f} "
              f"{s.get('tokens_per_forward', 1.0):>8.2f}")
    if args.out:
        meta = {k: v for k, v in vars(args).items() if k != "out"}
        meta["torch_threads"] = torch.get_num_threads()
        Path(args.out).write_text(json.dumps({"args": meta, "runs": runs, "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

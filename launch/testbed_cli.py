"""`reasonrl testbed`: write the verbose-reasoner testbed (rl/data/testbed.py) into a folder.

rl.data.testbed and the tokenizer are imported inside the handler, so `reasonrl --help` stays instant.
"""
from __future__ import annotations

import json
from pathlib import Path

from rl.config.schema import ConfigError

DEFAULT_MODEL = "bundled:smollm2-135m-instruct"


def _testbed(args) -> int:
    from rl.data.testbed import (DEFAULT_DIFFICULTY, DEFAULT_MAX_REDUNDANT, DEFAULT_MIN_REDUNDANT, DIFFICULTIES, KIND_PROBS,
                                 V2, generate)

    defaults = V2 if args.v2 else dict(difficulty=DEFAULT_DIFFICULTY, max_redundant=DEFAULT_MAX_REDUNDANT,
                                       min_redundant=DEFAULT_MIN_REDUNDANT, probs=KIND_PROBS, independent=False)
    for key in ("difficulty", "max_redundant", "min_redundant"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.difficulty not in DIFFICULTIES:
        raise ConfigError(f"--difficulty must be one of {sorted(DIFFICULTIES)}, got {args.difficulty}")
    if args.max_redundant < args.min_redundant:
        raise ConfigError(f"--max-redundant {args.max_redundant} is below --min-redundant {args.min_redundant}")
    if args.v2 and args.model is not None:
        raise ConfigError("--v2 builds its own model (the tiny reasoner in OUT/reasoner); drop --model")
    reasoner, tokenizer = None, None
    if args.v2:
        reasoner = {"width": args.reasoner_width, "layers": args.reasoner_layers, "seed": args.seed}
    else:
        from rl.models import load_tokenizer, resolve_model

        # minimal_tokens are counted in the tokens of the model that will be fine-tuned.
        tokenizer = load_tokenizer(resolve_model(args.model or DEFAULT_MODEL))
    summary = generate(args.out, tokenizer, seed=args.seed, difficulty=args.difficulty, sft=args.sft,
                       train=args.train, heldout=args.heldout, max_redundant=args.max_redundant,
                       min_redundant=args.min_redundant, probs=defaults["probs"],
                       independent=defaults["independent"], reasoner=reasoner)
    t = summary["tokens"]
    print(json.dumps({"space": summary["space"], "minimal_tokens_mean": t["minimal"].get("mean"),
                      "sft_completion_tokens_mean": t["sft_completion"].get("mean"),
                      "sft_over_minimal_mean": t["sft_over_minimal"].get("mean"),
                      "sft_at_least_twice_minimal": t["sft_at_least_twice_minimal"],
                      "sft_redundant_steps": summary["sft_redundant_steps"],
                      "sft_modal_path": " > ".join(f"{k} ({p:.2f})" for k, p in summary["sft_modal_path"]),
                      "sft_fewer_redundant_than_modal": summary["sft_fewer_redundant_than_modal"],
                      "reasoner": summary.get("reasoner")}, indent=2))
    print(f"testbed in {Path(args.out).resolve()}: sft.jsonl, train.jsonl, heldout.jsonl, testbed.json"
          + (", reasoner/ (model.path of the SFT config)" if args.v2 else ""))
    return 0


def add_testbed_command(sub) -> None:
    tb = sub.add_parser("testbed", help="write the verbose-reasoner testbed: SFT solutions with redundant steps, "
                        "RL training and held-out problems whose steps `count_steps` can tell apart")
    tb.add_argument("--out", required=True, help="output folder (files are replaced)")
    tb.add_argument("--seed", type=int, default=0)
    # Defaults of None are rl.data.testbed's own (not imported here: rewards/ pulls in math-verify and sympy).
    tb.add_argument("--difficulty", type=int, default=None,
                    help="0: 3-digit sums, 1: 4-digit +/- (the default), 2: 5-digit +/-, 3: 2-digit x 2-digit "
                    "products, 4: 3-digit x 2-digit products")
    tb.add_argument("--sft", type=int, default=2800, help="SFT solutions (prompt/completion)")
    tb.add_argument("--train", type=int, default=1000, help="RL training problems")
    tb.add_argument("--heldout", type=int, default=200, help="held-out problems (eval with --benchmarks FILE)")
    tb.add_argument("--max-redundant", type=int, default=None,
                    help="at most k redundant steps per SFT solution (default 6)")
    tb.add_argument("--min-redundant", type=int, default=None,
                    help="at least this many (default 4: verbosity is the mode of the SFT data, and the solutions "
                    "are at least twice the minimal length)")
    tb.add_argument("--model", default=None, help="whose tokenizer counts minimal_tokens (the model to "
                    f"fine-tune; default {DEFAULT_MODEL})")
    tb.add_argument("--v2", action="store_true",
                    help="version 2 for the tiny reasoner: 3-digit sums, each redundant step drawn on its own (0-7 "
                    "per solution, the greedy path keeps 3, ~40%% of solutions hold fewer), and a random-init "
                    "word-level model written to OUT/reasoner (docs/results.md, 'Tiny reasoner')")
    tb.add_argument("--reasoner-width", type=int, default=128, help="--v2: the model's width (multiple of 32)")
    tb.add_argument("--reasoner-layers", type=int, default=4, help="--v2: the model's layers")
    tb.set_defaults(handler=_testbed)

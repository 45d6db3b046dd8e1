"""`reasonrl pref-eval` and `reasonrl pref-build`: subcommands for TODO / DPO (logic in launch/preference_tools.py).

The handlers import their logic when they run: launch.preference_tools needs torch, ray and transformers, and launch.run
the reward registry (math-verify, sympy), while `reasonrl --help` imports this module.
"""
from __future__ import annotations

import json


def _pref_eval(args) -> int:
    from launch.preference_tools import pref_eval

    result = pref_eval(args.run, args.pairs, args.policy, args.limit)
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def _pref_build(args) -> int:
    from launch.run import load_training_config
    from launch.preference_tools import build_preference_set

    cfg = load_training_config(args.config, args.overrides)
    summary = build_preference_set(cfg, args.out, args.train_prompts, args.eval_prompts)
    print(json.dumps(summary, indent=1))
    return 0


def add_preference_commands(sub) -> None:
    ev = sub.add_parser("pref-eval", help="held-out TOBT three-way and sign accuracy of a TODO/DPO model")
    ev.add_argument("run", help="run folder (config.yaml + checkpoint-final) or a config file (with --policy)")
    ev.add_argument("--pairs", help="held-out pairs (.jsonl/.parquet/hub); default algorithm.todo.eval_data")
    ev.add_argument("--policy", help="model folder to score; default RUN/checkpoint-final")
    ev.add_argument("--limit", type=int, default=0, help="use the first N pairs (default algorithm.todo.eval_size)")
    ev.add_argument("--output", help="also write the result as JSON here")
    ev.set_defaults(handler=_pref_eval)

    build = sub.add_parser("pref-build", help="preference pairs from the model's own verifier-scored samples")
    build.add_argument("config", help="YAML config: model, data, rollout, reward and algorithm.todo pairing keys")
    build.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=8")
    build.add_argument("--out", required=True, help="folder for train.jsonl, eval.jsonl, summary.json")
    build.add_argument("--train-prompts", type=int, default=64, help="training prompts to sample (default 64)")
    build.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts to sample (default 32)")
    build.set_defaults(handler=_pref_build)

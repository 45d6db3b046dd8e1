"""`reasonrl eval` and `reasonrl compare` (logic in eval/runner.py and eval/compare.py).

eval/ is imported inside the handlers: it pulls in the reward registry (math-verify, sympy) and numpy, and Ray,
torch and transformers once generation starts, while `reasonrl --help` imports this module.
"""
from __future__ import annotations

import logging
from pathlib import Path

from eval.protocols import PROTOCOLS
from rl.config.schema import ConfigError


def settings_from_args(args):
    """eval.runner.EvalSettings from `reasonrl eval`'s options: the protocol's settings, then what was given."""
    from eval.protocols import get_protocol, parse_samples
    from eval.runner import EvalSettings

    protocol = args.protocol or "reasonrl"
    samples, named = parse_samples(args.samples)
    # A bare N applies to every benchmark not named in --samples; without one the protocol's own counts stay.
    per_benchmark = named if samples is not None else {**get_protocol(protocol).samples_per_benchmark, **named}
    # Options left out (None) keep the protocol's value; a temperature given to a greedy protocol means sampling.
    greedy = True if args.greedy else (False if args.temperature is not None else None)
    return EvalSettings.from_protocol(
        protocol, samples=samples, samples_per_benchmark=per_benchmark, greedy=greedy,
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
        chunk_problems=args.chunk_problems, batch_size=args.batch_size, verifier=args.verifier,
        extraction=args.extraction, think=args.think, rel_tol=args.rel_tol)


def _eval(args) -> int:
    from eval.benchmarks import parse_benchmarks
    from eval.rescore import rescore
    from eval.runner import run_eval
    from rewards.isolation import cap_log_messages

    cap_log_messages(*logging.getLogger().handlers)  # verifier logs quote model output: no line of any length
    if args.grading and not args.rescore:
        raise ConfigError("--grading goes with --rescore OUT; a new eval takes --protocol NAME")
    if args.rescore:
        # Only the grading can change without generating again; the options that set generation are refused.
        given = [opt for opt, value in (("--samples", args.samples), ("--greedy", args.greedy),
                                        ("--temperature", args.temperature), ("--top-p", args.top_p),
                                        ("--max-new-tokens", args.max_new_tokens)) if value is not None]
        if given:
            raise ConfigError(f"--rescore re-grades saved responses; {', '.join(given)} would change how they are "
                              "generated, which needs a new eval (reasonrl eval --model ... --out NEW)")
        rescore(args.rescore, timeout=args.timeout, protocol=args.protocol, grading_of=args.grading,
                grading={"extraction": args.extraction, "think": args.think, "rel_tol": args.rel_tol})
        return 0
    if not args.model:
        raise ConfigError("reasonrl eval needs --model (a run folder, checkpoint, HF folder, hub id, bundled:NAME or "
                          "tiny:NAME), or --rescore OUT")
    benchmarks = parse_benchmarks(args.benchmarks)
    settings = settings_from_args(args)
    out = args.out or str(Path("results") / Path(args.model.rstrip("/")).name.replace(":", "-"))
    run_eval(args.model, benchmarks, out, settings, data_dir=args.data_dir, limit=args.limit,
             num_workers=args.num_workers, reward_workers=args.reward_workers, config_path=args.config,
             timeout=args.timeout, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"results in {Path(out).resolve()}")
    return 0


def _compare(args) -> int:
    from eval.compare import compare

    result = compare(args.a, args.b, args.out, confidence=args.confidence, n_boot=args.n_boot, seed=args.seed)
    print((Path(result["out"]) / "compare.md").read_text(), end="")
    print(f"results in {result['out']}")
    return 0


def add_eval_commands(sub) -> None:
    ev = sub.add_parser("eval", help="accuracy and response length on math benchmarks (MATH500, AIME, AMC, ...)")
    ev.add_argument("--model", help="run folder (its checkpoint-final and prompt template), checkpoint, HF folder, "
                    "hub id, bundled:NAME or tiny:NAME")
    ev.add_argument("--benchmarks", default="math500",
                    help="comma-separated: math500, aime24, aime25, amc23, minerva, gsm8k, a .jsonl file or a hub "
                    "id org/name[:split] (default math500)")
    ev.add_argument("--data-dir", help="folder with local <benchmark>.jsonl files (id/problem/answer) instead of the "
                    "hub; default $REASONRL_DATA_DIR")
    ev.add_argument("--protocol", choices=list(PROTOCOLS),
                    help="named protocol fixing prompt, sampling, samples, budget and grading (eval/protocols.py, "
                    "README 'Which protocol'; default reasonrl; with --rescore: re-grade under its grading, refused "
                    "if the responses were generated otherwise): " + "; ".join(f"{p.name}: {p.source}" for p in PROTOCOLS.values()))
    ev.add_argument("--samples", help="responses per problem (avg@k, pass@k, maj@k): N, BENCHMARK=N or a list "
                    "(4,aime24=16); default the protocol's")
    ev.add_argument("--greedy", action="store_true", default=None, help="greedy decoding (needs --samples 1)")
    ev.add_argument("--temperature", type=float, help="sampling temperature (default the protocol's; reasonrl 0.6)")
    ev.add_argument("--top-p", type=float, help="default the protocol's (reasonrl 1.0)")
    ev.add_argument("--max-new-tokens", type=int, help="generation budget (default the protocol's; reasonrl 2048)")
    ev.add_argument("--extraction", choices=["last_box", "math_verify", "lighteval"], help="answer extraction: "
                    "last balanced box (training's), math-verify with lighteval's targets, or lighteval 0.13's own "
                    "metric (default the protocol's)")
    ev.add_argument("--think", choices=["keep", "split", "tags"], help="split: score only the text after the last "
                    "</think>; tags: cut <think>...</think> pairs (lighteval's remove_reasoning_tags)")
    ev.add_argument("--rel-tol", type=float, help="numbers within this relative tolerance count as equal")
    ev.add_argument("--limit", type=int, help="first N problems of each benchmark")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", help="output folder (default results/<model name>); an existing one is resumed")
    ev.add_argument("--overwrite", action="store_true", help="move an existing --out aside instead of resuming")
    ev.add_argument("--config", help="training config whose data section gives the prompt template (for a model "
                    "that is not a run folder)")
    ev.add_argument("--num-workers", type=int, default=1, help="rollout workers (data-parallel Ray actors)")
    ev.add_argument("--reward-workers", type=int, default=1, help="verifier workers")
    ev.add_argument("--verifier", default="math_verify",
                    help="reward that decides correct: registry name, module:function or file.py:function (default "
                    "math_verify; exact_match where a boxed expression must not count, as on the testbed)")
    ev.add_argument("--timeout", type=float, default=30.0, help="verifier time limit per call, seconds")
    ev.add_argument("--chunk-problems", type=int, default=16, help="problems per generation round (resume unit)")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per generate call in a worker")
    ev.add_argument("--rescore", metavar="OUT", help="re-verify the saved responses in OUT (no generation), with "
                    "the grading they were made with, or: --protocol NAME (the whole protocol: refused, naming each "
                    "setting, if the responses were generated otherwise), --grading NAME (that protocol's grading "
                    "alone), --extraction / --think / --rel-tol")
    ev.add_argument("--grading", choices=list(PROTOCOLS), metavar="PROTOCOL", help="with --rescore: grade with "
                    "this protocol's extraction, </think> handling and tolerance")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(handler=_eval)

    cmp = sub.add_parser("compare", help="B against A: paired accuracy difference and token ratio, table and plots")
    cmp.add_argument("a", help="eval folder of the reference (e.g. the base model)")
    cmp.add_argument("b", help="eval folder of the candidate (e.g. the trained model)")
    cmp.add_argument("--out", help="output folder (default B/compare_vs_<A name>)")
    cmp.add_argument("--confidence", type=float, default=0.95)
    cmp.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.set_defaults(handler=_compare)

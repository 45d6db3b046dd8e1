"""`reasonrl` command line: train (fresh or --resume) with `a.b=c` overrides."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from launch.eval_cli import add_eval_commands
from launch.preference_cli import add_preference_commands
from launch.submit import add_commands as add_job_commands
from launch.testbed_cli import add_testbed_command
from rl.store import checkpoint
from rl.config.schema import ConfigError
from rl.data.loading import DataError
from rl.models import ModelError


def _train(args) -> int:
    # launch.run pulls in the reward registry (math-verify, sympy): imported per command, so `reasonrl --help`
    # stays instant. load_config validates the reward specs through the same registry, so config errors cost the same.
    from launch.run import load_training_config, train_run

    if args.resume:
        run_dir = Path(args.resume)
        if args.preset:
            raise ConfigError("--preset applies to a fresh run; a resumed run's config.yaml already holds its preset")
        if args.config and Path(args.config).is_file():
            raise ConfigError("give either a config or --resume RUN_DIR (the run's config.yaml is reused)")
        overrides = ([args.config] if args.config else []) + args.overrides  # a lone override lands in `config`
        # The folder given is the run, wherever it was moved or whatever the working directory is now.
        overrides.append(f"trainer.output_dir={run_dir.resolve()}")
        cfg = load_training_config(run_dir / "config.yaml", overrides, name=run_dir.name,
                                   check_environment=not args.dry_run)
    else:
        if not args.config:
            raise ConfigError("reasonrl train needs a config file (e.g. configs/demo.yaml) or --resume RUN_DIR")
        cfg = load_training_config(args.config, args.overrides, check_environment=not args.dry_run,
                                   presets=args.preset or [])
    if args.dry_run:  # what this machine lacks (vllm, GPUs) becomes warnings there, not errors
        from launch.dry_run import dry_run

        return dry_run(cfg, resume=bool(args.resume))
    # Ray (and, through rl.trainer, torch): only once the config is known to be valid.
    import ray.exceptions

    from rl.trainer import RunInterrupted
    from rl.cluster.watchdog import StuckError

    try:
        summary = train_run(cfg, resume=bool(args.resume))
    except RunInterrupted as err:
        return _interrupted(err)
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as err:
        # A worker died (OOM, kill, crash). Checkpoints are written atomically, so the last one is intact.
        last = checkpoint.latest(cfg.trainer.output_dir)
        where = f"the last checkpoint is intact: {last}" if last else "no checkpoint had been written yet"
        print(f"reasonrl: stopped because a worker died ({type(err).__name__}: {str(err).splitlines()[0]}); "
              f"{where}; continue with: reasonrl train --resume {cfg.trainer.output_dir}", file=sys.stderr)
        return 3
    except StuckError as err:
        # The watchdog already logged the stuck actor's stack; the run stops instead of hanging.
        last = checkpoint.latest(cfg.trainer.output_dir)
        print(f"reasonrl: stopped by the watchdog: {str(err).splitlines()[0]}; last checkpoint: {last}; continue "
              f"with: reasonrl train --resume {cfg.trainer.output_dir}", file=sys.stderr)
        return 4
    if "eval_start" in summary and "eval_end" in summary:
        a, b = summary["eval_start"]["accuracy"], summary["eval_end"]["accuracy"]
        print(f"held-out accuracy: {a:.3f} -> {b:.3f} ({cfg.trainer.output_dir})")
    return 0


def _interrupted(err, again: str | None = None) -> int:
    """One line for a run stopped by Ctrl-C / SIGTERM (the trainer already shut every actor down); the shell's
    convention for death by signal, 128 + the signal number (130 SIGINT, 143 SIGTERM)."""
    out = err.output_dir
    if err.checkpoint is not None:
        where, how = f"last complete checkpoint: {err.checkpoint}", f"continue with: reasonrl train --resume {out}"
    else:  # --resume needs a checkpoint; the run's saved config restarts it in the same folder
        where = "no checkpoint written yet"
        how = f"start it again with: reasonrl train {Path(out) / 'config.yaml'} trainer.overwrite=true"
    print(f"reasonrl: interrupted ({err.signal_name}) after step {err.step}; {where}; {again or how}",
          file=sys.stderr, flush=True)
    return 128 + int(signal.Signals[err.signal_name])


def _experiment(args) -> int:
    # Same reason as in _train: launch.experiment imports launch.run (math-verify, sympy).
    from launch.experiment import run_experiment

    command = "reasonrl experiment " + " ".join(args.configs) + f" --out {args.out}" + \
        "".join(f" --set {o}" for o in args.overrides) + \
        (" --seeds " + " ".join(map(str, args.seeds)) if args.seeds else "") + \
        (f" --sampled {args.sampled}" if args.sampled else "")
    try:
        run_experiment(args.configs, Path(args.out), args.overrides, command, seeds=args.seeds, sampled=args.sampled)
    except Exception as err:
        # rl.trainer (torch) is imported only once a run starts, not to report a bad config: looked up, not imported.
        trainer = sys.modules.get("rl.trainer")
        if trainer is None or not isinstance(err, trainer.RunInterrupted):
            raise
        # Rerunning the experiment reuses the finished runs and trains the interrupted one again from its start.
        return _interrupted(err, again=f"continue with: {command}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reasonrl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a policy (GRPO) from a YAML config")
    train.add_argument("config", nargs="?", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=30")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    train.add_argument("--preset", action="append", metavar="NAME", help="merge configs/presets/NAME.yaml (or a "
                       "YAML file) under the config, e.g. --preset gpu: bf16, vLLM, one shared GPU")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and the placement plan "
                       "(roles, actors, resources) and exit: nothing starts, nothing is downloaded")
    add_preference_commands(sub)  # pref-eval / pref-build (TODO, DPO)
    add_eval_commands(sub)  # eval / compare (chain-of-thought compression)
    add_job_commands(sub)  # submit / status / logs / stop (Ray Jobs API)
    add_testbed_command(sub)  # testbed (verbose-reasoner SFT/RL data with countable redundant steps)
    experiment = sub.add_parser("experiment", help="train several configs from the same start and compare them "
                                "(accuracy with CIs, tokens, zero-advantage groups, entropy)")
    experiment.add_argument("configs", nargs="+", help="YAML configs differing only in algorithm/reward/logging")
    experiment.add_argument("--out", required=True, help="folder for the runs, results.md/json and the figures "
                            "(compression.png, accuracy_at_budget.png)")
    experiment.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override applied to every config, e.g. --set trainer.max_steps=10")
    experiment.add_argument("--seeds", type=int, nargs="+", metavar="S", help="train every config once per seed "
                            "(trainer.seed=S; the config's own seed in OUT/<name>, others in OUT/<name>-seed<S>) "
                            "and pool the report over them; put it after the configs")
    experiment.add_argument("--sampled", type=int, default=0, metavar="K", help="after training, K sampled held-out "
                            "responses per problem from the start and every final policy (training temperature and "
                            "budget): avg@K, redundant steps per sample and the frontier from samples "
                            "(accuracy_at_budget_sampled.png); reused when present")
    experiment.set_defaults(handler=_experiment)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra  # `train CONFIG --dry-run a.b=c`: argparse leaves overrides after a flag unparsed
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=os.environ.get("REASONRL_LOG", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.handler(args) if hasattr(args, "handler") else _train(args)
    except (ConfigError, DataError, ModelError, FileNotFoundError, FileExistsError) as err:
        # Problems with the user's input: one clear line, no traceback. Anything else propagates (exit 1).
        print(f"reasonrl: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

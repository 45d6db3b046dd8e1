#!/usr/bin/env bash
# What each speed lever buys on our side of bench/grpo_vs_trl.py (8 prompts x 4 samples x 64 tokens, SmolLM2,
# 2 timed steps after a warm-up), one lever at a time against our defaults, then all the ones that helped.
# Results: bench/results/lever_<name>.json; the table in docs/performance.md was copied from their printouts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run() { local name=$1; shift; "$PY" bench/grpo_vs_trl.py --only ours --steps 2 --out "bench/results/lever_$name.json" "$@"; }
run defaults
run no_prefill_sharing --set rollout.shared_prefix=false
run train_shared_prefix --set learner.shared_prefix=true
run packing --set learner.packing=true
run continuous_batching --set rollout.backend=continuous
run off_policy --set trainer.max_staleness=1

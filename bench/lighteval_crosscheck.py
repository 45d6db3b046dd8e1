"""Cross-check: our verdicts under the `lighteval` protocol against lighteval's own metric, response by response.

lighteval (0.13, PyPI) pins its own torch / transformers / datasets, so it lives in a SEPARATE venv, never in
reasonrl's: `python -m venv /tmp/lighteval-venv && /tmp/lighteval-venv/bin/pip install "lighteval[math]==0.13.*"`.
This script scores the same (gold, response) pairs twice: here with rewards.math.math_verify(extraction="math_verify",
think="split"), and in that venv with lighteval's Metrics.pass_at_k_math scorer (MultilingualExtractiveMatchMetric:
Expr + LaTeX targets, precision 6) after its pipeline's remove_reasoning_tags. It prints every disagreement.

    python bench/lighteval_crosscheck.py [--lighteval-python /tmp/lighteval-venv/bin/python] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Runs in the lighteval venv: stdin = [[gold, response], ...], stdout = [verdict, ...].
LIGHTEVAL_SIDE = r'''
import json, sys
from lighteval.metrics.metrics import Metrics
from lighteval.models.model_output import ModelResponse
from lighteval.tasks.requests import Doc
from lighteval.utils.utils import remove_reasoning_tags
scorer = Metrics.pass_at_k_math.value.sample_level_fn  # PassAtK; compute_score = the extractive-match metric
out = []
for gold, text in json.load(sys.stdin):
    text = remove_reasoning_tags(text, [("<think>", "</think>")])
    text = text.strip()  # PassAtK(strip_strings=True)
    out.append(float(scorer.compute_score(doc=Doc(query="", choices=[gold], gold_index=0),
                                    model_response=ModelResponse(text=[text]))))
print(json.dumps(out))
'''


def cases(data_dir: str | None, per_benchmark: int = 25) -> list[tuple[str, str, str]]:
    """(benchmark, gold, response): right and wrong answers in the forms models write them, over every benchmark."""
    from eval.benchmarks import BENCHMARKS, load_benchmark

    out = []
    for name in BENCHMARKS:
        rows, _ = load_benchmark(name, data_dir, per_benchmark)
        for r in rows:
            g = r["answer"]
            out += [(name, g, f"Therefore, the final answer is: $\\boxed{{{g}}}$. I hope it is correct"),
                    (name, g, f"<think>Maybe \\boxed{{0}}.</think> The answer is \\boxed{{{g}}}."),
                    (name, g, "The answer is \\boxed{" + g + "1}."),  # a wrong digit appended
                    (name, g, f"We get {g}."),
                    (name, g, f"\\boxed{{0}} or rather \\boxed{{{g}}}")]
    from tests.test_eval_grading import CASES  # the hand-written right/wrong answers of the grading tests

    golds = {name: {r["id"]: r["answer"] for r in load_benchmark(name, data_dir)[0]} for name in CASES}
    for name, problems in CASES.items():
        for pid, (right, wrong) in problems.items():
            out += [(name, golds[name][pid], f"So the final answer is {t}.") for t in right + wrong]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lighteval-python", default="/tmp/lighteval-venv/bin/python")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", help="write the pairs and both verdicts here (JSON)")
    args = ap.parse_args(argv)
    from rewards.math import math_verify

    pairs = cases(args.data_dir)
    ours = math_verify(None, [t for _, _, t in pairs], [g for _, g, _ in pairs], extraction="math_verify",
                       think="split")
    proc = subprocess.run([args.lighteval_python, "-c", LIGHTEVAL_SIDE], input=json.dumps([[g, t] for _, g, t in pairs]),
                          capture_output=True, text=True, check=True)
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [{"benchmark": b, "gold": g, "response": t, "ours": o, "lighteval": l}
            for (b, g, t), o, l in zip(pairs, ours, theirs)]
    disagree = [r for r in rows if r["ours"] != r["lighteval"]]
    print(f"{len(rows)} responses, {len(disagree)} disagreements")
    for r in disagree:
        print(f"  {r['benchmark']}: gold {r['gold']!r}, response {r['response']!r}: ours {r['ours']}, "
              f"lighteval {r['lighteval']}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0 if not disagree else 1


if __name__ == "__main__":
    sys.exit(main())

"""Cross-check: our verdicts under the `lighteval` protocol against lighteval's own metric, response by response.

lighteval (0.13, PyPI) pins latex2sympy2_extended 1.0.6 (math-verify 0.9, ours, needs 1.11) and its own torch /
transformers / datasets, so it lives in a SEPARATE venv, never in reasonrl's:
`python -m venv /tmp/lighteval-venv && /tmp/lighteval-venv/bin/pip install "lighteval[math]==0.13.*"`.
The same (gold, response) pairs are scored twice: here with the `math_verify` reward under the lighteval protocol's
grading (eval/protocols.py: extraction="lighteval", think="tags"; `--extraction/--think` pick another), and in that
venv exactly as lighteval's pipeline does: remove_reasoning_tags, PassAtK's strip, Metrics.pass_at_k_math's
MultilingualExtractiveMatchMetric. The gold on lighteval's side is the one its own task gives where it has one
(`math_500`: "ANSWER: " + the solution, `aime24`/`aime25`: the answer); ours is the benchmark's answer column.

The responses: `--samples DIR` reads the saved responses of an eval folder (`reasonrl eval --out DIR`, every
samples/<benchmark>.jsonl); without it, constructed ones: right and wrong answers in the forms models write them,
several per problem of every benchmark, and the hand-written cases of tests/test_eval_grading.py. Every
disagreement is printed; exit 1 if there is one.

    python bench/lighteval_crosscheck.py [--lighteval-python /tmp/lighteval-venv/bin/python] [--data-dir DIR]
                                         [--samples EVAL_DIR] [--out pairs.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Runs in the lighteval venv: stdin = [[task or null, row, gold, response], ...], stdout = [verdict, ...].
LIGHTEVAL_SIDE = r'''
import json, logging, sys
logging.disable(logging.WARNING)  # "did not manage to extract a prediction" on every wrong response
from lighteval.metrics.metrics import Metrics
from lighteval.models.model_output import ModelResponse
from lighteval.pipeline import ParallelismManager, PipelineParameters
from lighteval.tasks.requests import Doc
from lighteval.tasks.tasks.aime import aime_prompt
from lighteval.tasks.tasks.math_500 import math_500_prompt
from lighteval.utils.utils import remove_reasoning_tags

tags = PipelineParameters(launcher_type=ParallelismManager.NONE).reasoning_tags  # the pipeline's defaults: remove, <think> pairs
metric = Metrics.pass_at_k_math.value.sample_level_fn  # PassAtK(strip_strings=True) over the extractive match
tasks = {"math500": math_500_prompt, "aime24": aime_prompt, "aime25": aime_prompt}
out = []
for task, row, gold, text in json.load(sys.stdin):
    # A benchmark lighteval has no task for: the answer boxed, as a MATH-500 solution gives it (and as ours reads it).
    doc = tasks[task](row) if task in tasks else Doc(query="", choices=["\\boxed{%s}" % gold], gold_index=0)
    text = remove_reasoning_tags(text, tags)
    doc = Doc(query=doc.query, choices=[metric.preprocess(c) for c in doc.choices], gold_index=doc.gold_index)
    out.append(float(metric.compute_score(doc=doc, model_response=ModelResponse(text=[metric.preprocess(text)]))))
print(json.dumps(out))
'''


def constructed(data_dir: str | None, per_benchmark: int = 25) -> list[dict]:
    """Right and wrong answers in the forms models write them, over every benchmark."""
    from eval.benchmarks import BENCHMARKS, load_benchmark

    out = []
    for name in BENCHMARKS:
        rows, _ = load_benchmark(name, data_dir, per_benchmark)
        for r in rows:
            g = r["answer"]
            out += [{"benchmark": name, "row": r, "response": t} for t in (
                f"Therefore, the final answer is: $\\boxed{{{g}}}$. I hope it is correct",
                f"<think>Maybe \\boxed{{0}}.</think> The answer is \\boxed{{{g}}}.",
                "The answer is \\boxed{" + g + "1}.",  # a wrong digit appended
                f"We get {g}.",
                f"\\boxed{{0}} or rather \\boxed{{{g}}}")]
    from tests.test_eval_grading import CASES  # the hand-written right/wrong answers of the grading tests

    rows = {name: {r["id"]: r for r in load_benchmark(name, data_dir)[0]} for name in CASES}
    for name, problems in CASES.items():
        for pid, (right, wrong) in problems.items():
            out += [{"benchmark": name, "row": rows[name][pid], "response": f"So the final answer is {t}."}
                    for t in right + wrong]
    return out


def saved(folder: str, data_dir: str | None) -> list[dict]:
    """The saved responses of an eval folder, with their benchmark rows (lighteval's MATH-500 gold is the solution)."""
    from eval.benchmarks import BENCHMARKS, load_benchmark
    from eval.runner import SAMPLES_DIR, SETTINGS_FILE, read_samples

    meta = json.loads((Path(folder) / SETTINGS_FILE).read_text())
    out = []
    for name in meta["benchmarks"]:
        by_id = {r["id"]: r for r in load_benchmark(name, data_dir)[0]} if name in BENCHMARKS else {}
        for rec in read_samples(Path(folder) / SAMPLES_DIR / f"{name}.jsonl"):
            row = by_id.get(str(rec["problem_id"]), {"id": rec["problem_id"], "problem": "", "answer": rec["answer"]})
            out.append({"benchmark": name, "row": row, "response": rec["completion"], "saved": rec.get("correct")})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lighteval-python", default="/tmp/lighteval-venv/bin/python")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--samples", metavar="EVAL_DIR", help="an eval folder whose saved responses to check")
    ap.add_argument("--extraction", default=None, help="our grading (default: the lighteval protocol's)")
    ap.add_argument("--think", default=None)
    ap.add_argument("--out", help="write the pairs and both verdicts here (JSON)")
    args = ap.parse_args(argv)
    from eval.protocols import get_protocol
    from rewards.math import math_verify

    protocol = get_protocol("lighteval")
    extraction, think = args.extraction or protocol.extraction, args.think or protocol.think
    pairs = saved(args.samples, args.data_dir) if args.samples else constructed(args.data_dir)
    ours = math_verify(None, [p["response"] for p in pairs], [p["row"]["answer"] for p in pairs],
                       extraction=extraction, think=think)
    keep = ("problem", "answer", "solution")  # what lighteval's prompt functions read
    job = [[p["benchmark"], {k: p["row"][k] for k in keep if k in p["row"]}, p["row"]["answer"], p["response"]]
           for p in pairs]
    proc = subprocess.run([args.lighteval_python, "-c", LIGHTEVAL_SIDE], input=json.dumps(job), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        return 2
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [{"benchmark": p["benchmark"], "problem_id": p["row"]["id"], "gold": p["row"]["answer"],
             "response": p["response"], "ours": o, "lighteval": l, **({"saved": p["saved"]} if "saved" in p else {})}
            for p, o, l in zip(pairs, ours, theirs)]
    disagree = [r for r in rows if r["ours"] != r["lighteval"]]
    print(f"{len(rows)} responses ({sum(r['lighteval'] for r in rows):.0f} right by lighteval), grading "
          f"extraction={extraction} think={think}: {len(disagree)} disagreements")
    for r in disagree:
        print(f"  {r['benchmark']} {r['problem_id']}: gold {r['gold']!r}, response {r['response'][-300:]!r}: "
              f"ours {r['ours']}, lighteval {r['lighteval']}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0 if not disagree else 1


if __name__ == "__main__":
    sys.exit(main())

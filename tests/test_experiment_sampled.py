"""`reasonrl experiment --sampled K`'s report on hand-made sample folders (the `reasonrl eval` layout): avg@K, paired
differences against the start and the reference, redundant steps per sample, necessary steps kept, and the
frontier from sampled responses. The numbers below are worked out by hand from the files written."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from eval.redundancy import record_fields
from launch.experiment import load_configs
from launch.experiment_sampled import RUN_DIR, START, START_DIR, markdown_sampled, sampled_report
from launch.experiment_steps import problem_rows
from rewards.testbed import necessary_steps
from rl.data.testbed import END_KINDS, KIND_PROBS_V2, generate, redundant_line

ROOT = Path(__file__).resolve().parent.parent
K = 4


def _solution(tb: dict, kinds: tuple[str, ...], drop_necessary: bool = False) -> str:
    a, op, b = tb["a"], tb["op"], tb["b"]
    lines = [redundant_line("restate", a, op, b)] if "restate" in kinds else []
    necessary = [line for line, _, _ in necessary_steps(a, op, b)]
    lines += necessary[1:] if drop_necessary else necessary
    lines += [redundant_line(k, a, op, b) for k in END_KINDS if k in kinds]
    return "\n".join(lines + [f"The answer is \\boxed{{{a + b}}}."])


def _write(folder: Path, rows: list[dict], bench: str, make) -> None:
    """make(problem index, sample index) -> (kinds, correct, tokens, drop_necessary)."""
    recs = []
    for i, row in enumerate(rows):
        for s in range(K):
            kinds, correct, tokens, drop = make(i, s)
            text = _solution(row["testbed"], kinds, drop)
            recs.append({"benchmark": bench, "problem_id": row["id"], "sample": s, "completion": text,
                         "tokens": tokens, "finish_reason": "stop", "correct": correct, **record_fields(row, text)})
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "samples" / f"{bench}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.fixture()
def experiment(tmp_path):
    data = tmp_path / "tb"
    generate(data, None, seed=3, sft=10, train=4, heldout=4, difficulty=0, min_redundant=0, max_redundant=7,
             probs=KIND_PROBS_V2, independent=True, reasoner={"width": 32, "layers": 1})
    rows = [json.loads(x) for x in (data / "heldout.jsonl").read_text().splitlines()]
    configs = []
    for name in ("testbed2_grpo", "testbed2_fgo_std"):
        cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        cfg["data"].update(eval=str(data / "heldout.jsonl"), eval_size=4)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        configs.append(str(tmp_path / f"{name}.yaml"))
    out = tmp_path / "out"
    three = ("restate", "other_route", "final_check")
    # Start: 3 redundant steps, half the samples correct on every problem.
    _write(out / START_DIR, rows, "heldout", lambda i, s: (three, s < 2, 100, False))
    runs = []
    for seed in (0, 1):
        cfgs = load_configs(configs, out, [f"trainer.seed={seed}"], suffix=f"-s{seed}")
        grpo, fgo = (Path(cfgs[n].trainer.output_dir) / RUN_DIR for n in ("testbed2_grpo", "testbed2_fgo_std"))
        # GRPO: 3 steps kept, 3 of 4 samples correct. FGO: drops the final check (2 steps), all correct at seed 0,
        # half at seed 1; its first problem's samples skip a necessary step.
        _write(grpo, rows, "heldout", lambda i, s: (three, s < 3, 100, False))
        _write(fgo, rows, "heldout", lambda i, s, seed=seed: (three[:2], seed == 0 or s < 2, 60, i == 0))
        runs += list(cfgs.items())
    return out, runs


def test_avg_at_k_steps_and_differences_from_the_samples(experiment):
    out, runs = experiment
    rep = sampled_report(runs, out, problem_rows(runs[0][1]))
    assert rep["k"] == K and rep["reference"] == "testbed2_grpo"
    assert rep["start"]["avg_at_k"] == 0.5 and rep["start"]["redundant_mean"] == 3.0
    by = {(r["method"], r["seed"]): r for r in rep["runs"]}
    assert by[("testbed2_grpo", 0)]["avg_at_k"] == 0.75
    assert by[("testbed2_grpo", 0)]["avg_at_k_vs_start"]["mean"] == pytest.approx(0.25)
    fgo0, fgo1 = by[("testbed2_fgo_std", 0)], by[("testbed2_fgo_std", 1)]
    assert fgo0["avg_at_k"] == 1.0 and fgo1["avg_at_k"] == 0.5
    assert fgo0["avg_at_k_vs_ref"]["mean"] == pytest.approx(0.25) and fgo1["avg_at_k_vs_ref"]["mean"] == -0.25
    assert fgo0["redundant_mean"] == 2.0 and fgo0["redundant_vs_ref"]["mean"] == -1.0
    assert fgo0["redundant_vs_start"]["mean"] == -1.0 and fgo0["distribution"] == {"0": 0, "1": 0, "2": 16}
    assert fgo0["necessary_kept_correct"] == 0.75  # problem 0's 4 correct samples miss a necessary step
    assert fgo0["tokens"] == 60 and fgo0["truncated"] == 0
    pooled = {p["method"]: p for p in rep["pooled"]}
    assert pooled["testbed2_fgo_std"]["avg_at_k"] == 0.75  # seeds pooled as 8 samples per problem
    assert pooled["testbed2_fgo_std"]["avg_at_k_seed_spread"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert pooled["testbed2_fgo_std"]["avg_at_k_vs_ref"]["mean"] == 0.0
    # The frontier from samples: FGO's 60-token answers count from B = 64, GRPO's and the start's only at 100+.
    curves = rep["accuracy_at_budget"]
    assert set(curves) == {START, "testbed2_grpo", "testbed2_fgo_std"}
    assert curves["testbed2_fgo_std"]["64"] == 0.75 and curves["testbed2_grpo"]["64"] == 0
    assert curves["testbed2_grpo"]["108"] == 0.75 and curves[START]["224"] == 0.5
    table = "\n".join(markdown_sampled(rep))
    assert "| testbed2_fgo_std | 0, 1 | **0.750**" in table and f"| {START} | – | **0.500**" in table


def test_no_sampled_section_while_a_run_lacks_samples(experiment):
    out, runs = experiment
    (Path(runs[-1][1].trainer.output_dir) / RUN_DIR / "samples" / "heldout.jsonl").unlink()
    assert sampled_report(runs, out, problem_rows(runs[0][1])) is None

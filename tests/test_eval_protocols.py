"""Named evaluation protocols (issue 27): each fixes prompt, sampling, samples per benchmark, budget and grading;
`reasonrl eval` options override them and metrics.json names every override; the built-in default prompt on a hub
model is warned about; a rescore keeps the eval's grading."""
import argparse
import json
import logging

import pytest

from eval.protocols import DEFAULT, PROTOCOLS, parse_samples
from eval.runner import EvalSettings, _prompt, protocol_record, rescore
from launch.eval_cli import add_eval_commands, settings_from_args
from rl.config.schema import ConfigError, load_config


def cli(*argv):
    parser = argparse.ArgumentParser()
    add_eval_commands(parser.add_subparsers())
    return settings_from_args(parser.parse_args(["eval", "--model", "tiny:llama", *argv]))


def test_the_reasonrl_protocol_is_the_default_and_every_protocol_is_valid():
    assert cli() == EvalSettings() == EvalSettings.from_protocol("reasonrl")
    assert EvalSettings().differences() == {}
    for name, p in PROTOCOLS.items():
        s = EvalSettings.from_protocol(name)
        assert s.protocol == name and s.differences() == {} and p.source
    with pytest.raises(ConfigError, match="known: reasonrl, lighteval"):
        EvalSettings.from_protocol("helm")


def test_protocol_settings_match_their_sources():
    light, qwen, r1 = (EvalSettings.from_protocol(n) for n in ("lighteval", "qwen-math", "r1-distill"))
    assert (light.max_new_tokens, light.top_p, light.extraction, light.think) == (32768, 0.95, "math_verify", "split")
    assert light.samples_for("aime24") == 64 and light.samples_for("math500") == 1
    assert qwen.greedy and qwen.rel_tol == 1e-4 and qwen.system_prompt.startswith("Please reason step by step")
    assert r1.samples == 16 and r1.system_prompt is None and r1.think == "split"
    assert r1.user_text("aime24", "What is 1+1?") == ("What is 1+1? Let's think step by step and output the final "
                                                       "answer within \\boxed{}.")
    # lighteval's templates differ per task: MATH-500 asks for "ANSWER: ...", AIME for a box.
    assert light.user_text("math500", "P?").endswith("before answering.\n\nP?") and "ANSWER:" in light.user_text(
        "math500", "P?")
    assert "$\\boxed{ANSWER}$" in light.user_text("aime24", "P?")
    assert EvalSettings().user_text("math500", "P?", " Be brief.") == "P? Be brief."  # the run's template


def test_cli_overrides_and_per_benchmark_samples():
    s = cli("--protocol", "lighteval", "--samples", "aime24=16", "--max-new-tokens", "4096")
    assert s.samples_for("aime24") == 16 and s.samples_for("aime25") == 64 and s.samples_for("math500") == 1
    record = protocol_record(s)
    assert record["protocol"] == "lighteval" and "lighteval 0.13" in record["protocol_source"]
    assert record["differs_from_protocol"] == {
        "max_new_tokens": {"protocol": 32768, "used": 4096},
        "samples_per_benchmark": {"protocol": {"aime24": 64, "aime25": 64}, "used": {"aime24": 16, "aime25": 64}}}
    s = cli("--protocol", "lighteval", "--samples", "4")  # a bare N: every benchmark not named
    assert s.samples_for("aime24") == 4 and s.samples_for("math500") == 4
    s = cli("--protocol", "qwen-math", "--temperature", "0.7", "--samples", "8")  # a temperature means sampling
    assert not s.greedy and s.samples == 8
    with pytest.raises(ConfigError, match="--greedy"):
        cli("--protocol", "qwen-math", "--samples", "8")
    assert parse_samples("4,aime24=16") == (4, {"aime24": 16}) and parse_samples(None) == (None, {})
    for bad in ("x", "aime24=0", "aime24=two"):
        with pytest.raises(ConfigError, match="--samples"):
            parse_samples(bad)


def test_the_built_in_prompt_on_a_hub_model_is_warned_about(caplog):
    cfg = load_config(None, [])
    with caplog.at_level(logging.WARNING, logger="reasonrl.eval"):
        assert _prompt(EvalSettings(), cfg, None, None, "Qwen/Qwen2.5-Math-1.5B") == (cfg.data.system_prompt, "")
    assert "built-in default prompt" in caplog.text and "--protocol" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reasonrl.eval"):  # a protocol's own prompt: nothing to warn about
        assert _prompt(EvalSettings.from_protocol("fgo"), cfg, None, None, "m")[0].startswith("You are a helpful")
        _prompt(EvalSettings(), cfg, None, "configs/x.yaml", "m")  # the model's training template given
    assert caplog.text == ""


def test_rescore_keeps_the_eval_s_grading(tmp_path):
    """A lighteval-protocol eval joins several boxes; its rescore must too (not fall back to the last box)."""
    meta = {"model": "m", "seed": 0, "max_new_tokens": 64, "benchmarks": {"mini": {}}, "verifier": "math_verify",
            "protocol": "lighteval", "extraction": "math_verify", "think": "split", "rel_tol": 0.0}
    (tmp_path / "samples").mkdir()
    (tmp_path / "eval_config.json").write_text(json.dumps(meta))
    texts = [r"<think>\boxed{7}</think> so \boxed{2} and \boxed{3}", r"\boxed{3}"]
    rows = [{"problem_id": "p", "sample": i, "answer": "2, 3", "completion": t, "tokens": 9, "finish_reason": "stop",
             "extracted": None, "correct": False} for i, t in enumerate(texts)]
    (tmp_path / "samples" / "mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = rescore(tmp_path, timeout=60)
    saved = [json.loads(line) for line in (tmp_path / "samples" / "mini.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in saved] == [True, False] and saved[0]["extracted"] == "2,3"
    assert metrics["mini"]["accuracy"] == 0.5
    assert json.loads((tmp_path / "metrics.json").read_text())["extraction"] == "math_verify"
    assert DEFAULT.extraction == "last_box"  # the training rule stays the default

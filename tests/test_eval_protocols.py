"""Named evaluation protocols (issue 27): each fixes prompt, sampling, samples per benchmark, budget and grading;
`reasonrl eval` options override them and metrics.json names every override; the built-in default prompt on a hub
model is warned about; a rescore keeps the eval's grading, takes another protocol's when the responses were generated
as that protocol would, and otherwise names what differs; `trainer.eval_protocol` is checked at config load and gives
the in-training eval its prompt and grading."""
import argparse
import dataclasses
import json
import logging

import pytest

from eval.protocols import DEFAULT, PROTOCOLS, parse_samples
from eval.rescore import rescore
from eval.runner import EvalSettings, _prompt, protocol_record
from launch.eval_cli import add_eval_commands, settings_from_args
from rl.config.schema import ConfigError, load_config
from tests.shared_data import DATA, needs_shared_data


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
    assert (light.max_new_tokens, light.top_p, light.extraction, light.think) == (32768, 0.95, "lighteval", "tags")
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


# --------------------------------------------------------------- rescoring under another protocol's grading

def _folder(tmp_path, texts, answer, **meta):
    """An eval folder as `reasonrl eval` writes it (eval_config.json, samples/mini.jsonl), with `texts` saved."""
    meta = {"model": "m", "seed": 0, "benchmarks": {"mini": {}}, "verifier": "math_verify",
            **dataclasses.asdict(EvalSettings.from_protocol(meta.pop("protocol", "reasonrl"))), **meta}
    (tmp_path / "samples").mkdir()
    (tmp_path / "eval_config.json").write_text(json.dumps(meta))
    rows = [{"problem_id": "p", "sample": i, "answer": answer, "completion": t, "tokens": 9, "finish_reason": "stop",
             "extracted": None, "correct": False} for i, t in enumerate(texts)]
    (tmp_path / "samples" / "mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _saved(folder):
    return [json.loads(line) for line in (folder / "samples" / "mini.jsonl").read_text().splitlines()]


def test_rescore_with_the_eval_s_own_protocol_takes_its_current_grading(tmp_path):
    """A lighteval folder graded before lighteval's own metric was matched (math_verify, split) joins `\\boxed{0} or
    rather \\boxed{5}` into {0, 5}; `--rescore --protocol lighteval` regrades it as lighteval 0.13 does (the last
    box). A generation override of that eval (here its budget) stays recorded, nothing is refused."""
    texts = [r"\boxed{0} or rather \boxed{5}"]
    folder = _folder(tmp_path, texts, "5", protocol="lighteval", extraction="math_verify", think="split",
                     max_new_tokens=4096)
    rescore(folder, timeout=60)
    assert [r["correct"] for r in _saved(folder)] == [False]
    rescore(folder, timeout=60, protocol="lighteval")
    assert [r["correct"] for r in _saved(folder)] == [True]
    meta = json.loads((folder / "eval_config.json").read_text())
    assert (meta["protocol"], meta["extraction"], meta["think"], meta["rescored_from"]) == (
        "lighteval", "lighteval", "tags", [{"protocol": "lighteval", "extraction": "math_verify", "think": "split",
                                            "rel_tol": 0.0}])
    written = json.loads((folder / "metrics.json").read_text())
    assert written["differs_from_protocol"] == {"max_new_tokens": {"protocol": 32768, "used": 4096}}


def test_rescore_takes_another_protocol_s_grading_or_says_what_differs(tmp_path):
    texts = [r"\boxed{0} or rather \boxed{5}", r"The final answer is 5", r"\boxed{4}"]
    folder = _folder(tmp_path, texts, "5")  # a reasonrl eval: run template, T 0.6, top_p 1, 2048 tokens
    rescore(folder, timeout=60)
    assert [r["correct"] for r in _saved(folder)] == [True, False, False]  # the last box
    # lighteval would have generated with its own template, top_p 0.95 and 32k tokens: refused, each named.
    with pytest.raises(ConfigError) as err:
        rescore(folder, timeout=60, protocol="lighteval")
    text = str(err.value)
    for setting in ("prompt_from_run (True there, False in lighteval)", "top_p (1.0 there, 0.95 in lighteval)",
                    "max_new_tokens (2048 there, 32768 in lighteval)", "only a new eval changes",
                    "(--extraction lighteval --think tags --rel-tol 0.0): reasonrl eval --rescore",
                    "--grading lighteval"):
        assert setting in text, (setting, text)
    assert [r["correct"] for r in _saved(folder)] == [True, False, False]  # nothing rewritten
    # ... its grading alone is allowed: the folder stays reasonrl and says where it departs.
    metrics = rescore(folder, timeout=60, grading_of="lighteval", grading={"rel_tol": None})
    assert [r["correct"] for r in _saved(folder)] == [True, True, False] and metrics["mini"]["accuracy"] == 2 / 3
    written = json.loads((folder / "metrics.json").read_text())
    assert written["protocol"] == "reasonrl" and written["grading_of"] == "lighteval"
    assert written["differs_from_protocol"] == {
        "extraction": {"protocol": "last_box", "used": "lighteval"}, "think": {"protocol": "keep", "used": "tags"}}
    meta = json.loads((folder / "eval_config.json").read_text())
    assert (meta["extraction"], meta["think"]) == ("lighteval", "tags")
    rescore(folder, timeout=60)  # a later plain rescore keeps the grading it was given
    assert [r["correct"] for r in _saved(folder)] == [True, True, False]
    with pytest.raises(ConfigError, match="--extraction must be one of"):
        rescore(folder, timeout=60, grading={"extraction": "first_box"})


def test_rescore_refuses_generation_options(tmp_path):
    folder = _folder(tmp_path, [r"\boxed{5}"], "5")
    parser = argparse.ArgumentParser()
    add_eval_commands(parser.add_subparsers())
    args = parser.parse_args(["eval", "--rescore", str(folder), "--max-new-tokens", "4096", "--top-p", "0.9"])
    with pytest.raises(ConfigError, match="--top-p, --max-new-tokens would change how they are generated"):
        args.handler(args)
    args = parser.parse_args(["eval", "--model", "m", "--grading", "lighteval"])
    with pytest.raises(ConfigError, match="--grading goes with --rescore"):
        args.handler(args)


# ------------------------------------------------------------------- trainer.eval_protocol (in-training eval)

def test_eval_protocol_key_is_validated_at_config_load():
    from launch.run import load_training_config

    assert load_config(None, []).trainer.eval_protocol == "reasonrl"  # the default: the behaviour before the key
    with pytest.raises(ConfigError, match=r"^config key 'trainer.eval_protocol': unknown protocol 'fgoo'; known: "
                       r"reasonrl, lighteval, qwen-math, r1-distill, fgo; did you mean 'fgo'\?$"):
        load_training_config(None, ["trainer.eval_protocol=fgoo"])
    for recipe in ("recipe_fgo_math", "recipe_grpo_math"):  # both GPU recipes evaluate as FGO's paper does
        cfg = load_training_config(f"configs/{recipe}.yaml", check_environment=False)
        assert cfg.trainer.eval_protocol == "fgo"


@needs_shared_data
@pytest.mark.parametrize("protocol", ["reasonrl", "fgo", "lighteval"])
def test_in_training_eval_uses_the_protocol_s_prompt_and_grading(protocol):
    from eval.in_training import BenchmarkEval

    cfg = load_config(None, ["model.path=tiny:llama", "trainer.eval_every=5", "trainer.eval_limit=2",
                             f"trainer.eval_data_dir={DATA}", "trainer.eval_benchmarks=[math500]",
                             f"trainer.eval_protocol={protocol}", "rollout.max_new_tokens=64",
                             "data.system_prompt=RUN PROMPT"])
    ev = BenchmarkEval(cfg)
    s, p = ev.settings, PROTOCOLS[protocol]
    # sampling and budget: the trainer's; prompt and grading: the protocol's
    assert (s.protocol, s.greedy, s.max_new_tokens, s.samples) == (protocol, True, 64, 1)
    assert (s.extraction, s.think, s.rel_tol) == (p.extraction, p.think, p.rel_tol)
    assert s.verifier_kwargs() == {"extraction": p.extraction, "think": p.think, "rel_tol": p.rel_tol}
    _, rows, prompts = ev.sets[0]
    assert rows[0]["problem"] in prompts[0]
    assert ("RUN PROMPT" in prompts[0]) == (protocol == "reasonrl")
    if protocol == "fgo":
        assert p.system_prompt in prompts[0]
    if protocol == "lighteval":
        assert '"ANSWER: $ANSWER"' in prompts[0]
    assert set(protocol_record(s)["differs_from_protocol"]) >= {"max_new_tokens", "greedy"}

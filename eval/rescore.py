"""`reasonrl eval --rescore`: re-grade an eval folder's saved responses without generating again, under the grading
it was made with, another protocol's (refused where that protocol would have generated differently) or another
grading alone. Split from eval.runner, which generates."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from eval.metrics import benchmark_metrics
from eval.protocols import DEFAULT, get_protocol
from eval.runner import (SAMPLES_DIR, SETTINGS_FILE, VERIFIER, EvalSettings, protocol_record, read_samples,
                         write_metrics, write_samples)
from rewards.answers import extracted_answer
from rewards.isolation import IsolatedRewards
from rl.config.schema import ConfigError
from rl.store.atomic import write_atomic

# Settings the responses were generated with: a rescore cannot change them (GRADING it can).
GENERATION = ("prompt_from_run", "system_prompt", "user_template", "user_templates", "greedy", "temperature", "top_p",
              "samples", "max_new_tokens")
GRADING = ("extraction", "think", "rel_tol")


def _saved_settings(meta: dict) -> EvalSettings:
    """The settings an eval folder was made with (a setting missing from an older folder: its reasonrl default)."""
    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    saved = {k: v for k, v in meta.items() if k in fields and k != "verifier"}
    settings = EvalSettings(**saved)  # verifier left at math_verify: checking a saved file path is not needed here
    settings.verifier = meta.get("verifier", VERIFIER)
    return settings


def generation_differences(meta: dict, protocol: str) -> list[str]:
    """What the saved responses of an eval folder were generated with that `protocol` would generate differently:
    `setting (saved value there, the protocol's)` for the prompt, sampling, samples per benchmark and budget."""
    saved, p = _saved_settings(meta), EvalSettings.from_protocol(protocol)
    diff = []

    def differs(name, a, b):
        if a != b:
            diff.append(f"{name} ({a!r} there, {b!r} in {protocol})")

    differs("prompt_from_run", saved.prompt_from_run, p.prompt_from_run)
    if not p.prompt_from_run and not saved.prompt_from_run:
        differs("system_prompt", meta.get("system_prompt", saved.system_prompt), p.system_prompt)
    for name in meta.get("benchmarks", {}):
        if not p.prompt_from_run and not saved.prompt_from_run:
            differs(f"user template of {name}", saved.user_text(name, "{problem}"), p.user_text(name, "{problem}"))
        differs(f"samples of {name}", saved.samples_for(name), p.samples_for(name))
    differs("greedy", saved.greedy, p.greedy)
    if not (saved.greedy and p.greedy):
        differs("temperature", saved.temperature, p.temperature)
        differs("top_p", saved.top_p, p.top_p)
    differs("max_new_tokens", saved.max_new_tokens, p.max_new_tokens)
    return diff


def rescore(out: str | Path, timeout: float | None = 30.0, protocol: str | None = None,
            grading: dict | None = None, grading_of: str | None = None) -> dict:
    """Re-verify every saved response of an eval folder (no generation) and rewrite its samples and metrics.

    By default with the grading the eval was made with. `protocol`: grade with that protocol's extraction /
    `</think>` / tolerance (the eval's own protocol: its current grading); another protocol is refused (ConfigError naming every setting) when the responses were
    generated otherwise than the protocol would (prompt, sampling, samples, budget: only a new eval changes those).
    `grading_of`: grade with that protocol's grading alone, whatever generated the responses (the folder keeps its
    protocol and metrics.json lists the grading that departs from it, and `grading_of`). `grading`: {extraction,
    think, rel_tol} values over either (None: not given). eval_config.json is updated to the grading used, so a later
    rescore or a resumed eval keeps it."""
    out = Path(out)
    if not (out / SETTINGS_FILE).is_file():
        raise FileNotFoundError(f"--rescore: {out} has no {SETTINGS_FILE} (not an eval folder)")
    meta = json.loads((out / SETTINGS_FILE).read_text())
    verifier_name = meta.get("verifier", VERIFIER)  # the eval's own verifier: a rescore must not switch it
    old_protocol = meta.get("protocol", DEFAULT.name)
    # A folder from before the protocols was graded at the reasonrl defaults.
    old_grading = {k: meta.get(k, getattr(DEFAULT, k)) for k in GRADING}
    new_protocol = protocol or old_protocol
    if protocol is not None:  # its grading; another protocol only if it would have generated these responses
        target = get_protocol(protocol)
        diff = generation_differences(meta, protocol) if protocol != old_protocol else []
        if diff:
            options = " ".join(f"--{k.replace('_', '-')} {getattr(target, k)}" for k in GRADING)
            raise ConfigError(f"--rescore {out} --protocol {protocol}: these responses were generated otherwise than "
                              f"{protocol} would generate them, which only a new eval changes (reasonrl eval "
                              f"--protocol {protocol}): {'; '.join(diff)}. To grade them with {protocol}'s grading "
                              f"alone ({options}): reasonrl eval --rescore {out} --grading {protocol}")
        if verifier_name != VERIFIER:
            raise ConfigError(f"--rescore --protocol {protocol}: this eval's verifier {verifier_name!r} grades its "
                              f"own way; a protocol's grading applies to {VERIFIER}")
        new_grading = {k: getattr(target, k) for k in GRADING}
    elif grading_of is not None:
        new_grading = {k: getattr(get_protocol(grading_of), k) for k in GRADING}
    else:
        new_grading = dict(old_grading)
    for k, v in (grading or {}).items():
        if k not in GRADING:
            raise ConfigError(f"--rescore can change only the grading ({', '.join(GRADING)}), not {k}")
        if v is not None:
            new_grading[k] = v
    if verifier_name != VERIFIER and new_grading != old_grading:
        raise ConfigError(f"--rescore: this eval's verifier {verifier_name!r} grades its own way; --extraction, "
                          f"--think and --rel-tol apply to {VERIFIER}")
    check = dataclasses.replace(_saved_settings(meta), verifier=VERIFIER, **new_grading)  # validates the values
    kwargs = new_grading if verifier_name == VERIFIER else {}
    metrics = {}
    with IsolatedRewards([(verifier_name, kwargs)], timeout, chunk_size=64) as verifier:
        for name in meta["benchmarks"]:
            path = out / SAMPLES_DIR / f"{name}.jsonl"
            records = read_samples(path)
            if not records:
                continue
            texts = [r["completion"] for r in records]
            result = verifier.score([""] * len(texts), texts, {"answer": [r["answer"] for r in records]})
            for r, s, text in zip(records, result.scores[verifier_name], texts):
                r.update(score=float(s), correct=bool(s > 0.5),
                         extracted=extracted_answer(text, new_grading["extraction"], new_grading["think"]))
            write_samples(path, records)
            metrics[name] = dict(benchmark_metrics(records, seed=meta.get("seed", 0),
                                                   budget=meta.get("max_new_tokens")),
                                 verifier_failures=result.failures[verifier_name],
                                 verifier_timeouts=result.timeouts[verifier_name])
    if new_grading != old_grading or new_protocol != old_protocol:
        meta.setdefault("rescored_from", []).append({"protocol": old_protocol, **old_grading})
        meta.update(protocol=new_protocol, **new_grading)
        write_atomic(out / SETTINGS_FILE, json.dumps(meta, indent=2) + "\n")
    if new_protocol != old_protocol:  # generated as the protocol would (checked above): only grading may depart
        record = protocol_record(dataclasses.replace(EvalSettings.from_protocol(new_protocol), **new_grading))
    else:
        settings = dataclasses.replace(check, protocol=new_protocol)
        record = protocol_record(settings)
        if settings.prompt_from_run or meta.get("system_prompt") == settings.system_prompt:
            record["differs_from_protocol"].pop("system_prompt", None)  # the run's resolved prompt, not a departure
    extra = {"model": meta.get("model"), "rescored": True, **record, **new_grading,
             **({"grading_of": grading_of} if grading_of and new_protocol == old_protocol else {})}
    print(write_metrics(out, metrics, extra), end="", flush=True)
    return metrics

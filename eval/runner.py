"""`reasonrl eval`: generate on benchmarks through the training rollout workers, score with the training verifier.

Why it is built from the training pieces rather than beside them: an eval that decodes, budgets or extracts answers
differently from training reports numbers that disagree with the training signal. So generation goes through
rl.rollout.group.RolloutGroup (data-parallel over Ray workers, the same `generate` and sampling config as training), prompts
through rl.data.loading.render_prompt with the template of the run that produced the checkpoint (its config.yaml), and
scoring through rl.scoring.group.RewardGroup with the `math_verify` reward (`rewards.resolve("math_verify")`, in an
isolated child process with a time limit). Train-time and eval-time answer extraction are the same function.
A named protocol (eval/protocols.py, `--protocol`) fixes the prompt, sampling, samples per benchmark, budget and the
verifier's grading kwargs so the numbers can stand beside a paper's; the default, `reasonrl`, is the above.

Output folder:
  eval_config.json        model, prompt template, sampling settings, verifier, benchmark sources
  samples/<bench>.jsonl   one line per response (problem id, completion, tokens, finish reason, extracted answer,
                          correct); appended chunk by chunk, so an interrupted eval resumes where it stopped
  metrics.json            per-benchmark metrics (eval.metrics.benchmark_metrics), the protocol, its source and every
                          setting that differs from it
  results.md              the same as a Markdown table
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from eval.benchmarks import data_dir_from, load_benchmark, slug
from eval.metrics import benchmark_metrics, markdown_table
from eval.protocols import DEFAULT, PROTOCOLS, Protocol, get_protocol
from eval.redundancy import record_fields
from rewards.isolation import cap_log_messages
from rewards.answers import EXTRACTIONS, THINK_MODES, extracted_answer
from rl.config.schema import Config, ConfigError, DataConfig, RewardConfig, RewardFunction, load_config
from rl.data.loading import render_prompt
from rl.store.atomic import write_atomic
from rl.store.metrics import read_metrics
from rl.models import ModelError, load_tokenizer, resolve_model
from rl.scoring.score import score_batch

if TYPE_CHECKING:  # rl.rollout.worker imports torch and transformers: only where generation really happens
    from rl.rollout.worker import SamplingParams

log = logging.getLogger("reasonrl.eval")
cap_log_messages(log)  # its verifier-failure warnings quote the verifier's errors

VERIFIER = "math_verify"  # the training reward's registry name: the same function scores training and eval
SETTINGS_FILE, METRICS_FILE, TABLE_FILE, SAMPLES_DIR = "eval_config.json", "metrics.json", "results.md", "samples"
# Settings that change what a response is; a resumed eval must match them, or its samples would mix two setups.
_MUST_MATCH = ("model", "system_prompt", "prompt_suffix", "samples", "greedy", "temperature", "top_p",
               "max_new_tokens", "seed", "chunk_problems", "verifier", "samples_per_benchmark", "user_template",
               "user_templates", "extraction", "think", "rel_tol")


@dataclasses.dataclass
class EvalSettings:
    """Every setting of one eval. The defaults are the `reasonrl` protocol's (eval.protocols.Protocol, the one source);
    `from_protocol` starts from another protocol."""
    samples: int = DEFAULT.samples
    greedy: bool = DEFAULT.greedy
    temperature: float = DEFAULT.temperature
    top_p: float = DEFAULT.top_p
    max_new_tokens: int = DEFAULT.max_new_tokens
    seed: int = 0
    chunk_problems: int = 16  # problems per generate call (and per resume unit)
    batch_size: int = 16  # sequences per `generate` inside a worker
    # The reward that decides "correct": a registry name, `module:function` or file path (TRL's reward contract).
    # math_verify for benchmarks; exact_match where a boxed expression must not count (the testbed's sums).
    verifier: str = VERIFIER
    protocol: str = DEFAULT.name
    samples_per_benchmark: dict = dataclasses.field(default_factory=dict)  # {benchmark: samples}, over `samples`
    # The prompt: the run's template (prompt_from_run), or the protocol's system prompt and user template.
    prompt_from_run: bool = DEFAULT.prompt_from_run
    system_prompt: str | None = DEFAULT.system_prompt
    user_template: str = DEFAULT.user_template
    user_templates: dict = dataclasses.field(default_factory=dict)
    # Grading (math_verify's keyword arguments; rewards/answers.py says what each does).
    extraction: str = DEFAULT.extraction
    think: str = DEFAULT.think
    rel_tol: float = DEFAULT.rel_tol

    def __post_init__(self):
        counts = [self.samples, *self.samples_per_benchmark.values()]
        if min(counts) < 1 or self.max_new_tokens < 1 or self.chunk_problems < 1 or self.batch_size < 1:
            raise ConfigError("--samples, --max-new-tokens, --chunk-problems and --batch-size must be >= 1")
        if self.greedy and max(counts) > 1:
            raise ConfigError("--greedy gives the same response every time: use --samples 1, or sample "
                              "(--temperature) for avg@k")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ConfigError(f"--temperature must be > 0 and --top-p in (0, 1], got {self.temperature}, "
                              f"{self.top_p}")
        if self.extraction not in EXTRACTIONS or self.think not in THINK_MODES or self.rel_tol < 0:
            raise ConfigError(f"--extraction must be one of {EXTRACTIONS}, --think one of {THINK_MODES}, --rel-tol "
                              f">= 0; got {self.extraction!r}, {self.think!r}, {self.rel_tol}")
        from rewards import RewardSpecError, check_spec

        try:  # a typo fails here, before Ray starts; a file path becomes absolute for the workers
            self.verifier = check_spec(self.verifier)
        except RewardSpecError as err:
            raise ConfigError(f"--verifier: {err}") from err

    @classmethod
    def from_protocol(cls, name: str = DEFAULT.name, **overrides) -> "EvalSettings":
        """The protocol's settings with `overrides` (None values ignored: an option the user did not give)."""
        p = get_protocol(name)
        base = {f.name: getattr(p, f.name) for f in dataclasses.fields(cls) if f.name in Protocol.model_fields}
        base.update({k: v for k, v in overrides.items() if v is not None})
        base["protocol"] = p.name
        return cls(**base)

    def differences(self) -> dict:
        """{setting: {"protocol": its value, "used": this eval's}} for every setting that departs from the protocol
        (what a reader must know before putting the numbers beside the protocol's source)."""
        p = get_protocol(self.protocol)
        return {f: {"protocol": getattr(p, f), "used": getattr(self, f)} for f in Protocol.model_fields
                if f not in ("name", "source") and hasattr(self, f) and getattr(self, f) != getattr(p, f)}

    def samples_for(self, benchmark: str) -> int:
        return self.samples_per_benchmark.get(benchmark, self.samples)

    def user_text(self, benchmark: str, problem: str, suffix: str = "") -> str:
        """The user message: the protocol's template around the problem (or problem + the run's suffix)."""
        if self.prompt_from_run:
            return problem + suffix
        return self.user_templates.get(benchmark, self.user_template).format(problem=problem)

    def verifier_kwargs(self) -> dict:
        """The grading settings as reward kwargs; only math_verify takes them (another verifier grades its own way)."""
        if self.verifier != VERIFIER:
            return {}
        return {"extraction": self.extraction, "think": self.think, "rel_tol": self.rel_tol}

    def sampling(self, n: int | None = None) -> SamplingParams:
        from rl.rollout.worker import SamplingParams  # torch: kept off the import path of `reasonrl --help` and config checks

        return SamplingParams(n=n or self.samples, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=0, greedy=self.greedy, batch_size=self.batch_size,
                              logprobs=False)


def chunk_seed(seed: int, benchmark: str, chunk: int) -> int:
    """Sampling seed of one chunk: fixed by (seed, benchmark, chunk index), so a resumed eval samples the same."""
    return (seed * 1_000_003 + zlib.crc32(benchmark.encode()) + 7919 * chunk) % (2**31 - 1)


# ------------------------------------------------------------------------------------------------ the model

def locate_model(spec: str) -> tuple[str, Path | None]:
    """(model spec to resolve, the training run's config.yaml or None).

    A run folder means its `checkpoint-final`; a checkpoint inside a run (`runs/x/checkpoint-final`,
    `runs/x/checkpoints/step-N/model`) finds the run's config.yaml a few folders up (through the link, too).
    """
    path = Path(spec).expanduser()
    if not path.exists():
        return spec, None
    if (path / "config.yaml").is_file() and (path / "checkpoint-final").exists():
        return str(path / "checkpoint-final"), path / "config.yaml"
    for base in (path, path.resolve()):
        for parent in list(base.parents)[:4]:
            if (parent / "config.yaml").is_file() and ((parent / "checkpoints").is_dir()
                                                       or (parent / "checkpoint-final").exists()):
                return str(path), parent / "config.yaml"
    return str(path), None


def check_model(path: str) -> None:
    """Fail with one line before any actor starts if the folder is not a loadable causal LM."""
    from transformers import AutoConfig  # transformers: only for an eval that is about to run

    try:
        config = AutoConfig.from_pretrained(path)
        load_tokenizer(path)
    except Exception as err:
        raise ModelError(f"model at {path!r} does not load: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    if not any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
        raise ModelError(f"model at {path!r} is not a causal LM (architectures: {config.architectures})")
    if not any(Path(path).glob("*.safetensors")) and not any(Path(path).glob("*.bin")):
        raise ModelError(f"model at {path!r} has no weights (*.safetensors / *.bin)")


def eval_config(model_spec: str, run_config: Path | None, config_path: str | None, num_workers: int,
                reward_workers: int, timeout: float | None, verifier: str = VERIFIER,
                verifier_kwargs: dict | None = None) -> Config:
    """The run's config (prompt template, dtype, Ray settings) with the eval's model, workers and verifier (with its
    grading kwargs: EvalSettings.verifier_kwargs)."""
    if run_config is not None and config_path is not None:
        raise ConfigError(f"--config: the model comes from a run whose {run_config} gives the prompt template; "
                          "drop --config")
    cfg = load_config(run_config or config_path, [])
    cfg.model.path = model_spec
    # One generate call covers a whole chunk at the eval budget (2048 tokens: tens of minutes on a CPU), which the
    # training watchdog would report as stuck; an eval has no step rhythm to watch.
    cfg.trainer.watchdog_seconds = None
    cfg.rollout.num_workers = num_workers
    cfg.reward = RewardConfig(functions=[RewardFunction(fn=verifier, kwargs=verifier_kwargs or {})], accuracy=verifier,
                              num_workers=reward_workers, timeout_seconds=timeout)
    return cfg


# ------------------------------------------------------------------------------------ generation + scoring

def generate_records(rollouts, rewards, rows: list[dict], prompts: list[str], params: SamplingParams, seed: int,
                     benchmark: str, weights=None, verifier: str = VERIFIER, extraction: str = DEFAULT.extraction,
                     think: str = DEFAULT.think) -> tuple[list[dict], dict]:
    """Generate `params.n` responses per prompt on the rollout workers and score them with the verifier on the
    reward workers, through rl.scoring.score (the columns and verdict training uses). `weights`: the run's weight-sync
    owner when called from a training run (the workers must hold its version), None in a standalone eval.
    `extraction` / `think`: how the record's `extracted` answer is read (the verifier's own kwargs decide correct).
    Returns (one record per response, verifier failure counts)."""
    k = params.n
    batch = rollouts.generate(prompts, params, seed, weights=weights)
    scored = score_batch(rewards, rows, prompts, batch, [k] * len(rows), {verifier: 1.0}, verifier)
    result, scores = scored.result, scored.result.scores[verifier]
    records = []
    for i, (text, tokens) in enumerate(zip(batch.text, batch.tokens)):
        row = rows[i // k]
        records.append({"benchmark": benchmark, "problem_id": row["id"], "sample": i % k, "answer": row["answer"],
                        "completion": text, "tokens": tokens, "finish_reason": batch.finish_reason[i],
                        "extracted": extracted_answer(text, extraction, think), "correct": bool(scored.correct[i]), "score": float(scores[i]),
                        **record_fields(row, text)})  # testbed rows: redundant / necessary step counts
    failures = {"verifier_failures": result.failures.get(verifier, 0),
                "verifier_timeouts": result.timeouts.get(verifier, 0)}
    if result.errors:
        log.warning("verifier failures on %s: %s", benchmark, result.errors[:3])
    return records, failures


# -------------------------------------------------------------------------------------------- sample files

def read_samples(path: Path) -> list[dict]:
    """The records of a samples file; a last line cut off by a crash is dropped (same reader as metrics.jsonl)."""
    return read_metrics(path) if path.is_file() else []


def complete_problems(records: list[dict], k: int, ids: list[str]) -> dict[str, list[dict]]:
    """problem id -> its k records, for the problems of `ids` that have all k samples (others are redone)."""
    by_id: dict[str, dict[int, dict]] = {}
    for r in records:
        by_id.setdefault(str(r["problem_id"]), {})[int(r["sample"])] = r
    return {pid: [by_id[pid][s] for s in range(k)] for pid in ids
            if pid in by_id and all(s in by_id[pid] for s in range(k))}


def append_records(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_samples(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_metrics(out: Path, metrics: dict[str, dict], extra: dict | None = None) -> str:
    """metrics.json and results.md; returns the Markdown table."""
    table = markdown_table(metrics)
    write_atomic(out / METRICS_FILE, json.dumps({"benchmarks": metrics, **(extra or {})}, indent=2) + "\n")
    write_atomic(out / TABLE_FILE, table)
    return table


# ------------------------------------------------------------------------------------------------ the eval

def _check_resumable(out: Path, settings: dict, overwrite: bool) -> dict:
    """The settings of the eval already in `out` ({} if none or moved aside); refuses one made differently."""
    old_path = out / SETTINGS_FILE
    if not old_path.is_file():
        return {}
    if overwrite:
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        log.warning("moved the previous eval in %s to %s", out, aside)
        return {}
    old = json.loads(old_path.read_text())
    # A folder written before a setting existed was made at that setting's default (the reasonrl protocol's).
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(EvalSettings)}
    diff = [f"{k} ({old.get(k, defaults.get(k))!r} there, {settings.get(k)!r} now)" for k in _MUST_MATCH
            if old.get(k, defaults.get(k)) != settings.get(k)]
    if diff:
        raise ConfigError(f"{out} holds an eval with other settings: {'; '.join(diff)}. Use another --out, or "
                          "--overwrite to move it aside")
    return old


def _prompt(settings: EvalSettings, cfg: Config, run_config, config_path, model: str) -> tuple[str | None, str]:
    """(system prompt, user suffix) of this eval: the run's template under `prompt_from_run`, else the protocol's."""
    if not settings.prompt_from_run:
        return settings.system_prompt, ""
    if run_config is None and config_path is None and cfg.data.system_prompt == DataConfig().system_prompt:
        # A hub model never saw reasonrl's training prompt: its numbers match no paper's (issue 27).
        log.warning("%s gets reasonrl's built-in default prompt (%r): no paper evaluates with it. Pick a protocol "
                    "(--protocol %s) or the model's training template (--config)", model, cfg.data.system_prompt,
                    "|".join(p for p in PROTOCOLS if p != DEFAULT.name))
    return cfg.data.system_prompt, cfg.data.prompt_suffix


def protocol_record(settings: EvalSettings) -> dict:
    """What metrics.json says about the protocol: its name, source and every setting this eval changed."""
    return {"protocol": settings.protocol, "protocol_source": get_protocol(settings.protocol).source,
            "differs_from_protocol": settings.differences()}


def run_eval(model: str, benchmarks: list[str], out: str | Path, settings: EvalSettings, *,
             data_dir: str | None = None, limit: int | None = None, num_workers: int = 1, reward_workers: int = 1,
             config_path: str | None = None, timeout: float | None = 30.0, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Evaluate `model` on `benchmarks`; returns {benchmark: metrics}. Every input is checked before Ray starts."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    folder = data_dir_from(data_dir)
    loaded = {}
    for name in benchmarks:  # all of them first: a bad name or file fails before any generation
        rows, stats = load_benchmark(name, folder, limit)
        loaded[slug(name)] = (rows, stats)
        if stats.get("skipped_no_answer") or stats.get("skipped_no_problem"):
            log.warning("%s: skipped %d rows without an answer and %d without a problem", name,
                        stats.get("skipped_no_answer", 0), stats.get("skipped_no_problem", 0))
    spec, run_config = locate_model(model)
    cfg = eval_config(spec, run_config, config_path, num_workers, reward_workers, timeout, settings.verifier,
                      settings.verifier_kwargs())
    model_path = resolve_model(spec, cfg.model.cache_dir)
    check_model(model_path)
    tokenizer = load_tokenizer(model_path)
    system_prompt, suffix = _prompt(settings, cfg, run_config, config_path, model)

    out = Path(out).resolve()
    meta = {"model": model, "model_path": model_path, "run_config": str(run_config) if run_config else None,
            **dataclasses.asdict(settings), "system_prompt": system_prompt, "prompt_suffix": suffix, "limit": limit,
            "benchmarks": {name: stats for name, (_, stats) in loaded.items()}}
    old = _check_resumable(out, meta, overwrite)
    meta["benchmarks"] = {**old.get("benchmarks", {}), **meta["benchmarks"]}  # earlier benchmarks stay listed
    (out / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    write_atomic(out / SETTINGS_FILE, json.dumps(meta, indent=2) + "\n")

    plan, done, params = {}, {}, {}
    for name, (rows, _) in loaded.items():
        k = settings.samples_for(name)
        params[name] = settings.sampling(k)
        path = out / SAMPLES_DIR / f"{name}.jsonl"
        existing = read_samples(path)
        # Every complete problem stays in the file (a smaller --limit must not delete work); incomplete ones go.
        complete = complete_problems(existing, k, list(dict.fromkeys(str(r["problem_id"]) for r in existing)))
        write_samples(path, [rec for recs in complete.values() for rec in recs])
        done[name] = {r["id"]: complete[r["id"]] for r in rows if r["id"] in complete}
        prompts = [render_prompt(tokenizer, settings.user_text(name, r["problem"], suffix), system_prompt)
                   for r in rows]
        plan[name] = [(ci, [(r, p) for r, p in zip(rows[a:a + settings.chunk_problems],
                                                    prompts[a:a + settings.chunk_problems]) if r["id"] not in done[name]])
                      for ci, a in enumerate(range(0, len(rows), settings.chunk_problems))]
        if done[name]:
            log.info("%s: %d of %d problems already in %s, resuming", name, len(done[name]), len(rows), path)

    failures = {name: {"verifier_failures": 0, "verifier_timeouts": 0} for name in loaded}
    if any(todo for chunks in plan.values() for _, todo in chunks):
        _generate_all(cfg, model_path, out, loaded, plan, done, params, settings, failures, progress)

    metrics = {}
    for name, (rows, stats) in loaded.items():
        records = [rec for r in rows for rec in done[name][r["id"]]]
        metrics[name] = dict(benchmark_metrics(records, seed=settings.seed, budget=settings.max_new_tokens),
                             skipped_no_answer=stats.get("skipped_no_answer", 0), **failures[name])
    table = write_metrics(out, metrics, {"model": model, **protocol_record(settings), "system_prompt": system_prompt,
                                         "settings": dataclasses.asdict(settings)})
    print(table, end="", flush=True)
    return metrics


def _generate_all(cfg, model_path, out, loaded, plan, done, params, settings, failures, progress) -> None:
    # Ray and torch (through rl.cluster.session) only once every input is checked and there is something to generate.
    import ray.exceptions
    from tqdm import tqdm

    from rl.cluster.session import init_ray, shutdown

    from rl.scoring.group import RewardGroup

    from rl.rollout.group import RolloutGroup

    init_ray(cfg)
    groups: list = []
    try:
        groups.append(RolloutGroup(cfg, model_path))
        groups.append(RewardGroup(cfg))
        try:  # constructor errors (a model that does not load in the worker) surface at the first call
            for g in groups:
                g.nodes()
        except ray.exceptions.RayActorError as err:
            raise ModelError(f"eval workers did not start: {str(err).splitlines()[0][:300]}") from err
        for name, chunks in plan.items():
            rows = loaded[name][0]
            path = out / SAMPLES_DIR / f"{name}.jsonl"
            correct = sum(r["correct"] for recs in done[name].values() for r in recs)
            n = params[name].n
            seen = len(done[name]) * n
            bar = tqdm(total=len(rows), initial=len(done[name]), desc=name, unit="problem", file=sys.stderr,
                       dynamic_ncols=True, disable=not progress)
            for ci, todo in chunks:
                if not todo:
                    continue
                records, fails = generate_records(groups[0], groups[1], [r for r, _ in todo], [p for _, p in todo],
                                                  params[name], chunk_seed(settings.seed, name, ci), name,
                                                  verifier=cfg.reward.accuracy, extraction=settings.extraction,
                                                  think=settings.think)
                append_records(path, records)
                for key, v in fails.items():
                    failures[name][key] += v
                for i, (r, _) in enumerate(todo):
                    done[name][r["id"]] = records[i * n:(i + 1) * n]
                correct += sum(r["correct"] for r in records)
                seen += len(records)
                bar.set_postfix(acc=f"{correct / max(1, seen):.3f}", refresh=False)
                bar.update(len(todo))
            bar.close()
    finally:
        shutdown(*groups)

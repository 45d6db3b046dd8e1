"""End to end on the tiny model: local Ray, DeepSpeed over gloo, real rewards, checkpoints and resume.

Slow (about a minute each): they start Ray actors and DeepSpeed process groups for real.
"""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray
import torch

from rl.config.schema import load_config
from rl.trainer import train

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = str(ROOT / "tests/fixtures/rewards.py")
REWARDS = (f"reward.functions=[{{fn: '{FIXTURE}:char_length', weight: 1.0}}, "
           f"{{fn: '{FIXTURE}:flaky', weight: 0.0}}, {{fn: boxed_format, weight: 0.1}}]")
COMPARED = ("loss", "reward", "response_tokens_mean", "entropy", "grad_norm", "clip_fraction", "zero_adv_groups")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    ray.shutdown()


def _cfg(out: Path, *overrides: str):
    return load_config(ROOT / "configs/tiny.yaml",
                       [f"trainer.output_dir={out}", REWARDS, f"reward.accuracy={FIXTURE}:char_length",
                        "logging.progress=false", *overrides])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


RESUMED = ("learner.num_ranks=2", "learner.zero_stage=2", "learner.micro_batch_size=2", "trainer.save_every=2",
           "trainer.eval_at_start=false")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 steps of the RESUMED job in one go: what every interrupted-and-resumed run must reproduce."""
    full = tmp_path_factory.mktemp("uninterrupted") / "full"
    train(_cfg(full, "trainer.max_steps=4", *RESUMED))
    return full


def _mismatches(a: list[dict], b: list[dict]) -> list[tuple[int, str]]:
    """(step, key) where two runs' metrics differ; [] when they are the same run."""
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    return [(ma["step"], key) for ma, mb in zip(a, b) for key in COMPARED
            if ma[key] != pytest.approx(mb[key], rel=1e-4, abs=1e-6)]


def test_two_ranks_zero2_checkpoint_and_resume_match_uninterrupted(uninterrupted, tmp_path, monkeypatch):
    full = uninterrupted
    part = tmp_path / "part"
    train(_cfg(part, "trainer.max_steps=2", *RESUMED))
    shutil.copytree(part, tmp_path / "unrestored", symlinks=True)  # the same stopped run, for the control below
    resumed = train(_cfg(part, "trainer.max_steps=4", *RESUMED), resume=True)
    assert resumed["start_step"] == 2

    a, b = _metrics(full), _metrics(part)
    assert _mismatches(a, b) == []
    # The policy really learned something, so the comparison is not between two no-op runs.
    assert any(abs(m["loss"]) > 0 for m in a) and all(m["grad_norm"] > 0 for m in a)

    # Negative control: the same resume with the data order not restored must fail that comparison (it would
    # pass anyway if the metrics did not depend on what the checkpoint restores).
    from rl.data.loading import PromptSampler

    monkeypatch.setattr(PromptSampler, "load_state_dict", lambda self, state: None)
    train(_cfg(tmp_path / "unrestored", "trainer.max_steps=4", *RESUMED), resume=True)
    monkeypatch.undo()
    wrong = _mismatches(a, _metrics(tmp_path / "unrestored"))
    assert wrong and min(step for step, _ in wrong) == 3, wrong  # steps 1-2 are the saved ones; 3 differs

    # Every promised artifact is there, and the final model loads with plain transformers.
    for name in ("config.yaml", "metrics.jsonl", "events.jsonl", "curve_reward.png", "curve_accuracy.png"):
        assert (full / name).is_file(), name
    assert list((full / "tb").glob("events.out.tfevents*"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(full / "checkpoint-final")
    assert model.config.num_hidden_layers == 2
    state = json.loads((full / "checkpoints/step-000004/trainer_state.json").read_text())
    assert state["step"] == 4 and state["sampler"]["position"] == 8 % 64

    # The deliberately failing reward was isolated: counted, logged, and the run went on.
    assert all(m["reward_failures"] > 0 for m in a)
    events = [json.loads(line) for line in (full / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "reward_failures" and "flaky" in e["errors"][0] for e in events)
    for m in a:
        for key in ("reward/boxed_format", "accuracy", "truncation_rate", "kl", "clip_fraction", "time_generate",
                    "time_reward", "time_train", "time_sync", "response_tokens_max"):
            assert key in m, key
        # The generation cost of the step: every sample's tokens (prompts_per_step x group_size samples).
        samples = 2 * 4  # configs/tiny.yaml: prompts_per_step x group_size
        assert m["generated_tokens"] == pytest.approx(m["response_tokens_mean"] * samples)


KILLED_IN_COMMIT = textwrap.dedent("""
    import json, os, signal, sys
    from rl.store import checkpoint

    real = checkpoint.commit

    def commit(tmp, step, state, keep):
        if step == 4:  # step 4's shards and model are written; its state is half-written when the kill comes
            (tmp / checkpoint.STATE_FILE).write_text(json.dumps(dict(state, step=step))[:25])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tmp, step, state, keep)

    checkpoint.commit = commit
    from launch.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_resume_after_kill_9_of_the_driver_inside_a_checkpoint_write_matches_uninterrupted(uninterrupted, tmp_path):
    """`reasonrl train` SIGKILLed inside step 4's checkpoint write (tests/test_faults.py kills a plain writer; this
    is the run's own driver, its Ray cluster dying with it): the resume starts from step 2's checkpoint, trains
    steps 3-4 again and logs exactly the uninterrupted run's metrics."""
    out = tmp_path / "killed"
    args = ["train", str(ROOT / "configs/tiny.yaml"), f"trainer.output_dir={out}", REWARDS,
            f"reward.accuracy={FIXTURE}:char_length", "logging.progress=false", "trainer.max_steps=4", *RESUMED]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_COMMIT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    from rl.store import checkpoint

    assert (out / "checkpoints/.tmp-step-000004/deepspeed").is_dir()  # killed mid-write, half a checkpoint there
    assert checkpoint.latest(out).name == "step-000002"
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]  # step 3 trained after the last checkpoint

    resumed = train(_cfg(out, "trainer.max_steps=4", *RESUMED), resume=True)
    assert resumed["start_step"] == 2
    assert _mismatches(_metrics(uninterrupted), _metrics(out)) == []
    assert checkpoint.latest(out).name == "step-000004" and not list((out / "checkpoints").glob(".tmp-*"))
    prompts = [e for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["event"] == "prompts"]
    full = [e for e in map(json.loads, (uninterrupted / "events.jsonl").read_text().splitlines())
            if e["event"] == "prompts"]
    assert [e["ids"] for e in prompts] == [e["ids"] for e in full]  # no prompt replayed or skipped


def test_resume_without_checkpoint_fails_before_starting_actors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(_cfg(tmp_path / "empty"), resume=True)


@pytest.mark.parametrize("stage,sync", [(2, "collective"), (2, "object_store"), (3, "collective")])
def test_rollout_logprobs_match_learner_after_sync(tmp_path, stage, sync):
    from rl.cluster.session import init_ray, shutdown
    from rl.learner.group import LearnerGroup
    from rl.rollout.group import RolloutGroup
    from rl.contracts import TrainSequence
    from rl.models import resolve_model
    from rl.rollout.worker import SamplingParams
    from rl.sync.owner import WeightSync

    cfg = _cfg(tmp_path, "learner.num_ranks=2", f"learner.zero_stage={stage}", "rollout.temperature=0.9",
               "learner.lr=1e-3", f"weight_sync.mode={sync}")
    path = resolve_model(cfg.model.path)
    init_ray(cfg)
    rollouts, learner = RolloutGroup(cfg, path), LearnerGroup(cfg, path)
    weights = WeightSync(cfg, rollouts, learner)
    try:
        params = SamplingParams(n=4, max_new_tokens=12, temperature=0.9)
        prompts = ["What is 2 + 2?", "Name a colour."]
        first = rollouts.generate(prompts, params, seed=1, weights=weights)
        # One real update (large lr) so the synced weights differ from the initial ones.
        seqs = [TrainSequence(p, r, lp, a) for p, r, lp, a in zip(first.prompt_ids, first.response_ids,
                                                                  first.logprobs, [1.0, -1.0] * 4)]
        learner.train(seqs, mini_batches=1, max_len=12)
        weights.push(version=1)
        assert weights.version == 1
        if sync == "object_store":
            # On-policy the driver pins no weights object between syncs (a restarted worker fetches them again).
            assert weights.kept_ref is None
        if stage == 2:  # a rollout worker killed now comes back with the initial weights: it must be resynced
            os.kill(rollouts.nodes()[0]["pid"], signal.SIGKILL)
        out = rollouts.generate(prompts, params, seed=2, weights=weights)
        assert weights.restarts == (1 if stage == 2 else 0) and rollouts.nodes()[0]["weights_version"] == 1
        ours = learner.logprobs(out.prompt_ids, out.response_ids)
        for roll, learn in zip(out.logprobs, ours):
            assert torch.allclose(torch.tensor(roll), torch.tensor(learn), atol=1e-4)
        # ...and the weights really changed: the old rollout log-probs no longer match.
        before = learner.logprobs(first.prompt_ids, first.response_ids)
        assert max(abs(x - y) for r, l in zip(first.logprobs, before) for x, y in zip(r, l)) > 1e-3
    finally:
        shutdown(rollouts, learner)


def test_update_does_not_depend_on_ranks_or_micro_batches(tmp_path):
    """Same batch through (1 rank, micro 8) and (2 ranks, micro 1): same loss and same global gradient norm."""
    from rl.cluster.session import init_ray, shutdown
    from rl.learner.group import LearnerGroup
    from rl.models import resolve_model
    from rl.contracts import TrainSequence
    from rl.rollout.worker import RolloutWorker, SamplingParams

    path = resolve_model("tiny:llama")
    out = RolloutWorker(path).generate(["What is 2 + 2?", "Name a colour."], SamplingParams(n=4, max_new_tokens=10),
                                       seed=3)
    seqs = [TrainSequence(p, r, lp, a) for p, r, lp, a in zip(out.prompt_ids, out.response_ids, out.logprobs,
                                                              [1.0, -0.5, 0.25, -0.75, 0.5, -1.0, 0.8, -0.3])]
    results = {}
    for ranks, micro, agg in [(1, 8, "token-mean"), (2, 1, "token-mean"),
                              (1, 8, "seq-mean-token-mean"), (2, 3, "seq-mean-token-mean")]:
        cfg = _cfg(tmp_path, f"learner.num_ranks={ranks}", f"learner.micro_batch_size={micro}",
                   "learner.zero_stage=2", f"algorithm.loss_agg={agg}")
        init_ray(cfg)
        learner = LearnerGroup(cfg, path)
        try:
            results[(ranks, micro, agg)] = learner.train([dataclasses.replace(s) for s in seqs], mini_batches=1,
                                                         max_len=10)
        finally:
            shutdown(learner)
    for agg, (x, y) in {"token-mean": ((1, 8), (2, 1)), "seq-mean-token-mean": ((1, 8), (2, 3))}.items():
        a, b = results[(*x, agg)], results[(*y, agg)]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["grad_norm"] > 0


def test_zero3_with_reference_kl_and_several_updates_per_rollout(tmp_path):
    """ZeRO-3 partitioned training, the frozen reference (k3 KL), 2 iterations x 2 mini-batches with old log-probs."""
    out = tmp_path / "z3"
    train(_cfg(out, "learner.num_ranks=2", "learner.zero_stage=3", "learner.micro_batch_size=2",
               "algorithm.kl_coef=0.05", "algorithm.num_iterations=2", "algorithm.mini_batches=2",
               "algorithm.loss_agg=seq-mean-token-sum-norm", "learner.lr=1e-3", "trainer.eval_at_start=false"))
    first, second = _metrics(out)
    # Only step 1's first mini-batch runs at the reference; every later one has moved away from it.
    assert first["kl"] > 0 and second["kl"] > 0
    assert second["clip_fraction"] > 0  # off-policy updates hit the clip range at this learning rate
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out / "checkpoint-final")
    initial = AutoModelForCausalLM.from_pretrained(out / "checkpoints/step-000001/model")
    assert not torch.equal(trained.model.embed_tokens.weight, initial.model.embed_tokens.weight)
    assert trained.model.embed_tokens.weight.shape == (49152, 64)  # gathered, not a ZeRO-3 shard


def test_dead_reward_worker_is_recreated_and_the_step_completes(tmp_path):
    """A reward actor is SIGKILLed during step 2: Ray recreates it (placement.max_restarts), its unfinished chunk
    is scored again on the new actor, and the run completes. (A dead learner rank stops the run: tests/test_cluster.py.)"""
    from launch.cli import main

    out = tmp_path / "run"
    killer = (f"reward.functions=[{{fn: '{FIXTURE}:kill_worker_on_second_call', "
              f"kwargs: {{counter: '{tmp_path / 'calls'}'}}}}]")
    args = ["train", str(ROOT / "configs/tiny.yaml"), f"trainer.output_dir={out}", killer,
            f"reward.accuracy={FIXTURE}:kill_worker_on_second_call", "trainer.eval_at_start=false",
            "trainer.eval_at_end=false", "logging.progress=false"]
    assert main(args) == 0
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    assert (tmp_path / "calls").read_text() == "3"  # step 1, step 2 (killed), step 2 again on the new worker

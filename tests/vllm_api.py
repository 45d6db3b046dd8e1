"""vLLM's API as the rollout backend uses it, recorded once from the real package (tests/vllm_api.json) and replayed
by a stand-in engine for the fast tier, which has no vLLM: the stand-in refuses any keyword, method or argument the
recorded vLLM does not have, so a call the real engine would reject fails without vLLM too.

    .venv-vllm/bin/python tests/vllm_api.py --record     # after a tested vLLM upgrade; review the diff

tests/test_vllm_api.py checks the record against the installed vLLM (marked `vllm`) and the backend against the
stand-in (fast tier)."""
from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import types
from pathlib import Path

RECORD = Path(__file__).with_name("vllm_api.json")
LLM_METHODS = ("__init__", "generate", "collective_rpc", "reset_prefix_cache", "sleep", "wake_up")
# What rl/rollout/vllm_worker.py and the tests read from generate's results.
OUTPUT_FIELDS = {"RequestOutput": ("outputs", "prompt_token_ids", "num_cached_tokens"),
                 "CompletionOutput": ("token_ids", "logprobs", "finish_reason"),
                 "Logprob": ("logprob", "rank")}


def _params(fn) -> list[list]:
    return [[p.name, p.kind.name, p.default is not inspect.Parameter.empty]
            for p in inspect.signature(fn).parameters.values()]


def snapshot() -> dict:
    """The signatures and fields the backend depends on, from the installed vLLM."""
    import vllm
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.logprobs import Logprob
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes = {"RequestOutput": RequestOutput, "CompletionOutput": CompletionOutput, "Logprob": Logprob}
    outputs = {}
    for name, cls in classes.items():
        fields = set(_attrs(cls))
        outputs[name] = {f: f in fields for f in OUTPUT_FIELDS[name]}
    return {"SamplingParams": sorted(p for p, *_ in _params(vllm.SamplingParams)),
            "EngineArgs": sorted(f.name for f in dataclasses.fields(vllm.EngineArgs)),
            "LLM": {m: _params(getattr(vllm.LLM, m)) for m in LLM_METHODS},
            "GPUModelRunner.reload_weights": _params(GPUModelRunner.reload_weights),
            "outputs": outputs}


def _attrs(cls) -> list[str]:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    names = list(getattr(cls, "__struct_fields__", ()))  # msgspec structs
    try:
        names += [p for p, *_ in _params(cls.__init__)]
    except (TypeError, ValueError):
        pass
    return names


def recorded() -> dict:
    return json.loads(RECORD.read_text())


def _signature(params: list[list]) -> inspect.Signature:
    return inspect.Signature([inspect.Parameter(name, getattr(inspect.Parameter, kind),
                                                default=None if has_default else inspect.Parameter.empty)
                              for name, kind, has_default in params])


def fake_vllm(api: dict | None = None, version: str = "0.32.0"):
    """A stand-in `vllm` module that enforces the recorded API, and the list of calls made to it.

    LLM(...) accepts only EngineArgs fields, SamplingParams(...) only its recorded fields; each LLM method binds
    its arguments to the recorded signature (TypeError otherwise). generate returns outputs with only the recorded
    fields. collective_rpc answers the backend's extension methods like a one-worker engine."""
    api = api or recorded()
    calls: list = []
    mod = types.ModuleType("vllm")
    mod.__version__ = version
    mod.EngineArgs = dataclasses.make_dataclass("EngineArgs", [(f, object, None) for f in api["EngineArgs"]])
    sigs = {m: _signature(p) for m, p in api["LLM"].items()}

    def check(method, *args, **kwargs):
        sigs[method].bind(None, *args, **kwargs)  # None: self

    def sampling_params(**kw):
        unknown = sorted(set(kw) - set(api["SamplingParams"]))
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {unknown}")
        return types.SimpleNamespace(**kw)

    def output(name, **values):
        missing = [f for f, there in api["outputs"][name].items() if not there]
        return types.SimpleNamespace(**{k: v for k, v in values.items() if k not in missing})

    class LLM:
        def __init__(self, model, **kw):
            check("__init__", model, **kw)
            unknown = sorted(set(kw) - set(api["EngineArgs"]))
            if unknown:
                raise TypeError(f"EngineArgs has no {unknown}")
            calls.append(("init", kw))
            self.finish, self.names = "stop", None

        def generate(self, *args, **kwargs):
            check("generate", *args, **kwargs)
            requests, sampling = args[0], args[1]
            calls.append(("generate", [s.seed for s in sampling]))
            outs = []
            for i, (req, s) in enumerate(zip(requests, sampling)):
                toks = [5 + i, 6]
                lps = [{t: output("Logprob", logprob=-0.5, rank=1)} for t in toks]
                c = output("CompletionOutput", token_ids=toks, finish_reason=self.finish, logprobs=lps)
                outs.append(output("RequestOutput", outputs=[c], prompt_token_ids=req["prompt_token_ids"],
                                   num_cached_tokens=0))
            return outs

        def collective_rpc(self, *args, **kwargs):
            check("collective_rpc", *args, **kwargs)
            method, rpc_args = args[0], kwargs.get("args", ())
            if method == "reasonrl_load_weights":
                names = [n for n, _ in rpc_args[0]]
                self.names = sorted(set(self.names or ()) | set(names))
                calls.append(("rpc", method, names))
                return [names]
            if method == "reasonrl_parameter_names":
                return [list(self.names or ())]
            calls.append(("rpc", method, kwargs.get("kwargs")))
            return [None]

        def reset_prefix_cache(self, *args, **kwargs):
            check("reset_prefix_cache", *args, **kwargs)
            calls.append(("reset",))
            return True

        def sleep(self, *args, **kwargs):
            check("sleep", *args, **kwargs)
            calls.append(("sleep", kwargs.get("level", args[0] if args else 1)))

        def wake_up(self, *args, **kwargs):
            check("wake_up", *args, **kwargs)
            calls.append(("wake", kwargs.get("tags", args[0] if args else None)))
            return True

    mod.LLM = LLM
    mod.SamplingParams = sampling_params
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: False)  # a GPU engine: sleep mode exists
    mod.platforms = platforms
    return mod, calls


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    RECORD.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}")

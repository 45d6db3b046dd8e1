import os

import pytest
import torch

from rl.models import ModelError, load_policy, load_tokenizer, resolve_model


def test_tiny_model_is_deterministic_and_loads():
    path = resolve_model("tiny:llama")
    assert resolve_model("tiny:llama") == path
    model, tok = load_policy(path), load_tokenizer(path)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_local_folder_and_errors(tmp_path):
    path = resolve_model("tiny:llama")
    assert resolve_model(path) == path
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="unknown bundled model"):
        resolve_model("bundled:nope")
    with pytest.raises(ModelError, match="unknown tiny model"):
        resolve_model("tiny:gpt9")
    with pytest.raises(ModelError, match="neither a folder"):
        resolve_model("./not/here")
    with pytest.raises(ModelError, match="does not load"):
        load_policy(str(tmp_path / "empty"))


def test_bundled_smollm2_converts_once_and_reloads():
    path = resolve_model("bundled:smollm2-135m-instruct")
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert resolve_model("bundled:smollm2-135m-instruct") == path  # reused, not converted again
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    model = load_policy(path)
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert "<|im_start|>assistant" in load_tokenizer(path).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)

"""Responses end at the chat template's end-of-turn token as well as at EOS (issue 27), in every backend: the ids
come from the template (rl.rollout.stops), the transformers and continuous backends stop generating there and cut
the response after it, and the vLLM requests carry them (rl.rollout.vllm_support.request_sampling)."""
import pytest

from rl.models import load_tokenizer, resolve_model
from rl.rollout.stops import end_of_turn_token_id, stop_token_ids
from rl.rollout.vllm_support import request_sampling

PROMPT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model("tiny:llama")


def test_end_of_turn_comes_from_the_chat_template(tiny_path):
    tok = load_tokenizer(tiny_path)  # SmolLM2's ChatML template: its EOS is already <|im_end|>
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_token_id(tok) == im_end and stop_token_ids(tok) == [im_end]
    # Qwen2.5-Math's situation: EOS <|endoftext|>, turns end at <|im_end|>. Both stop, EOS first.
    tok.eos_token = "<|endoftext|>"
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|endoftext|>"), im_end]
    tok.chat_template = None  # no template: EOS alone
    assert stop_token_ids(tok) == [tok.eos_token_id]


def test_vllm_requests_carry_the_stop_ids():
    from rl.rollout.worker import SamplingParams

    kwargs = request_sampling(SamplingParams(max_new_tokens=7, greedy=True), 5, [0, 2])
    assert kwargs["stop_token_ids"] == [0, 2] and kwargs["max_tokens"] == 7 and kwargs["temperature"] == 0.0


@pytest.mark.parametrize("backend", ["transformers", "continuous"])
def test_generation_stops_at_every_stop_id(tiny_path, backend):
    """A seeded draw is reproducible: generate once, then make a token drawn a few steps in a stop token (as the
    end-of-turn token is, for a model whose EOS differs) and the same draw must end right after it."""
    from rl.rollout.worker import RolloutWorker, SamplingParams

    worker = RolloutWorker(tiny_path, num_threads=1, backend=backend)
    tok = worker.tokenizer
    tok.eos_token = "<|endoftext|>"
    worker.stop_ids = stop_token_ids(tok)
    params = SamplingParams(n=1, max_new_tokens=12, temperature=1.0, logprobs=False, batch_size=2)
    free = worker.generate([PROMPT], params, seed=0).response_ids[0]
    k = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)  # first token not seen before it
    worker.stop_ids = [tok.eos_token_id, free[k]]
    out = worker.generate([PROMPT], params, seed=0)
    assert out.response_ids[0] == free[:k + 1]  # cut after the stop token, which is kept (a sampled action)
    assert out.finish_reason == ["stop"]

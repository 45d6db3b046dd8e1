"""Named evaluation protocols (`reasonrl eval --protocol NAME`): everything that decides whether a number can be put
beside a paper's, fixed together and named after its source.

A protocol fixes the prompt (system prompt and user template, or the run's own template), the sampling (greedy or
temperature / top_p), samples per benchmark, the token budget, and the grading (extraction mode, `</think>`
splitting, numeric tolerance). Stops are not a setting: every backend ends a response at EOS and at the chat
template's end-of-turn token (rl/rollout/stops.py), which is what every source below does.

Sources (read for issue 27):
  reasonrl    this project's defaults (the training reward's strict last-box rule; the run's own prompt template).
  lighteval   lighteval 0.13 (pip, read in a separate venv): tasks/tasks/math_500.py (its "ANSWER: $ANSWER"
              template, pass@1 with n=1, generation_size 32,768), tasks/tasks/aime.py (the boxed template;
              aime24_avg / aime25_avg: avg@64), metric Metrics.pass_at_k_math (math-verify, Expr + LaTeX targets
              for gold and prediction, precision 6), pipeline remove_reasoning_tags=True (`<think>...</think>` cut).
              lighteval fixes no sampling: T 0.6, top_p 0.95 are open-r1's documented lighteval command.
              Grading (extraction "lighteval", think "tags"): lighteval's math metric rebuilt from math-verify 0.9 with
              lighteval's settings (rewards/answers.py); bench/lighteval_crosscheck.py checks it against lighteval
              itself, response by response (docs/results.md, "lighteval cross-check").
  qwen-math   QwenLM/Qwen2.5-Math evaluation/math_eval.py defaults (temperature 0, n_sampling 1, top_p 1,
              max_tokens_per_call 2048), prompt type `qwen25-math-cot` (system "Please reason step by step, and put
              your final answer within \\boxed{}."); grader.py `math_equal` (last box; numbers within a relative
              1e-4). Approximation: math-verify equivalence in place of its sympy/regex grader.
  r1-distill  DeepSeek-R1 card / DeepScaleR (rllm) / DLER: no system prompt, the user suffix "Let's think step by step
              and output the final answer within \\boxed{}.", T 0.6, top_p 0.95, 32,768 tokens, 16 samples (pass@1
              averaged over 16), only the text after `</think>` scored.
  fgo         Mr-XcHan/FGO: system prompt of its recipes and test notebooks ("You are a helpful assistant. You
              should think step-by-step and put your final answer within \\boxed{}."); T 0.6, top_p 0.95 and
              32,768 tokens as issue 27 reports its evaluate script (the snapshot's test notebooks use 2,048 tokens
              and one sample; the poster states no protocol).
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from rl.config.base import ConfigError

# lighteval 0.13's user templates (the problem goes where {problem} is).
LIGHTEVAL_MATH500 = ('Solve the following problem. The final line of your response MUST be of the following format:\n'
                     '"ANSWER: $ANSWER" (without quotes) where $ANSWER is the final answer. Think step by step before '
                     'answering.\n\n{problem}')
LIGHTEVAL_BOXED = ("\nSolve the following math problem efficiently and clearly.  The last line of your response should "
                   "be of the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is "
                   "correct' (without quotes) where ANSWER is just the final number or expression that solves the "
                   "problem. Think step by step before answering.\n\n{problem}\n")


class Protocol(BaseModel):
    """One evaluation protocol. The field defaults are the `reasonrl` protocol: the one source of the eval's
    defaults (eval.runner.EvalSettings and the CLI read them from here)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "reasonrl"
    source: str = "reasonrl's own defaults"
    prompt_from_run: bool = Field(True, description="Use the run's data.system_prompt / prompt_suffix (or --config's, "
                                  "or the training default); False: the protocol's own prompt below.")
    system_prompt: Optional[str] = None
    user_template: str = "{problem}"
    user_templates: dict[str, str] = Field(default_factory=dict, description="Per-benchmark user templates.")
    greedy: bool = False
    temperature: float = 0.6
    top_p: float = 1.0
    samples: int = 1
    samples_per_benchmark: dict[str, int] = Field(default_factory=dict)
    max_new_tokens: int = 2048
    extraction: Literal["last_box", "math_verify", "lighteval"] = "last_box"
    think: Literal["keep", "split", "tags"] = "keep"
    rel_tol: float = 0.0


_FGO_SYSTEM = ("You are a helpful assistant. You should think step-by-step and put your final answer within "
               "\\boxed{}.")
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    Protocol(),
    Protocol(name="lighteval", source="lighteval 0.13 math_500 / aime24_avg tasks, pass_at_k_math (math-verify); "
             "open-r1's T 0.6, top_p 0.95", prompt_from_run=False, user_template=LIGHTEVAL_BOXED,
             user_templates={"math500": LIGHTEVAL_MATH500}, temperature=0.6, top_p=0.95, samples=1,
             samples_per_benchmark={"aime24": 64, "aime25": 64}, max_new_tokens=32768, extraction="lighteval",
             think="tags"),
    Protocol(name="qwen-math", source="Qwen2.5-Math evaluation/math_eval.py defaults, qwen25-math-cot prompt, "
             "grader.math_equal (rel. tolerance 1e-4)", prompt_from_run=False,
             system_prompt="Please reason step by step, and put your final answer within \\boxed{}.", greedy=True,
             temperature=0.6, top_p=1.0, samples=1, max_new_tokens=2048, rel_tol=1e-4),
    Protocol(name="r1-distill", source="DeepSeek-R1 card, DeepScaleR (rllm), DLER: user suffix, no system prompt, "
             "T 0.6, top_p 0.95, 32k, pass@1 over 16 samples, answer after </think>", prompt_from_run=False,
             user_template="{problem} Let's think step by step and output the final answer within \\boxed{{}}.",
             temperature=0.6, top_p=0.95, samples=16, max_new_tokens=32768, think="split"),
    Protocol(name="fgo", source="Mr-XcHan/FGO recipes and test notebooks (system prompt); evaluate script: T 0.6, "
             "top_p 0.95, 32k (issue 27)", prompt_from_run=False, system_prompt=_FGO_SYSTEM, temperature=0.6,
             top_p=0.95, samples=1, max_new_tokens=32768),
]}
DEFAULT = PROTOCOLS["reasonrl"]


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown --protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def parse_samples(text: str | int | None) -> tuple[int | None, dict[str, int]]:
    """`--samples`: `16`, `aime24=16` or `4,aime24=16,aime25=16` -> (all benchmarks or None, per benchmark)."""
    if text is None:
        return None, {}
    default, per = None, {}
    for item in str(text).split(","):
        name, _, value = item.strip().rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(f"--samples: {item.strip()!r} is not N or BENCHMARK=N") from None
        if n < 1:
            raise ConfigError(f"--samples must be >= 1, got {item.strip()!r}")
        if name:
            per[name.strip()] = n
        else:
            default = n
    return default, per

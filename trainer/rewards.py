"""Rule-based rewards for reinforcement learning (trainer/train_grpo.py), and how --reward_funcs finds them.

A reward function scores the completions of a batch, one float per completion:

    f(prompts: list[str], completions: list[str], **sample_fields) -> list[float]

    prompts        the prompt each completion answers, as the model saw it (chat template applied)
    completions    the generated text, special tokens and the closing end-of-turn token removed
    sample_fields  one list per field, aligned with `completions`: every extra field of the prompt's jsonl record
                   (e.g. `answer`), plus `completion_tokens` (the completion's length in tokens, its end-of-turn
                   token included) and `max_new_tokens` (the generation budget, the same in every row)

A function takes the fields it needs as named parameters and the rest as **_, so a record may carry more than one
reward reads. --reward_funcs names the shipped functions below or any function by its import path
`package.module:function` (the package must be importable, e.g. installed or on PYTHONPATH); --reward_weights
weighs them, and the reward of a completion is the weighted sum.

Shipped:
    gsm8k_accuracy   1 when the final answer equals the record's `answer` (GSM8K; Cobbe et al. 2021), else 0
    think_format     1 for "<think> reasoning </think> answer", else 0 (DeepSeek-R1's format reward)
    length_penalty   DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to 3/4 of the budget, then
                     falling linearly to -1 at --max_new_tokens
"""

import importlib
import inspect
import re
from collections.abc import Callable

from dataset.qa_format import extract_answer, normalize_number

THINK_END = "</think>"
# One reasoning block at the start, then an answer; both hold a non-space character and neither holds a tag
TEXT = r"(?:(?!</?think>).)*(?!</?think>)\S(?:(?!</?think>).)*"
THINK_FORMAT = re.compile(rf"\s*<think>{TEXT}</think>{TEXT}", re.DOTALL)
OVERLONG_FRACTION = 0.25  # DAPO's L_cache as a fraction of the generation budget


def final_answer(completion: str) -> str | None:
    """The number a completion gives as its answer: read from the text after its last </think> (all of it when
    there is none), the first number after "####" when present, else the last number (dataset/qa_format.py's
    rule, the one eval/eval_bench.py scores GSM8K replies by).
    Returns the normalized number ("$1,200.00" -> "1200"), or None when there is none."""
    return extract_answer(completion.rsplit(THINK_END, 1)[-1])


def gsm8k_accuracy(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """Exact match of the final answer (final_answer) with the reference `answer` ("18", "1,200" ...): 1.0 or 0.0.

    The outcome reward of GSM8K in DeepSeekMath's RL (Shao et al. 2024, section 4.1); the reference is the
    number after "####" in the GSM8K solution, which dataset/data/grpo/ stores as `answer`.
    """
    return [float(final_answer(text) == normalize_number(str(ref))) for text, ref in zip(completions, answer)]


def think_format(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 when the completion is "<think>...</think>" (non-empty, once, at the start) followed by a non-empty
    answer, else 0.0: the format reward of DeepSeek-R1 (DeepSeek-AI 2025, section 2.2.2), in the <think> layout
    that the chat template gives `reasoning_content`."""
    return [float(THINK_FORMAT.fullmatch(text) is not None) for text in completions]


def length_penalty(prompts: list[str], completions: list[str], completion_tokens: list[int],
                   max_new_tokens: list[int], **_) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13), in tokens:

        0                                   if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max      (from 0 down to -1)

    with L_max = max_new_tokens and L_cache = OVERLONG_FRACTION * L_max. A completion cut off at the budget gets -1:
    it pushes the policy to finish its answer within the budget rather than to be short.
    """
    rewards = []
    for length, budget in zip(completion_tokens, max_new_tokens):
        cache = max(1.0, OVERLONG_FRACTION * budget)
        rewards.append(min(0.0, ((budget - cache) - length) / cache))
    return rewards


REWARD_FUNCTIONS = {"gsm8k_accuracy": gsm8k_accuracy, "think_format": think_format, "length_penalty": length_penalty}


def load_reward_function(name: str) -> Callable:
    """A shipped reward by name (REWARD_FUNCTIONS) or any function by import path "package.module:function".

    Raises:
        SystemExit naming --reward_funcs when the name is unknown or the import path does not lead to a function.
    """
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    module_name, _, function_name = name.partition(":")
    if not function_name:
        raise SystemExit(f"--reward_funcs {name}: unknown reward; use one of {', '.join(REWARD_FUNCTIONS)} or an "
                         "import path package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"--reward_funcs {name}: cannot import {module_name} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SystemExit(f"--reward_funcs {name}: {module_name} has no function {function_name}")
    return function


def check_reward_fields(name: str, function: Callable, fields: set[str]) -> None:
    """Check that `function` can be called with the fields every sample has, before any generation runs.

    Raises:
        SystemExit naming the reward and the field it needs that the data lacks.
    """
    try:
        inspect.signature(function).bind([], [], **{field: [] for field in fields})
    except TypeError as error:
        raise SystemExit(f"--reward_funcs {name}: cannot be called with the fields of the data ({error}); the "
                         f"records have {sorted(fields)}") from None

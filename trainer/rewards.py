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

Tool use (trainer/train_agent.py, whose rollouts add the fields `tool_calls`, `answered` and `max_turns`; the
completion is the rollout's final reply, so gsm8k_accuracy scores its answer):
    tool_call_format the share of the rollout's tool calls that are well-formed; 0 for a rollout without a call
    wasted_turns     minus the turns that brought nothing (a failed or repeated call, no answer), per --max_turns

A learned reward: reward_model_function(path, device) scores prompt + completion with a reward model written by
trainer/train_reward.py (train_grpo.py's --reward_model; logged as reward_model).
"""

import importlib
import inspect
import json
import re
from collections.abc import Callable

import torch
from transformers import AutoTokenizer

from dataset.chat_format import IM_END, token_id
from dataset.lm_dataset import pad_collate
from dataset.qa_format import extract_answer, normalize_number
from model.model_reward import load_reward_model, sequence_scores

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


def tool_call_format(prompts: list[str], completions: list[str], tool_calls: list[list[dict]], **_) -> list[float]:
    """The share of a rollout's tool calls that are well-formed: JSON {"name": <a tool>, "arguments": {...}} whose
    arguments fit the tool's schema (dataset/tools.py; a call the tool then refuses, such as a division by zero,
    is well-formed). 0.0 for a rollout without a call: the tasks need a tool. The format reward of tool-use RL, as
    DeepSeek-R1's think_format is of reasoning (ToolRL, Qian et al. 2025, scores the format of calls the same way).
    """
    return [sum(call["well_formed"] for call in calls) / len(calls) if calls else 0.0 for calls in tool_calls]


def wasted_turns(prompts: list[str], completions: list[str], tool_calls: list[list[dict]], answered: list[bool],
                 max_turns: list[int], **_) -> list[float]:
    """Minus the turns of a rollout that brought nothing, as a fraction of --max_turns, at least -1:

        -(malformed calls + calls the tool refused + calls repeating an earlier one + [no final answer]) / max_turns

    A rollout that calls what it needs once and then answers gets 0; one that runs out of turns or tokens without
    answering loses one turn more. It pushes the policy to few, useful calls.
    """
    rewards = []
    for calls, done, limit in zip(tool_calls, answered, max_turns):
        seen, wasted = set(), 0
        for call in calls:
            key = (call["name"], json.dumps(call["arguments"], sort_keys=True))
            wasted += call["error"] is not None or key in seen
            seen.add(key)
        rewards.append(max(-1.0, -(wasted + (not done)) / limit))
    return rewards


def reward_model_function(path: str, device: str | torch.device) -> Callable:
    """A reward function backed by a reward model (trainer/train_reward.py): its score of prompt + completion.

    The model (load_reward_model: strict, frozen, float32; the caller's autocast casts it) and its own tokenizer
    are loaded once from `path`. Each completion is scored as the reward model was trained on replies: the prompt's
    tokens (its chat-template tokens read as such), the completion's tokens (its text taken literally, as
    dataset/chat_format.py's reply_ids encodes a reply), then <|im_end|>, which a completion cut off at the budget
    did not write but is scored with; the reward is the score at that last token (sequence_scores), a logit of
    the Bradley-Terry preference (InstructGPT, Ouyang et al. 2022, eq. 1). Text in, text re-tokenized: the
    policy's tokenizer need not be the reward model's.

    Args:
        path: a reward-model directory (out/reward_<hidden_size>); device: where it runs.
    Returns:
        f(prompts, completions, **_) -> list[float], one reward per completion (the signature of this module).
    Raises:
        SystemExit naming --reward_model when `path` holds no reward model (load_reward_model).
    """
    model = load_reward_model(path, device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    end_id = token_id(tokenizer, IM_END)

    @torch.no_grad()
    def reward_model(prompts: list[str], completions: list[str], **_) -> list[float]:
        rows = [{"input_ids": torch.tensor(
            tokenizer(prompt, add_special_tokens=False)["input_ids"]
            + tokenizer(completion, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [end_id])}
            for prompt, completion in zip(prompts, completions)]
        batch = pad_collate(rows, tokenizer.pad_token_id)  # right-padded; attention_mask when lengths differ
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device) if "attention_mask" in batch else None
        return sequence_scores(model(input_ids, attention_mask), attention_mask).tolist()

    return reward_model


REWARD_FUNCTIONS = {"gsm8k_accuracy": gsm8k_accuracy, "think_format": think_format, "length_penalty": length_penalty,
                    "tool_call_format": tool_call_format, "wasted_turns": wasted_turns}


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

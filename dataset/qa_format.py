"""The question-and-answer text of the benchmarks and of GRPO's prompts: how a question is posed, how a final
number is read back.

    build_prompt      "Question: <q>\\nAnswer:" after solved examples (eval/eval_bench.py's zero- and few-shot form,
                      and the prompts of dataset/data/grpo/)
    extract_answer    the final number of a solution: after GSM8K's "####" mark, else the last number
    normalize_number  "$1,200.00" -> "1200", so that answers written differently compare equal

Here, in dataset/, so that the evaluation (eval/eval_bench.py), the GRPO rewards (trainer/rewards.py) and the
data script (dataset/data/grpo/make_grpo_data.py) share one rule without importing eval/. GSM8K: Cobbe et al. 2021.
"""

import re

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")  # 18, -3, $1,200, 0.5
ANSWER_MARK = "####"  # GSM8K's solutions end in "#### <answer>"


def build_prompt(shots: list[tuple[str, str]], question: str, tokenizer=None) -> str:
    """The text the model continues: "Question: <q>\\nAnswer: <a>\\n\\n" per (q, a) shot, then the question.

    With a tokenizer, that text is rendered as one user turn of its chat template, ready for the assistant's
    reply (add_generation_prompt), for chat-tuned checkpoints.
    """
    text = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots) + f"Question: {question}\nAnswer:"
    if tokenizer is None:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def normalize_number(text: str) -> str:
    """A number as written -> its canonical string: "$1,200.00" -> "1200", "0.50" -> "0.5", "18." -> "18"."""
    number = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def extract_answer(text: str) -> str | None:
    """The final answer of a generated solution: the first number after "####" when the text has one (GSM8K's
    answer mark), else the last number in the text; normalized. None when the text holds no number."""
    if ANSWER_MARK in text:
        numbers = NUMBER.findall(text.split(ANSWER_MARK, 1)[1])
        return normalize_number(numbers[0]) if numbers else None
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None

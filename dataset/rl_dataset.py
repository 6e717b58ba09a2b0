"""Prompts for reinforcement learning (trainer/train_grpo.py): the model writes the replies itself, online.

Format (one JSON object per line; blank lines are ignored):

    {"prompt": "Question: ...\\nAnswer:", "answer": "72"}                  a single user message, or
    {"conversations": [{"role": "system", ...}, {"role": "user", ...}], "tools": [...], "answer": "72"}

"conversations" holds the messages before the reply, in the SFT message format (dataset/lm_dataset.py), ending
with a user message (or tool results); "tools" is optional (upstream MiniMind's layout, tools on the system message,
works too). Every other field ("answer", "id", ...) travels with
the prompt to the reward functions (trainer/rewards.py). A prompt is rendered by render_prompt
(dataset/chat_format.py): the messages and the assistant header, what the model reads before it answers, with
control tokens typed in the text kept as text. A prompt longer than max_seq_len is dropped, not cut (a cut question
is another question): counted and logged with the first five file:line, as lm_dataset reports its long samples.

Batches are left-padded: in a left-padded batch every prompt ends at the same column, so one batched `generate`
call appends each row's new tokens right after its own prompt. (Generating one prompt's group at a time would need
no padding but runs B times more, smaller, forward passes.) Rotary position embeddings depend only on the distance
between tokens, so the padding columns, which attention masks out, change no logit.

The extra fields travel in the batch as they are, one dict per prompt (`fields`, a Python list): the training loop
moves only tensors to the device.
"""

from pathlib import Path

import torch
from torch.utils.data import Dataset

from dataset.chat_format import render_prompt
from dataset.lm_dataset import (DataFormatError, check_sft_record, read_jsonl_lines, report_lengths,
                                sft_messages_and_tools)

PROMPT_KEYS = ("prompt", "conversations", "tools")  # what the model reads; every other key goes to the rewards
REPLY = {"role": "assistant", "content": "reply"}  # stands for the reply the model will write, in validation


def check_prompt_record(record: dict) -> None:
    """A prompt line holds "prompt" (a non-empty string) or "conversations" (messages before the reply)."""
    if ("prompt" in record) == ("conversations" in record):
        raise DataFormatError(f'expected one of "prompt" or "conversations" (keys: {sorted(record)})')
    if "prompt" in record:
        if not (isinstance(record["prompt"], str) and record["prompt"].strip()):
            raise DataFormatError('"prompt" must be a non-empty string')
        return
    messages = record["conversations"]
    if not isinstance(messages, list) or not messages:
        raise DataFormatError('"conversations" must be a non-empty list of {"role", "content"} objects')
    if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        raise DataFormatError('"conversations" must end before the reply (with a user or tool message): the model '
                              "writes the assistant's reply")
    check_sft_record({**record, "conversations": [*messages, REPLY]})  # the prompt and a reply: an SFT record


def prompt_messages_and_tools(record: dict) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools of a prompt record: one user message holding its "prompt", or its "conversations"
    and "tools" (tools also in upstream MiniMind's layout, see sft_messages_and_tools)."""
    if "prompt" in record:
        return [{"role": "user", "content": record["prompt"]}], None
    return sft_messages_and_tools(record)


class PromptDataset(Dataset):
    """Chat prompts for online RL, each with the extra fields its rewards need.

    Args:
        data_path: jsonl of prompt records (see the module docstring).
        tokenizer: a Hugging Face tokenizer with the ChatML tokens of trainer/train_tokenizer.py.
        max_seq_len: prompts of more tokens are dropped (counted and logged by file:line), not cut: a cut question
            is another question.
        skip_bad_lines: skip invalid lines (counted and logged by file:line) instead of raising at the first.
    Attributes:
        field_names: the extra fields every record has (the keyword arguments the reward functions can rely on).
        lengths: prompt length in tokens per sample, for batching prompts of similar length together.
    Items: {"input_ids": (L,) LongTensor, "fields": {the record's extra fields}}.
    Raises:
        DataFormatError for a bad file or line (naming file:line), or when every prompt is too long.
    """

    def __init__(self, data_path: str | Path, tokenizer, max_seq_len: int, skip_bad_lines: bool = False):
        rows = read_jsonl_lines(data_path, check_prompt_record, skip_bad_lines)
        self.pad_token_id = tokenizer.pad_token_id
        self.prompts, self.records, dropped = [], [], []  # (L,) token ids; the extra fields; line numbers
        for line_no, _, record in rows:
            ids = render_prompt(tokenizer, *prompt_messages_and_tools(record))
            if len(ids) > max_seq_len:
                dropped.append(line_no)
                continue
            self.prompts.append(torch.tensor(ids))
            self.records.append({key: value for key, value in record.items() if key not in PROMPT_KEYS})
        report_lengths(data_path, len(rows), [], dropped, max_seq_len, "a prompt is dropped, not cut")
        if not self.prompts:
            raise DataFormatError(f"{data_path}: every prompt is longer than max_seq_len={max_seq_len} tokens; "
                                  "use a longer --max_seq_len")
        self.field_names = set.intersection(*(set(record) for record in self.records))
        self.lengths = [len(ids) for ids in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.prompts[index], "fields": self.records[index]}

    def collate(self, items: list[dict]) -> dict:
        """Left-pad the prompts to the longest one: {"input_ids", "attention_mask": (batch, longest) LongTensors,
        "fields": [one dict of extra fields per prompt]}. attention_mask is 1 on prompt tokens and 0 on the padding
        at the left."""
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            length = len(item["input_ids"])
            input_ids[row, width - length:] = item["input_ids"]
            attention_mask[row, width - length:] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "fields": [item["fields"] for item in items]}

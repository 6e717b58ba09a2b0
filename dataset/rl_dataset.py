"""Prompts for reinforcement learning (trainer/train_grpo.py): the model writes the replies itself, online.

Format (one JSON object per line; blank lines are ignored):

    {"prompt": "Question: ...\\nAnswer:", "answer": "72"}                  a single user message, or
    {"conversations": [{"role": "system", ...}, {"role": "user", ...}], "tools": [...], "answer": "72"}

"conversations" holds the messages before the reply, in the SFT message format (dataset/lm_dataset.py), ending
with a user message (or tool results); "tools" is optional (upstream MiniMind's layout, tools on the system message,
works too). Every other field ("answer", "id", ...) travels with
the prompt to the reward functions (trainer/rewards.py). A prompt is rendered with the chat template and the
assistant header (add_generation_prompt), exactly what the model sees before it answers in chat.

Batches are left-padded: in a left-padded batch every prompt ends at the same column, so one batched `generate`
call appends each row's new tokens right after its own prompt. (Generating one prompt's group at a time would need
no padding but runs B times more, smaller, forward passes.) Rotary position embeddings depend only on the distance
between tokens, so the padding columns, which attention masks out, change no logit.

The training loop moves every batch value to the device as a tensor, so the extra fields travel as UTF-8 JSON bytes
in a uint8 tensor (`fields`), which decode_fields turns back into dicts.
"""

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dataset.lm_dataset import DataFormatError, check_sft_record, read_jsonl, sft_messages_and_tools

logger = logging.getLogger(__name__)

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


def encode_fields(record: dict) -> torch.Tensor:
    """A record's fields -> (bytes,) uint8 tensor of its UTF-8 JSON (JSON text never holds a 0 byte)."""
    return torch.tensor(list(json.dumps(record, ensure_ascii=False).encode("utf-8")), dtype=torch.uint8)


def decode_fields(fields: torch.Tensor) -> list[dict]:
    """The inverse of encode_fields on a batch: (batch, bytes) uint8 tensor, right-padded with 0, on any device ->
    one dict per row."""
    return [json.loads(bytes(row).rstrip(b"\0").decode("utf-8")) for row in fields.cpu().tolist()]


class PromptDataset(Dataset):
    """Chat prompts for online RL, each with the extra fields its rewards need.

    Args:
        data_path: jsonl of prompt records (see the module docstring).
        tokenizer: a Hugging Face tokenizer with the ChatML template of trainer/train_tokenizer.py.
        max_seq_len: prompts of more tokens are dropped (the count is logged), not cut: a cut question is another
            question.
        skip_bad_lines: skip invalid lines (counted and logged by file:line) instead of raising at the first.
    Attributes:
        field_names: the extra fields every record has (the keyword arguments the reward functions can rely on).
        lengths: prompt length in tokens per sample, for batching prompts of similar length together.
    Items: {"input_ids": (L,) LongTensor, "fields": (bytes,) uint8 tensor of the record's extra fields as JSON}.
    Raises:
        DataFormatError for a bad file or line (naming file:line), or when every prompt is too long.
    """

    def __init__(self, data_path: str | Path, tokenizer, max_seq_len: int, skip_bad_lines: bool = False):
        records = read_jsonl(data_path, check_prompt_record, skip_bad_lines)
        self.pad_token_id = tokenizer.pad_token_id
        self.prompts, self.records = [], []  # (L,) token ids; the extra fields
        for record in records:
            messages, tools = prompt_messages_and_tools(record)
            ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"]
            if len(ids) <= max_seq_len:
                self.prompts.append(torch.tensor(ids))
                self.records.append({key: value for key, value in record.items() if key not in PROMPT_KEYS})
        if not self.prompts:
            raise DataFormatError(f"{data_path}: every prompt is longer than max_seq_len={max_seq_len} tokens; "
                                  "use a longer --max_seq_len")
        if len(self.prompts) < len(records):
            logger.warning("%s: dropped %d of %d prompts longer than %d tokens", data_path,
                           len(records) - len(self.prompts), len(records), max_seq_len)
        self.field_names = set.intersection(*(set(record) for record in self.records))
        self.lengths = [len(ids) for ids in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.prompts[index], "fields": encode_fields(self.records[index])}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Left-pad the prompts to the longest one: {"input_ids", "attention_mask": (batch, longest), "fields":
        (batch, most bytes) uint8}. attention_mask is 1 on prompt tokens and 0 on the padding at the left."""
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        fields = torch.zeros((len(items), max(len(item["fields"]) for item in items)), dtype=torch.uint8)
        for row, item in enumerate(items):
            length = len(item["input_ids"])
            input_ids[row, width - length:] = item["input_ids"]
            attention_mask[row, width - length:] = 1
            fields[row, :len(item["fields"])] = item["fields"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "fields": fields}

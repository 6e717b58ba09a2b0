"""From jsonl files to training tensors: packed pretraining blocks and chat samples with assistant-only labels.

Every file is validated line by line before anything is tokenized, so a bad line ends in one
DataFormatError naming "<file>:<line>" instead of a traceback deep inside a data loader; with
skip_bad_lines=True (the trainer's --skip_bad_lines 1) bad lines are skipped instead, counted and reported,
never dropped silently. The valid lines are tokenized through the `datasets` library (`.map(batched=True)`);
conversations are rendered by dataset/chat_format.py, which holds the rule of which tokens carry loss.

A valid sample longer than max_seq_len is not an error. It is cut to max_seq_len tokens (SFT on the right, DPO
as DPODataset says), or dropped when nothing to learn would be left: an SFT conversation whose first assistant
token lies beyond max_seq_len (real SFT sets always hold a few), and, in dataset/rl_dataset.py, a prompt longer
than max_seq_len. One warning per file says how many samples were cut and how many dropped, naming the first five
dropped as file:line, whatever skip_bad_lines says; only bad lines stop the run (unless skip_bad_lines).

Formats (one JSON object per line; blank lines are ignored):
    pretraining  {"text": "..."}
    SFT          {"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...],
                  "tools": [...]}            optional JSON schemas of the functions the assistant may call
                 an assistant message may carry "reasoning_content" (rendered as <think>...</think>) and
                 "tool_calls": [{"name": ..., "arguments": {...}}] (OpenAI style {"function": {...}} also works)
                 upstream MiniMind's layout is read too: "tools" on the system message, and "tools" or
                 "tool_calls" as JSON strings (see sft_messages_and_tools)
    DPO          {"chosen": [messages], "rejected": [messages]}   two conversations in the SFT message format that
                 share every message but the last one, the assistant reply preferred (chosen) or not (rejected)
"""

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset as HFDataset
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from dataset.chat_format import build_assistant_labels, render_prompt, reply_ids
from model.model_minimind import IGNORE_INDEX  # label of positions that carry no loss

logger = logging.getLogger(__name__)

DOCUMENT_SEPARATOR = "<|endoftext|>"  # appended after every pretraining document

# For each kind of message, the kinds that may come right before it (None: it opens the conversation).
# "tool_calls" is an assistant message that calls tools; only tool results may follow it.
ALLOWED_PREVIOUS = {
    "system": {None},
    "user": {None, "system", "assistant"},
    "assistant": {"user", "tool"},
    "tool_calls": {"user", "tool"},
    "tool": {"tool_calls", "tool"},
}


class DataFormatError(ValueError):
    """A data file the user supplied is unusable; the message reads "<path>:<line>: <what is wrong>"."""


# ----------------------------------------------------------------------------------------------------------
# Validation


def read_jsonl(path: str | Path, check_record: Callable[[dict], None], skip_bad_lines: bool = False) -> list[dict]:
    """Parse and validate every line of a jsonl file.

    Args:
        path: the jsonl file.
        check_record: raises DataFormatError (without location) when a parsed line is not a valid record,
            e.g. check_pretrain_record or check_sft_record.
        skip_bad_lines: skip invalid lines (counted and logged by file:line) instead of raising at the first.
    Returns:
        the valid records, in file order (blank lines skipped).
    Raises:
        DataFormatError naming the file (and the 1-based line) for a missing file, a directory, an empty
        file, a line that is not UTF-8, not JSON, not a JSON object, or rejected by check_record; with
        skip_bad_lines, only for an unusable file or one without a single valid line.
    """
    return [record for _, _, record in read_jsonl_lines(path, check_record, skip_bad_lines)]


def read_jsonl_lines(path: str | Path, check_record: Callable[[dict], None],
                     skip_bad_lines: bool = False) -> list[tuple[int, str, dict]]:
    """Like read_jsonl, with each valid record's 1-based line number and raw text: [(line_no, line, record)]."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file")
    if path.is_dir():
        raise DataFormatError(f"{path}: is a directory; expected a .jsonl file")
    valid, skipped = [], []
    with open(path, "rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            try:
                line = parse_line(raw_line, check_record)
            except DataFormatError as error:
                if not skip_bad_lines:
                    raise DataFormatError(f"{path}:{line_no}: {error}") from None
                skipped.append(f"{path}:{line_no}: {error}")
                continue
            if line is not None:
                valid.append((line_no, *line))
    if skipped:
        report_skipped(path, skipped, len(valid) + len(skipped), "bad lines")
    if not valid:
        what = "no valid line" if skipped else "the file is empty"
        raise DataFormatError(f"{path}: {what}; expected one JSON object per line")
    return valid


def parse_line(raw_line: bytes, check_record: Callable[[dict], None]) -> tuple[str, dict] | None:
    """(text, record) of one jsonl line; None for a blank line. Raises DataFormatError (without location)."""
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataFormatError(f"not UTF-8 text (byte {error.object[error.start]:#x} at column "
                              f"{error.start + 1})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"invalid JSON ({json_error_text(error)})") from None
    if not isinstance(record, dict):
        raise DataFormatError(f"expected a JSON object, got {type(record).__name__}")
    check_record(record)
    return line, record


def json_error_text(error: json.JSONDecodeError) -> str:
    """What json found wrong, and where: "Invalid control character at column 51".

    Some of json's messages already end in "at" ("Invalid control character at", "Unterminated string starting
    at"), made to be followed by the position: it is not repeated.
    """
    return f"{error.msg.removesuffix(' at')} at column {error.colno}"


def report_skipped(path: Path, messages: list[str], total: int, what: str) -> None:
    """Log how many of `total` records of `path` were skipped, and the first few reasons (file:line: why)."""
    logger.warning("%s: skipped %d of %d %s (--skip_bad_lines 1):%s", path, len(messages), total, what,
                   first_five(messages))


def report_lengths(path, total: int, cut: list[int], dropped: list[int], max_seq_len: int,
                   dropped_why: str = "") -> None:
    """Log, in one warning, how many of the `total` samples of `path` were cut to max_seq_len tokens (the line
    numbers `cut`; the first is named) and how many dropped (`dropped`, the first five named as file:line, as
    report_skipped names bad lines), `dropped_why` saying why. Silent when every sample fits."""
    if not cut and not dropped:
        return
    first_cut = f" (first: line {cut[0]})" if cut else ""
    why = f" ({dropped_why}):{first_five([f'{path}:{line_no}' for line_no in dropped])}" if dropped else ""
    logger.warning("%s: %d of %d samples cut to --max_seq_len %d tokens%s, %d dropped%s", path, len(cut), total,
                   max_seq_len, first_cut, len(dropped), why)


def first_five(lines: list[str]) -> str:
    """The first five of `lines`, one per indented line, and how many more there are."""
    more = f"\n  ... and {len(lines) - 5} more" if len(lines) > 5 else ""
    return "".join(f"\n  {line}" for line in lines[:5]) + more


def lines_dataset(path: str | Path, check_record: Callable[[dict], None], skip_bad_lines: bool) -> HFDataset:
    """The valid lines of a jsonl file as a `datasets.Dataset` with columns "line_no" (1-based) and "json".

    The raw JSON text is kept, not the parsed records: a dataset built from dicts gets one Arrow schema for all
    records, which would merge the keys of every tool call's arguments and fill the missing ones with null.
    """
    rows = read_jsonl_lines(path, check_record, skip_bad_lines)
    return HFDataset.from_dict({"line_no": [line_no for line_no, _, _ in rows], "json": [line for _, line, _ in rows]})


def check_pretrain_record(record: dict) -> None:
    """A pretraining line is {"text": <non-empty string>}."""
    if "text" not in record:
        raise DataFormatError(f'missing key "text" (keys: {sorted(record)})')
    if not isinstance(record["text"], str):
        raise DataFormatError(f'"text" must be a string, got {type(record["text"]).__name__}')
    if not record["text"].strip():
        raise DataFormatError('"text" is empty')


def check_sft_record(record: dict) -> None:
    """An SFT line holds a conversation: an optional system message, then user and assistant turns that
    alternate and end with an assistant; tool messages only right after an assistant message with tool_calls.
    """
    if "conversations" not in record:
        raise DataFormatError(f'missing key "conversations" (keys: {sorted(record)})')
    messages, tools = sft_messages_and_tools(record)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataFormatError('"tools" must be a list of objects (JSON schemas of functions)')
    check_conversation(messages, "conversations")


def sft_messages_and_tools(record: dict) -> tuple[object, object]:
    """The messages and tools of an SFT record, in the form the chat template takes.

    Upstream MiniMind's SFT data (its SFTDataset.create_chat_prompt) puts the tool schemas on the system message
    ({"role": "system", "content": ..., "tools": "[...]"}) and may store "tools" and "tool_calls" as JSON strings;
    these are moved to the record level and parsed, so both layouts render the same. Anything else is returned as
    it is, for check_conversation to judge.
    Raises:
        DataFormatError when a JSON string does not parse, or when both the record and its system message
        list tools.
    """
    messages, tools = record["conversations"], record.get("tools")
    if not isinstance(messages, list):
        return messages, tools
    normalized = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "system" and "tools" in message:
            if tools is not None:
                raise DataFormatError(f'conversations[{i}]: "tools" on the system message and on the record; '
                                      "list them once")
            message = dict(message)
            tools = parse_json_field(message.pop("tools"), f"conversations[{i}].tools")
        if isinstance(message, dict) and isinstance(message.get("tool_calls"), str):
            calls = parse_json_field(message["tool_calls"], f"conversations[{i}].tool_calls")
            message = {**message, "tool_calls": calls}
        normalized.append(message)
    return normalized, parse_json_field(tools, "tools")


def parse_json_field(value: object, where: str) -> object:
    """A value stored as a JSON string, parsed; any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{where}: invalid JSON string ({json_error_text(error)})") from None


def check_conversation(messages: object, key: str) -> None:
    """Check the message list under `key` of a record (see check_sft_record); errors name `key`."""
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f'"{key}" must be a non-empty list of {{"role", "content"}} objects')
    previous = None
    for i, message in enumerate(messages):
        kind = check_message(message, f"{key}[{i}]")
        if previous not in ALLOWED_PREVIOUS[kind]:
            after = {None: "the start", "tool_calls": "an assistant message with tool_calls"}.get(
                previous, f"a {previous!r} message")
            raise DataFormatError(
                f"{key}[{i}]: a {message['role']!r} message cannot follow {after}; expected an optional "
                "system message, then user/assistant turns alternating (tool messages only after an assistant "
                "message with tool_calls)")
        previous = kind
    if previous not in ("assistant", "tool_calls"):
        raise DataFormatError(f"{key} must end with an assistant message, not a {previous!r} message")


def check_dpo_record(record: dict) -> None:
    """A DPO line holds two conversations, "chosen" and "rejected", each valid as in check_sft_record, that
    differ only in their last message: the same prompt, two assistant replies to it."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataFormatError(f'missing key "{key}" (keys: {sorted(record)})')
        check_conversation(record[key], key)
    chosen_prompt, rejected_prompt = record["chosen"][:-1], record["rejected"][:-1]
    if chosen_prompt != rejected_prompt:
        first = next((i for i, (a, b) in enumerate(zip(chosen_prompt, rejected_prompt)) if a != b),
                     min(len(chosen_prompt), len(rejected_prompt)))
        raise DataFormatError(f"chosen and rejected prompts differ (first difference at message {first}); both "
                              "must hold the same messages and differ only in the final assistant reply")


def check_message(message: object, where: str) -> str:
    """Check one message of a conversation and return its kind: its role, or "tool_calls" for an assistant
    message that calls tools."""
    if not isinstance(message, dict):
        raise DataFormatError(f'{where} must be an object with "role" and "content", got {type(message).__name__}')
    for key in ("role", "content"):
        if not isinstance(message.get(key), str):
            raise DataFormatError(f'{where}: "{key}" must be a string, got {message.get(key)!r:.40}')
    role = message["role"]
    if role not in ("system", "user", "assistant", "tool"):
        raise DataFormatError(f"{where}: unknown role {role!r}; expected system, user, assistant or tool")
    extra = {"reasoning_content", "tool_calls"} & set(message)
    if role != "assistant" and extra:
        raise DataFormatError(f"{where}: only assistant messages may have {sorted(extra)}")
    if "reasoning_content" in message and not isinstance(message["reasoning_content"], str):
        raise DataFormatError(f'{where}: "reasoning_content" must be a string')
    if "tool_calls" in message:
        calls = message["tool_calls"]
        if not (isinstance(calls, list) and all(is_tool_call(call) for call in calls)):
            raise DataFormatError(f'{where}: "tool_calls" must be a list of {{"name": str, "arguments": object}}')
        if calls:
            return "tool_calls"  # its content may be empty: the calls are the reply
    if not message["content"].strip():
        raise DataFormatError(f'{where}: empty "content" in a {role} message')
    return role


def is_tool_call(call: object) -> bool:
    """{"name": str, "arguments": object or JSON string}, bare or wrapped as {"function": {...}} (OpenAI)."""
    call = call.get("function", call) if isinstance(call, dict) else None
    return (isinstance(call, dict) and isinstance(call.get("name"), str)
            and isinstance(call.get("arguments"), (dict, str)))


# ----------------------------------------------------------------------------------------------------------
# Tensors


def pad_collate(items: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack samples into a batch, right-padding them to the longest one.

    Args:
        items: dicts of 1-D LongTensors (input_ids, labels, optionally position_ids), lengths L_i.
        pad_token_id: value of input_ids at padded positions; labels are padded with IGNORE_INDEX
            (no loss), anything else with 0.
    Returns:
        dict of (batch, max L_i) LongTensors, plus attention_mask (1 real / 0 pad) when lengths differ
        (when they do not, the model runs its plain causal attention).
    """
    padding_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    batch = {key: pad_sequence([item[key] for item in items], batch_first=True,
                               padding_value=padding_values.get(key, 0))
             for key in items[0]}
    lengths = torch.tensor([len(item["input_ids"]) for item in items])
    if (lengths != lengths[0]).any():
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
    return batch


def document_position_ids(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """Positions that restart at 0 at every document start of a packed block.

    A document starts at position 0 of the block and at the token right after each separator; the separator
    itself ends the document before it. The model reads restarts inside a row as packed documents and
    builds a block-diagonal causal mask, so no token attends to an earlier document.

        position_ids[t] = t - (the latest document start at or before t)

    Args:
        input_ids: (..., seq_len) token ids.
    Returns:
        (..., seq_len) LongTensor. Example: [a, b, SEP, c, d] -> [0, 1, 2, 0, 1].
    """
    seq_len = input_ids.shape[-1]
    position = torch.arange(seq_len).expand_as(input_ids)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[..., 0] = True
    starts[..., 1:] = input_ids[..., :-1] == separator_id
    # index of the latest document start at or before each position
    last_start = torch.where(starts, position, 0).cummax(dim=-1).values
    return position - last_start


class PretrainDataset(Dataset):
    """Text documents packed into full blocks of max_seq_len tokens, with no padding.

    Each document is tokenized once and followed by <|endoftext|>; the stream of all documents is cut into
    consecutive blocks (documents cross block borders; the tail shorter than a block is dropped), as in
    GPT-2/nanoGPT pretraining. labels == input_ids: the model shifts them, so position t predicts token t+1.

        stream   = d_1 SEP d_2 SEP ... d_n SEP               (every document's tokens, each followed by SEP)
        block_i  = stream[i * L : (i + 1) * L],  i = 0 .. floor(len(stream) / L) - 1,   L = max_seq_len

    Args:
        data_path: jsonl of {"text": ...} lines.
        tokenizer: a Hugging Face tokenizer with the <|endoftext|> token.
        max_seq_len: block length in tokens.
        doc_mask: also return position_ids restarting at every document (see document_position_ids).
        skip_bad_lines: skip (and report) invalid lines instead of raising at the first.
    Items: {"input_ids": (max_seq_len,), "labels": (max_seq_len,)[, "position_ids": (max_seq_len,)]}.
    Raises:
        DataFormatError for a bad file or line, or a file with fewer than max_seq_len tokens.
    """

    def __init__(self, data_path: str | Path, tokenizer, max_seq_len: int, doc_mask: bool = False,
                 skip_bad_lines: bool = False):
        separator_id = tokenizer.convert_tokens_to_ids(DOCUMENT_SEPARATOR)
        if separator_id is None:
            raise ValueError(f"the tokenizer has no {DOCUMENT_SEPARATOR} token to separate documents")

        def tokenize(batch):
            texts = [json.loads(line)["text"] for line in batch["json"]]
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            return {"input_ids": [doc + [separator_id] for doc in ids]}

        # documents longer than max_seq_len are not an error: they continue into the next blocks
        documents = lines_dataset(data_path, check_pretrain_record, skip_bad_lines)
        documents = documents.map(tokenize, batched=True, remove_columns=documents.column_names,
                                  desc="tokenizing documents")
        stream = torch.cat(list(documents.with_format("torch")["input_ids"]))  # (total_tokens,)
        num_blocks = len(stream) // max_seq_len
        if num_blocks == 0:
            raise DataFormatError(f"{data_path}: {len(stream)} tokens in all, fewer than one block of "
                                  f"max_seq_len={max_seq_len}; use a shorter max_seq_len or more text")
        self.blocks = stream[: num_blocks * max_seq_len].view(num_blocks, max_seq_len)  # (num_blocks, max_seq_len)
        self.lengths = [max_seq_len] * num_blocks
        self.separator_id, self.pad_token_id, self.doc_mask = separator_id, tokenizer.pad_token_id, doc_mask

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = self.blocks[index]
        item = {"input_ids": input_ids, "labels": input_ids.clone()}
        if self.doc_mask:
            item["position_ids"] = document_position_ids(input_ids, self.separator_id)
        return item

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack blocks (all max_seq_len long, so no padding and no attention_mask)."""
        return pad_collate(items, self.pad_token_id)


def lines_where(samples: HFDataset, column: str) -> list[int]:
    """The "line_no" of the samples whose boolean `column` ("cut", "dropped") is true."""
    return [line_no for line_no, flag in zip(samples["line_no"], samples[column]) if flag]


class SFTDataset(Dataset):
    """Chat conversations for supervised fine-tuning, loss on the assistant replies only.

    Each conversation is rendered by build_assistant_labels (dataset/chat_format.py): labels are the token ids
    of what the assistant writes, IGNORE_INDEX elsewhere. Samples keep their own length (no padding here);
    collate pads a batch to its longest sample, and `lengths` lets the trainer batch samples of similar length
    together.

    Args:
        data_path: jsonl of {"conversations": [...], "tools"?: [...]} lines (see the module docstring).
        tokenizer: a Hugging Face tokenizer with the ChatML tokens of trainer/train_tokenizer.py.
        max_seq_len: samples are cut to this many tokens; a sample whose first assistant token lies beyond it
            would teach nothing and is dropped (both counted and logged, see report_lengths).
        skip_bad_lines: skip (and report) invalid lines instead of raising at the first.
    Items: {"input_ids": (L,), "labels": (L,)} with L <= max_seq_len.
    Raises:
        DataFormatError for a bad file or line (file:line), or when every sample is dropped.
    """

    def __init__(self, data_path: str | Path, tokenizer, max_seq_len: int, skip_bad_lines: bool = False):
        self.pad_token_id = tokenizer.pad_token_id

        def tokenize(batch):
            out = {"input_ids": [], "labels": [], "line_no": batch["line_no"], "cut": [], "dropped": []}
            for line in batch["json"]:
                input_ids, labels = build_assistant_labels(tokenizer, *sft_messages_and_tools(json.loads(line)))
                # nothing to learn within max_seq_len: dropped below, after its line is reported
                dropped = all(label == IGNORE_INDEX for label in labels[:max_seq_len])
                out["dropped"].append(dropped)
                out["cut"].append(not dropped and len(input_ids) > max_seq_len)
                out["input_ids"].append(input_ids[:max_seq_len])
                out["labels"].append(labels[:max_seq_len])
            return out

        lines = lines_dataset(data_path, check_sft_record, skip_bad_lines)
        samples = lines.map(tokenize, batched=True, remove_columns=lines.column_names, desc="rendering conversations")
        dropped = lines_where(samples, "dropped")
        report_lengths(data_path, len(samples), lines_where(samples, "cut"), dropped, max_seq_len,
                       "no assistant token within the limit")
        if len(dropped) == len(samples):
            raise DataFormatError(f"{data_path}: no conversation has an assistant token within the first "
                                  f"--max_seq_len {max_seq_len} tokens; use a longer --max_seq_len")
        samples = samples.filter(lambda dropped: not dropped, input_columns="dropped")
        samples = samples.remove_columns(["line_no", "cut", "dropped"])
        self.lengths = [len(ids) for ids in samples["input_ids"]]
        self.samples = samples.with_format("torch")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sample: input_ids with the pad token, labels with IGNORE_INDEX,
        plus attention_mask when lengths differ."""
        return pad_collate(items, self.pad_token_id)


def split_prompt_and_reply(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Tokens of a conversation's prompt and of its final assistant reply, as a model generating the reply sees them.

    The prompt is every message but the last, followed by the assistant header (render_prompt): the context after
    which the model starts to write. The reply is what the assistant writes, up to and including its closing
    <|im_end|> (reply_ids), tokenized on its own, as trl's DPOTrainer does, so that two replies to one prompt share
    the prompt's tokens exactly. The same tokens and the same labelled span as build_assistant_labels.

    Returns:
        (prompt_ids, reply_ids); prompt_ids + reply_ids is the sequence the reply is scored on.
    """
    return render_prompt(tokenizer, messages[:-1]), reply_ids(tokenizer, messages[-1])


class DPODataset(Dataset):
    """Preference pairs for DPO: one prompt, a chosen and a rejected reply, loss on the reply tokens only.

    Each side is the shared prompt's tokens followed by its reply's tokens (split_prompt_and_reply); labels are
    IGNORE_INDEX on the prompt and the token ids on the reply (its content and closing <|im_end|>), so a model's
    log-probability of the reply given the prompt is the sum over the labelled positions.

    Truncation to max_seq_len keeps the replies, which the loss compares: a reply longer than max_seq_len - 1
    tokens is cut on the right, then the prompt is cut on the left to what the longer reply leaves, the same cut
    for both sides, so chosen and rejected are scored in the same context (at least the prompt's last token,
    which predicts the reply's first), as trl's DPOTrainer keeps the end of a long prompt. So no pair is dropped
    for its length: unlike an SFT conversation, a pair's reply never starts beyond max_seq_len.

    Args:
        data_path: jsonl of {"chosen": [messages], "rejected": [messages]} lines (see check_dpo_record).
        tokenizer: a Hugging Face tokenizer with the ChatML tokens of trainer/train_tokenizer.py.
        max_seq_len: most tokens of each side (>= 2); cut pairs are counted and logged (report_lengths).
        skip_bad_lines: skip (and report) invalid lines instead of raising at the first.
    Items: {"chosen_input_ids", "chosen_labels": (Lc,), "rejected_input_ids", "rejected_labels": (Lr,)} with
        Lc, Lr <= max_seq_len; both sides start with the same prompt tokens.
    Raises:
        DataFormatError for a bad file or line, e.g. a pair whose chosen and rejected prompts differ.
    """

    def __init__(self, data_path: str | Path, tokenizer, max_seq_len: int, skip_bad_lines: bool = False):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len}: a DPO sample needs a prompt token and a reply token")
        self.pad_token_id = tokenizer.pad_token_id

        def tokenize(batch):
            out = {f"{side}_{key}": [] for side in ("chosen", "rejected") for key in ("input_ids", "labels")}
            out.update(line_no=batch["line_no"], cut=[])
            for line in batch["json"]:
                record = json.loads(line)
                prompt_ids, chosen_ids = split_prompt_and_reply(tokenizer, record["chosen"])
                rejected_ids = reply_ids(tokenizer, record["rejected"][-1])  # the same prompt (check_dpo_record)
                out["cut"].append(len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_seq_len)
                chosen_ids, rejected_ids = chosen_ids[:max_seq_len - 1], rejected_ids[:max_seq_len - 1]
                prompt_ids = prompt_ids[-(max_seq_len - max(len(chosen_ids), len(rejected_ids))):]
                for side, reply in (("chosen", chosen_ids), ("rejected", rejected_ids)):
                    out[f"{side}_input_ids"].append(prompt_ids + reply)
                    out[f"{side}_labels"].append([IGNORE_INDEX] * len(prompt_ids) + reply)
            return out

        lines = lines_dataset(data_path, check_dpo_record, skip_bad_lines)
        pairs = lines.map(tokenize, batched=True, remove_columns=lines.column_names, desc="rendering conversations")
        report_lengths(data_path, len(pairs), lines_where(pairs, "cut"), [], max_seq_len)
        pairs = pairs.remove_columns(["line_no", "cut"])
        self.lengths = [max(len(c), len(r)) for c, r in zip(pairs["chosen_input_ids"], pairs["rejected_input_ids"])]
        self.pairs = pairs.with_format("torch")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.pairs[index]

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch of 2B rows, the B chosen sides then the B rejected ones, right-padded to one length (see
        pad_collate), so a single forward pass scores both: rows i and B + i are the two replies of pair i."""
        rows = [{"input_ids": item[f"{side}_input_ids"], "labels": item[f"{side}_labels"]}
                for side in ("chosen", "rejected") for item in items]
        return pad_collate(rows, self.pad_token_id)

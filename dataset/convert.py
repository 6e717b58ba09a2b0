"""Raw files in common formats -> records of our three stages, and the helpers every prepare step shares.

Our records (one JSON object per line, checked by dataset/lm_dataset.py):
    pretrain  {"text": "..."}
    sft       {"conversations": [{"role": ..., "content": ...}, ...], "tools"?: [...]}
    dpo       {"chosen": [messages], "rejected": [messages]}

Raw formats read here (the file type comes from the extension, the format from --format or the fields):
    text        .txt: one document per blank-line block, per line or per file; or a "text" column (--text_field)
    alpaca      {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
    sharegpt    {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...], "system"?, "tools"?}
                (our own SFT records, with "role"/"content", are read the same way)
    openai      {"messages": [{"role", "content", ...}, ...], "tools"?}
    preference  {"prompt" | "conversations": str or messages, "chosen": ..., "rejected": ..., "system"?}; a reply
                is a string, a message or a list of messages (trl's standard and conversational formats,
                LLaMA-Factory's ShareGPT pairs, and our own DPO records)

Files are read with the `datasets` library (load_dataset "text" / "json" / "csv" / "parquet"), except .jsonl,
which dataset/lm_dataset.py's reader parses line by line as the stage datasets do: so an error names its line,
and no record gets the keys of the other records (Arrow gives all rows of a table one schema).
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError

from dataset.lm_dataset import (DataFormatError, check_dpo_record, check_pretrain_record, check_sft_record,
                                read_jsonl, read_jsonl_lines)

LOADERS = {".txt": "text", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # file type -> `datasets` builder
FILE_TYPES = (".jsonl", *LOADERS)
FORMATS = ("text", "alpaca", "sharegpt", "openai", "preference")
STAGE_OF_FORMAT = {"text": "pretrain", "alpaca": "sft", "sharegpt": "sft", "openai": "sft", "preference": "dpo"}
CHECKS = {"pretrain": check_pretrain_record, "sft": check_sft_record, "dpo": check_dpo_record}
# ShareGPT speaker names (LLaMA-Factory, FastChat) and OpenAI's "developer" -> our roles
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "model": "assistant", "system": "system", "developer": "system", "tool": "tool", "observation": "tool"}
OPTIONAL_MESSAGE_KEYS = ("reasoning_content", "tool_calls")  # kept from OpenAI messages (see lm_dataset)
TEXT_UNITS = ("paragraph", "line", "document")  # a .txt document: a blank-line block, a line, the whole file


class Skip(Exception):
    """A raw record with nothing to learn from (an empty reply or text); counted and left out, not an error."""


# ----------------------------------------------------------------------------------------------------------
# Reading raw files


def read_raw(path: str | Path, text_unit: str = "paragraph") -> Iterator[tuple[str, object]]:
    """Yield (location, row) for every row of a raw file (see the module docstring for the readers).

    Args:
        path: a .jsonl, .txt, .json (array or lines), .csv or .parquet file.
        text_unit: for .txt, one row per "paragraph" (blank-line block), "line" or "document" (the file).
    Yields:
        location: "<path>:<line>" for .jsonl, "<path>: record <n>" (1-based) otherwise; rows: a str for .txt,
        a dict for the others.
    Raises:
        DataFormatError for a missing file, an unknown extension, or a file the reader cannot parse.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataFormatError(f"{path}: unknown file type {suffix!r}; expected one of {', '.join(FILE_TYPES)}")
    if suffix == ".jsonl":
        for line_no, _, record in read_jsonl_lines(path, check_record=lambda record: None):
            yield f"{path}:{line_no}", record
        return
    # .txt: blocks as asked, a byte-order mark dropped; .csv: empty cells are "" and "NA", "None" stay text
    options = {".txt": {"sample_by": text_unit, "encoding": "utf-8-sig"}, ".csv": {"na_filter": False}}.get(suffix, {})
    try:
        rows = load_dataset(LOADERS[suffix], data_files=str(path), split="train", **options)
    except (DatasetGenerationError, ValueError) as error:  # the file is not what its extension says
        cause = error.__cause__ or error  # datasets wraps the reader's own error (json, pandas, pyarrow, utf-8)
        raise DataFormatError(f"{path}: cannot be read as {suffix}: {type(cause).__name__}: "
                              f"{str(cause).splitlines()[0]}") from None
    for index, row in enumerate(rows):
        if suffix == ".txt":
            yield f"{path}: block {index + 1}", row["text"]
        else:
            yield f"{path}: record {index + 1}", row


def detect_format(row: object, where: str) -> str:
    """The raw format a row's fields say it is in (see the module docstring)."""
    if isinstance(row, str):
        return "text"
    present = {key for key, value in row.items() if value is not None}
    if "instruction" in present:
        return "alpaca"
    if {"chosen", "rejected"} <= present:
        return "preference"
    for key, name in (("conversations", "sharegpt"), ("messages", "openai"), ("text", "text")):
        if key in present:
            return name
    raise DataFormatError(f"{where}: cannot tell the format from the fields {sorted(present)}; expected "
                          '"text" (text), "instruction" + "output" (alpaca), "conversations" (sharegpt), '
                          '"messages" (openai) or "prompt" + "chosen" + "rejected" (preference), or pass --format')


# ----------------------------------------------------------------------------------------------------------
# Raw records -> our records


def field(row: dict, key: str, expected: str):
    """row[key]; a key no record of the file has is an error that says what was expected. In tables (.json
    arrays, .parquet) every row has every column, so a value one record lacks reads as None."""
    if key not in row:
        raise DataFormatError(f'missing field "{key}" ({expected}); the record has {sorted(row)}')
    return row[key]


def string(value, what: str) -> str:
    """A text field's value; None (a record without it) reads as empty."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataFormatError(f"{what} must be a string, got {type(value).__name__}")
    return value


def from_text(row, text_field: str, join_lines: bool) -> dict:
    """A document: a block of a .txt file, or the text_field of a record; join_lines joins its lines with spaces."""
    text = row if isinstance(row, str) else string(field(row, text_field, "the document's text"), f'"{text_field}"')
    if join_lines:
        text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if not text.strip():
        raise Skip("empty text")
    return {"text": text.strip("\n")}


def from_alpaca(row: dict) -> dict:
    """Alpaca (Taori et al. 2023) as LLaMA-Factory extends it: user = instruction + blank line + input."""
    instruction = string(field(row, "instruction", "the task, a string"), '"instruction"')
    output = string(field(row, "output", "the reply, a string"), '"output"')
    extra = string(row.get("input"), '"input"')
    messages = [{"role": "system", "content": string(row["system"], '"system"')}] if row.get("system") else []
    for turn in row.get("history") or []:  # earlier [user, assistant] pairs of a multi-turn record
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise DataFormatError('"history" must be a list of [user, assistant] pairs')
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    if not output.strip() or not instruction.strip():
        raise Skip("empty instruction or output")
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return {"conversations": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def from_chat(row: dict, key: str) -> dict:
    """ShareGPT ("conversations" of from/value) or OpenAI ("messages" of role/content) -> an SFT record."""
    value = field(row, key, "a list of messages")
    if value is None:
        raise Skip("no messages")
    messages = [as_message(m, f'"{key}"[{i}]') for i, m in enumerate(message_list(value, key))]
    if row.get("system"):
        messages = [{"role": "system", "content": string(row["system"], '"system"')}] + messages
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip() \
            and not messages[-1].get("tool_calls"):
        raise Skip("empty reply")
    record = {"conversations": messages}
    if row.get("tools"):
        record["tools"] = message_list(row["tools"], "tools")
    return record


def from_preference(row: dict) -> dict:
    """A prompt and two replies -> {"chosen": prompt + chosen, "rejected": prompt + rejected}."""
    prompt = row.get("prompt") if row.get("prompt") is not None else row.get("conversations")
    messages = [] if prompt is None else turns(prompt, "prompt", default_role="user")
    if row.get("system"):
        messages = [{"role": "system", "content": string(row["system"], '"system"')}] + messages
    record = {side: messages + turns(field(row, side, "a reply: a string, a message or a list of messages"), side,
                                     default_role="assistant")
              for side in ("chosen", "rejected")}
    if any(not record[side][-1]["content"].strip() for side in record):
        raise Skip("empty reply")
    return record


def turns(value, key: str, default_role: str) -> list[dict]:
    """Messages from a preference field: a string (one message of default_role), a message, or a list of them."""
    if value is None or isinstance(value, str):  # None: a record of a table that lacks this reply
        return [{"role": default_role, "content": value or ""}]
    value = [value] if isinstance(value, dict) else message_list(value, key)
    return [as_message(message, f'"{key}"[{i}]') for i, message in enumerate(value)]


def message_list(value, key: str) -> list:
    """A field that must hold a list; a CSV cell holds it as a JSON string, which is parsed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataFormatError(f'"{key}" must be a list, got a string that is not JSON: {value[:40]!r}') from None
    if not isinstance(value, list):
        raise DataFormatError(f'"{key}" must be a list, got {type(value).__name__}')
    return value


def as_message(message, where: str) -> dict:
    """One message in our form: {"role", "content"} plus reasoning_content / tool_calls when present.
    Accepts "role"/"content" (OpenAI, ours) and "from"/"value" (ShareGPT)."""
    if not isinstance(message, dict):
        raise DataFormatError(f"{where} must be an object, got {type(message).__name__}")
    speaker = message.get("role") if message.get("role") is not None else message.get("from")
    if speaker not in ROLES:
        raise DataFormatError(f'{where}: unknown speaker {speaker!r} in "role"/"from"; expected one of '
                              f"{', '.join(ROLES)}")
    content = message.get("content") if message.get("content") is not None else message.get("value")
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        content = "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    result = {"role": ROLES[speaker], "content": string(content, f"{where} content")}
    result.update({key: message[key] for key in OPTIONAL_MESSAGE_KEYS if message.get(key) is not None})
    return result


def convert_row(row, raw_format: str, text_field: str = "text", join_lines: bool = False) -> dict:
    """One raw row as a record of its stage, checked as the stage dataset checks it.

    Raises:
        Skip for a row with an empty reply or text; DataFormatError (without location) for a missing field or
        a record the stage cannot use.
    """
    if raw_format == "text":
        record = from_text(row, text_field, join_lines)
    elif raw_format == "alpaca":
        record = from_alpaca(row)
    elif raw_format == "preference":
        record = from_preference(row)
    else:
        record = from_chat(row, "conversations" if raw_format == "sharegpt" else "messages")
    CHECKS[STAGE_OF_FORMAT[raw_format]](record)
    return record


def convert_files(paths: list[str | Path], raw_format: str = "auto", text_field: str = "text",
                  text_unit: str = "paragraph", join_lines: bool = False) -> tuple[str, list[dict], dict[str, int]]:
    """Convert raw files of one format into records of one stage.

    Args:
        paths: raw files (see read_raw); all must hold the same format.
        raw_format: one of FORMATS, or "auto": from the extension (.txt) or the first row's fields.
        text_field: the column holding the text, for the "text" format in .json/.jsonl/.csv/.parquet.
        text_unit: what a .txt document is (see TEXT_UNITS).
        join_lines: for the "text" format, join the lines of a document with spaces (hard-wrapped books).
    Returns:
        (stage, records, skipped): stage is "pretrain", "sft" or "dpo"; skipped counts rows left out by reason.
    Raises:
        DataFormatError "<file>:<line>: ..." (or "<file>: record <n>: ...") for a missing field, an unknown
        format, or a record the stage cannot use.
    """
    records, skipped, stage = [], {}, None
    for path in paths:
        file_format = None if raw_format == "auto" else raw_format
        for where, row in read_raw(path, text_unit):
            if file_format is None:  # the first row of the file tells
                file_format = detect_format(row, where)
            if isinstance(row, str) and file_format != "text":
                raise DataFormatError(f"{where}: --format {file_format} needs records with fields; a .txt file "
                                      "holds plain text (--format text)")
            if stage not in (None, STAGE_OF_FORMAT[file_format]):
                raise DataFormatError(f"{where}: {file_format} records give {STAGE_OF_FORMAT[file_format]} data, "
                                      f"the files before gave {stage} data; convert them separately")
            stage = STAGE_OF_FORMAT[file_format]
            try:
                records.append(convert_row(row, file_format, text_field, join_lines))
            except Skip as reason:
                skipped[str(reason)] = skipped.get(str(reason), 0) + 1
            except DataFormatError as error:
                raise DataFormatError(f"{where}: {error} (reading it as {file_format})") from None
    if not records:
        raise DataFormatError(f"{', '.join(map(str, paths))}: no record to convert")
    return stage, records, skipped


# ----------------------------------------------------------------------------------------------------------
# Our records: reading, writing, and what the model reads of them


def stage_of(record: dict) -> str:
    """The stage a record of ours belongs to, from its key."""
    for key, stage in (("text", "pretrain"), ("conversations", "sft"), ("chosen", "dpo")):
        if key in record:
            return stage
    raise DataFormatError(f'expected "text" (pretrain), "conversations" (sft) or "chosen" + "rejected" (dpo); '
                          f"the record has {sorted(record)}")


def read_records(path: str | Path) -> tuple[str, list[dict]]:
    """Read and check one of our jsonl files (every line of the stage its first line belongs to).

    Returns:
        (stage, records).
    Raises:
        DataFormatError "<file>:<line>: ..." as dataset/lm_dataset.py's read_jsonl.
    """
    stages = []

    def check(record: dict) -> None:
        stages.append(stages[0] if stages else stage_of(record))
        CHECKS[stages[0]](record)

    records = read_jsonl(path, check)
    return stages[0], records


def write_records(path: str | Path, records: list[dict]) -> None:
    """Write records as jsonl, one JSON object per line, UTF-8 text as it is (no \\u escapes).

    Written line by line with json.dumps, not through an Arrow table, which would give every record the keys of
    all the others (e.g. "tool_calls": null in every message), which the stage datasets rightly reject.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def message_lists(record: dict) -> list[list[dict]]:
    """The conversations of a record: none (pretrain), one (sft) or two (dpo)."""
    if "text" in record:
        return []
    if "conversations" in record:
        return [record["conversations"]]
    return [record["chosen"], record["rejected"]]


def record_texts(record: dict) -> list[str]:
    """Every text the model reads in a record: the document, or each message's content and reasoning."""
    if "text" in record:
        return [record["text"]]
    return [message[key] for messages in message_lists(record) for message in messages
            for key in ("content", "reasoning_content") if key in message]


def map_texts(record: dict, function: Callable[[str], str]) -> dict:
    """A copy of the record with function applied to every text of record_texts (roles, tools untouched)."""
    if "text" in record:
        return {**record, "text": function(record["text"])}

    def mapped(messages):
        return [{**m, **{key: function(m[key]) for key in ("content", "reasoning_content") if key in m}}
                for m in messages]
    keys = ["conversations"] if "conversations" in record else ["chosen", "rejected"]
    return {**record, **{key: mapped(record[key]) for key in keys}}


def joined_text(record: dict) -> str:
    """The record's texts joined by newlines, what the length, language and duplicate filters look at.
    For a DPO pair, the shared prompt counts once."""
    if "chosen" in record:
        return "\n".join(record_texts({"conversations": record["chosen"]}) + [record["rejected"][-1]["content"]])
    return "\n".join(record_texts(record))


def split_key(record: dict) -> str:
    """What decides a record's side of the train/test split: a document's text, a conversation's first user
    message. Keying chats on the prompt keeps every answer to one question on the same side."""
    if "text" in record:
        return record["text"]
    messages = message_lists(record)[0]
    return next((m["content"] for m in messages if m["role"] == "user"), joined_text(record))


def count_tokens(record: dict, tokenizer) -> int:
    """Tokens the model reads for a record: a document without its <|endoftext|>, a conversation as the chat
    template renders it, a DPO pair both conversations. (Before truncation to --max_seq_len.)"""
    if "text" in record:
        return len(tokenizer(record["text"], add_special_tokens=False)["input_ids"])
    return sum(len(tokenizer.apply_chat_template(messages, tools=record.get("tools"), tokenize=True)["input_ids"])
               for messages in message_lists(record))

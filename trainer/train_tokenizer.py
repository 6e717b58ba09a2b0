"""Train a byte-level BPE tokenizer like the one shipped in model/tokenizer/.

Byte-level BPE (Radford et al. 2019, GPT-2 sec. 2.2; Sennrich et al. 2016): text is first split into
words by the GPT-2 regex, every word is written as bytes (so any string, Chinese or emoji included, can be
encoded and no token is ever "unknown"), and the trainer then merges the most frequent adjacent pair of
symbols again and again until the vocabulary holds --vocab_size entries.

The ids of the control tokens are fixed (the model and the datasets rely on them):

    0 <|endoftext|>   pad token, and the separator appended after every pretraining document
    1 <|im_start|>    opens a ChatML turn
    2 <|im_end|>      closes a ChatML turn; the eos token of the chat model
    3 <think>  4 </think>  5 <tool_call>  6 </tool_call>  7 <tool_response>  8 </tool_response>

The first three are special tokens (dropped by decode(..., skip_special_tokens=True)); ids 3-8 are ordinary
added tokens, as in Qwen3, so reasoning and tool calls stay visible in decoded text. There is no bos token
(as in Qwen3): documents are delimited by the <|endoftext|> that follows each one and chat turns start with
<|im_start|>, which the chat template writes itself, so an automatic bos would only duplicate them.

    python trainer/train_tokenizer.py                                  # writes out/tokenizer/
    python trainer/train_pretrain.py --tokenizer_path out/tokenizer   # a model with it (every stage takes the flag)
    python trainer/train_tokenizer.py --data_path a.jsonl,b.jsonl --vocab_size 8000 --save_dir out/tok

It writes out/tokenizer/ by default, never over the shipped model/tokenizer/ that every shipped checkpoint, test
and default run relies on; --save_dir model/tokenizer replaces the shipped one on purpose.
"""

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dataset.lm_dataset import DataFormatError, check_pretrain_record, check_sft_record, read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONTROL_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
MODEL_MAX_LENGTH = 32768  # the model's max_position_embeddings

# ChatML as Qwen3 writes it (system block with the tool signatures, <tool_call> JSON, tool results in a user
# turn inside <tool_response>), with two changes: every assistant reply -- its reasoning, content, tool calls
# and closing <|im_end|> -- sits in a {% generation %} block, so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the tokens the model is trained
# to produce; and reasoning_content is rendered in every assistant turn that has one (Qwen3 renders it only
# after the last user message, which suits inference but would drop training targets).
CHAT_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' }}
    {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}' }}
    {{- '\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {%- if message.reasoning_content %}
                {{- '<think>\n' + message.reasoning_content.strip('\n') + '\n</think>\n\n' }}
            {%- endif %}
            {{- message.content or '' }}
            {%- for tool_call in message.tool_calls or [] %}
                {%- if message.content or not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {%- set call = tool_call.function or tool_call %}
                {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
                {{- call.arguments if call.arguments is string else call.arguments | tojson }}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- elif not (message.role == 'system' and loop.first) %}
        {{- raise_exception('a ' + message.role + ' message at position ' + loop.index0 | string
                            + ': expected system (first only), user, assistant or tool') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""".strip()


def check_text_or_conversation(record: dict) -> None:
    """Validate a line of either format, so pretraining and SFT files can be mixed in --data_path."""
    if "conversations" in record:
        check_sft_record(record)
    else:
        check_pretrain_record(record)


def iter_training_texts(paths: list[Path]) -> Iterator[str]:
    """Yield every text of the files: pretraining documents and each message of SFT conversations.

    All files are validated first, so a bad line (DataFormatError naming file:line) stops the run before
    training starts.
    """
    files = [read_jsonl(path, check_text_or_conversation) for path in paths]
    for records in files:
        for record in records:
            if "text" in record:
                yield record["text"]
                continue
            for message in record["conversations"]:
                yield message["content"]
                if message.get("reasoning_content"):
                    yield message["reasoning_content"]


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on the texts; ids 0-8 are SPECIAL_TOKENS then CONTROL_TOKENS, in that order.

    Each merge step of the trainer (Sennrich et al. 2016, Algorithm 1) takes the adjacent pair of symbols with
    the highest count over the words w of the text, each word weighted by its frequency f(w),

        (a, b) = argmax over pairs of  sum_w f(w) * #{i : w_i = a, w_{i+1} = b}

    replaces every occurrence of a b by the new symbol ab, and repeats until the vocabulary (256 byte symbols +
    the 9 reserved tokens + one symbol per merge) holds vocab_size entries. scripts/xray/bpe_merges.py
    (learn_merges) does the same by hand and gets the same merges.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + CONTROL_TOKENS,  # reserved first, in list order: ids 0..8
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those absent from the data
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # The trainer registers every reserved token as special; mark the control tokens as ordinary added tokens
    # (the tokenizers API cannot clear the flag in place, so edit the serialized form).
    config = json.loads(tokenizer.to_str())
    for token in config["added_tokens"]:
        token["special"] = token["content"] in SPECIAL_TOKENS
    return Tokenizer.from_str(json.dumps(config))


def to_hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained tokenizer with the ChatML template and the pad/eos tokens of the model."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
    )


def parse_data_paths(values: list[str] | None) -> list[Path]:
    """The files named by --data_path, which may be repeated and/or comma-separated; defaults to the shipped data."""
    if not values:
        return [REPO_ROOT / "dataset" / "data" / "pretrain.jsonl", REPO_ROOT / "dataset" / "data" / "sft.jsonl"]
    return [Path(part.strip()) for value in values for part in value.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", action="append",
                        help="jsonl file(s) of {'text'} documents or {'conversations'} chats; repeat the flag or "
                             "separate paths with commas (default: dataset/data/pretrain.jsonl and "
                             "dataset/data/sft.jsonl)")
    parser.add_argument("--vocab_size", type=int, default=6400,
                        help="number of tokens, the 9 control tokens included (default: 6400)")
    parser.add_argument("--save_dir", type=Path, default=REPO_ROOT / "out" / "tokenizer",
                        help="output Hugging Face tokenizer directory (default: out/tokenizer; the shipped one, "
                             "model/tokenizer, is left alone unless named here)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    minimum = len(SPECIAL_TOKENS + CONTROL_TOKENS) + 256
    if args.vocab_size < minimum:
        parser.error(f"--vocab_size {args.vocab_size} is too small: the 256 bytes and 9 control tokens need {minimum}")

    try:
        tokenizer = to_hf_tokenizer(train_bpe(iter_training_texts(parse_data_paths(args.data_path)), args.vocab_size))
    except DataFormatError as error:
        raise SystemExit(f"error: {error}") from None
    tokenizer.save_pretrained(args.save_dir)

    sample = "Once upon a time, 一只小猫 found a 🌟."
    ids = tokenizer.encode(sample)
    logging.info("vocab size %d, saved to %s", len(tokenizer), args.save_dir)
    if Path(args.save_dir).resolve() != (REPO_ROOT / "model" / "tokenizer").resolve():
        logging.info("use it with --tokenizer_path %s on every stage (a model trained with it needs it everywhere)",
                     args.save_dir)
    logging.info("ids 0-8: %s", tokenizer.convert_ids_to_tokens(list(range(9))))
    logging.info("round trip: %r -> %d tokens %s -> %r", sample, len(ids), tokenizer.convert_ids_to_tokens(ids),
                 tokenizer.decode(ids))


if __name__ == "__main__":
    main()

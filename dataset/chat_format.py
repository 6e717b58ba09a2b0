"""The chat format in Python: a conversation -> token ids, and which of them supervised fine-tuning learns.

The format is ChatML as model/tokenizer/chat_template.jinja writes it (Qwen3's layout, upstream MiniMind's too):

    <|im_start|>system\\n{system}\\n\\n# Tools ...{tool schemas}...<|im_end|>\\n     (when the record lists tools)
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n{reasoning_content}\\n</think>\\n\\n{content}
        \\n<tool_call>\\n{call}\\n</tool_call><|im_end|>\\n                   (each call on a new line)
    <|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response><|im_end|>\\n   (consecutive results: one turn)

build_assistant_labels builds it message by message, as nanochat's render_conversation does, each piece with
whether the model learns it, so the rule of the loss mask reads here:

    system, user and tool turns            read, not learned
    <|im_start|>assistant\\n                read: the prompt ends with it (render_prompt), the model never writes it
    the reply: <think> block, content,     learned, in every assistant turn (earlier turns too: Qwen3's own
      <tool_call> blocks                   template keeps reasoning only after the last user message)
    the reply's closing <|im_end|>         learned: it is how the model learns to stop
    the \\n after <|im_end|>                read: layout between turns

Message text is data, never structure. The control tokens (the tokenizer's special tokens <|im_start|>, <|im_end|>,
<|endoftext|>) come only from this file: typed inside any message they are ordinary text, so a user message holding
"<|im_start|>system" cannot open a system turn. The other added tokens (<think>, </think>, <tool_call>, </tool_call>,
<tool_response>, </tool_response>) are ordinary text in what the model reads (system, user and tool messages, tool
schemas), and tokens in what it writes (the assistant's reasoning, content and tool calls): a reply whose content
spells out "<think>...</think>" (upstream MiniMind's reasoning data does) trains the same tokens as one with
reasoning_content, the tokens the model writes when it thinks.

The Jinja template stays for Hugging Face users (apply_chat_template with return_assistant_tokens_mask);
tests/test_chat_format.py checks that both give the same ids and labels on every shipped conversation. They differ
only where the template cannot do what is done here: control strings inside message text (the template turns them
into control tokens), and a reply that opens with a space followed by more whitespace, which the template's
tokenizer may merge with the header's newline into one token; here the reply is tokenized apart from its header,
as it is at inference, where the prompt ends with that header.
"""

import json

from model.model_minimind import IGNORE_INDEX  # label of positions that carry no loss

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
# The system turn's tool instructions (Qwen3's), around the JSON schemas; the part after them spells out the
# <tool_call> format with the tokens themselves, so it is encoded with its added tokens recognized.
TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_OUTRO = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
TOOLS_CALL_FORMAT = (f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n{TOOL_CALL_OPEN}\n"
                     f'{{"name": <function-name>, "arguments": <args-json-object>}}\n{TOOL_CALL_CLOSE}')


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as ordinary text, every added token in it spelled out ("<|im_start|>" -> "<", "|", ...).

    The tokenizer's own pipeline (normalizer, pre-tokenizer, BPE) without its added-token pass, so the ids are
    those of the same text written without special meaning. (`split_special_tokens=True` would still turn
    "<think>" into its token: it spells out special tokens only.)
    """
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    words = [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    return [token.id for word in words for token in backend.model.tokenize(word)]


def token_id(tokenizer, token: str) -> int:
    """The id of one of the chat format's tokens. Raises ValueError for a tokenizer without it."""
    id_ = tokenizer.convert_tokens_to_ids(token)
    if id_ is None or id_ == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token; the chat format needs the tokenizer of "
                         "trainer/train_tokenizer.py (model/tokenizer)")
    return id_


def turn_ids(tokenizer, role: str, text: str) -> list[int]:
    """<|im_start|>{role}\\n{text}<|im_end|>\\n, `text` as ordinary text (encoded with the header as one string, as
    the template's tokenizer sees it)."""
    return ([token_id(tokenizer, IM_START)] + text_ids(tokenizer, role + "\n" + text)
            + [token_id(tokenizer, IM_END)] + text_ids(tokenizer, "\n"))


def tools_system_turn_ids(tokenizer, system: str | None, tools: list[dict]) -> list[int]:
    """The system turn that lists the tools: the system message (if any), the instructions, one JSON schema per
    line (json.dumps as the template's tojson writes it), and the <tool_call> format."""
    text = (f"system\n{system}\n\n" if system is not None else "system\n") + TOOLS_INTRO
    text += "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools) + TOOLS_OUTRO
    return ([token_id(tokenizer, IM_START)] + text_ids(tokenizer, text)
            + tokenizer(TOOLS_CALL_FORMAT, add_special_tokens=False)["input_ids"]
            + [token_id(tokenizer, IM_END)] + text_ids(tokenizer, "\n"))


def assistant_header_ids(tokenizer) -> list[int]:
    """<|im_start|>assistant\\n: the opening of a reply, read, not written, by the model."""
    return [token_id(tokenizer, IM_START)] + text_ids(tokenizer, "assistant\n")


def tool_result_ids(tokenizer, result: str, opens: bool, closes: bool) -> list[int]:
    """One tool result as a <tool_response> block of a user turn: consecutive results share one turn, which the
    first opens (<|im_start|>user) and the last closes (<|im_end|>\\n)."""
    ids = ([token_id(tokenizer, IM_START)] + text_ids(tokenizer, "user\n")) if opens else text_ids(tokenizer, "\n")
    ids += ([token_id(tokenizer, TOOL_RESPONSE_OPEN)] + text_ids(tokenizer, "\n" + result + "\n")
            + [token_id(tokenizer, TOOL_RESPONSE_CLOSE)])
    if closes:
        ids += [token_id(tokenizer, IM_END)] + text_ids(tokenizer, "\n")
    return ids


def tool_call_text(call: dict) -> str:
    """<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call> for a call {"name", "arguments"} (a JSON object,
    or a string kept as it is), bare or wrapped as OpenAI's {"function": {...}}."""
    call = call.get("function") or call
    arguments = call["arguments"]
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}\n{{"name": "{call["name"]}", "arguments": {arguments}}}\n{TOOL_CALL_CLOSE}'


def reply_ids(tokenizer, message: dict) -> list[int]:
    """Token ids of what the assistant writes in `message`, every one of them learned.

    The <think> block of its reasoning_content (outer newlines stripped), its content, its tool calls (on a new
    line after the content, one per line), and the closing <|im_end|>. Encoded as one string with
    split_special_tokens=True: the control tokens are spelled out, <think> and <tool_call> are tokens.
    """
    text = ""
    if message.get("reasoning_content"):
        reasoning = message["reasoning_content"].strip("\n")
        text += f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n"
    content = message.get("content") or ""
    calls = [tool_call_text(call) for call in message.get("tool_calls") or []]
    text += content + ("\n" if content and calls else "") + "\n".join(calls)
    return (tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            + [token_id(tokenizer, IM_END)])


def conversation_pieces(tokenizer, messages: list[dict],
                        tools: list[dict] | None = None) -> list[tuple[list[int], bool]]:
    """The conversation as pieces (token ids, learned), in order; see the module docstring for the layout.

    Args:
        messages: [{"role": "system" (first only) | "user" | "assistant" | "tool", "content": str, ...}]; an
            assistant message may hold "reasoning_content" and "tool_calls" (dataset/lm_dataset.py checks records).
        tools: JSON schemas of the functions the assistant may call, listed in the system turn.
    Raises:
        ValueError for a role the format has no turn for, or a system message that is not the first.
    """
    pieces = []

    def add(ids: list[int], learned: bool = False) -> None:
        pieces.append((ids, learned))

    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    if tools:
        add(tools_system_turn_ids(tokenizer, system, tools))
    elif system is not None:
        add(turn_ids(tokenizer, "system", system))
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "user":
            add(turn_ids(tokenizer, "user", message["content"]))
        elif role == "assistant":
            add(assistant_header_ids(tokenizer))
            add(reply_ids(tokenizer, message), learned=True)
            add(text_ids(tokenizer, "\n"))
        elif role == "tool":
            opens = i == 0 or messages[i - 1]["role"] != "tool"
            closes = i + 1 == len(messages) or messages[i + 1]["role"] != "tool"
            add(tool_result_ids(tokenizer, message["content"], opens, closes))
        elif not (role == "system" and i == 0):
            raise ValueError(f"a {role} message at position {i}: expected system (first only), user, assistant "
                             "or tool")
    return pieces


def build_assistant_labels(tokenizer, messages: list[dict],
                           tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its SFT labels: the ids where the assistant writes, IGNORE_INDEX elsewhere.

        labels[t] = input_ids[t]   if token t is written by the assistant (its reply and closing <|im_end|>)
                    -100           otherwise (system, user, tool messages, the role headers)

    The model shifts the labels, so the loss at position t is on token t + 1 and counts only assistant tokens.

    Returns:
        (input_ids, labels), two lists of equal length; what model/tokenizer/chat_template.jinja gives with
        return_assistant_tokens_mask, save for the differences the module docstring names.
    Raises:
        ValueError as conversation_pieces.
    """
    input_ids, labels = [], []
    for ids, learned in conversation_pieces(tokenizer, messages, tools):
        input_ids += ids
        labels += ids if learned else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids the model reads before it writes the next reply: the conversation, then <|im_start|>assistant\\n
    (the template's add_generation_prompt). Raises ValueError as conversation_pieces."""
    ids = [id_ for piece, _ in conversation_pieces(tokenizer, messages, tools) for id_ in piece]
    return ids + assistant_header_ids(tokenizer)

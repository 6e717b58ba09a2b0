"""Reasoning (`reasoning_content`) and tool calling in supervised fine-tuning, against upstream MiniMind's format.

Upstream MiniMind (jingyaogong/minimind, model/chat_template.jinja) renders an assistant reply as

    <|im_start|>assistant\\n<think>\\n{reasoning without outer newlines}\\n</think>\\n\\n{content}{calls}<|im_end|>\\n

with each tool call as <tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call> (joined by newlines, after the
content), consecutive tool results in one user turn of <tool_response> blocks, and the tool schemas in the system
turn. `upstream_render` below writes that format out by hand; SFTDataset (dataset/lm_dataset.py) must give exactly
these tokens, with labels on what the assistant writes: reasoning, content, tool calls and <|im_end|>. (Upstream also
renders an empty <think> block in replies without reasoning and mostly strips it again before training; the
shipped template renders none.)
"""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_model, write_jsonl
from dataset.lm_dataset import IGNORE_INDEX, DataFormatError, SFTDataset
from model.model_minimind import MiniMindForCausalLM
from trainer import train_full_sft
from trainer.checkpoint import save_weights
from trainer.rewards import final_answer, think_format

REPO = Path(__file__).resolve().parents[1]

TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic",
                                           "parameters": {"type": "object",
                                                          "properties": {"expression": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are a careful math tutor."},
    {"role": "user", "content": "What is 17 * 24?"},
    {"role": "assistant", "content": "", "reasoning_content": "\nI should not guess; use the calculator.\n",
     "tool_calls": [{"name": "calculator", "arguments": {"expression": "17 * 24"}}]},
    {"role": "tool", "content": "408"},
    {"role": "assistant", "content": "17 * 24 = 408.", "reasoning_content": "The tool says 408."},
    {"role": "user", "content": "And half of it?"},
    {"role": "assistant", "content": "204.", "reasoning_content": "408 / 2 = 204."},
]


def upstream_reply(message: dict) -> str:
    """What the assistant writes in upstream MiniMind's format, <|im_end|> included."""
    text = ""
    if message.get("reasoning_content"):
        text += "<think>\n" + message["reasoning_content"].strip("\n") + "\n</think>\n\n"
    text += message["content"]
    calls = [json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)
             for call in message.get("tool_calls", [])]
    if calls and message["content"]:
        text += "\n"  # tool calls follow the content on a new line
    return text + "\n".join(f"<tool_call>\n{call}\n</tool_call>" for call in calls) + "<|im_end|>"


def upstream_render(messages: list[dict], tools: list[dict]) -> str:
    """The whole conversation in upstream MiniMind's format (tool schemas in the system turn)."""
    text = ("<|im_start|>system\n" + messages[0]["content"] + "\n\n# Tools\n\nYou may call one or more functions to "
            "assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML "
            "tags:\n<tools>" + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools) +
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call><|im_end|>\n")
    for i, message in enumerate(messages[1:], start=1):
        if message["role"] == "user":
            text += f"<|im_start|>user\n{message['content']}<|im_end|>\n"
        elif message["role"] == "assistant":
            text += "<|im_start|>assistant\n" + upstream_reply(message) + "\n"
        else:  # tool results: consecutive ones share one user turn
            if messages[i - 1]["role"] != "tool":
                text += "<|im_start|>user"
            text += f"\n<tool_response>\n{message['content']}\n</tool_response>"
            if i + 1 == len(messages) or messages[i + 1]["role"] != "tool":
                text += "<|im_end|>\n"
    return text


def labelled_runs(tokenizer, item: dict) -> list[str]:
    """The decoded runs of consecutive labelled tokens of an SFT item."""
    runs, previous = [], False
    for token_id, label in zip(item["input_ids"].tolist(), item["labels"].tolist()):
        keep = label != IGNORE_INDEX
        if keep and not previous:
            runs.append([])
        if keep:
            runs[-1].append(token_id)
        previous = keep
    return [tokenizer.decode(run) for run in runs]


def sft_file(tmp_path: Path, records: list[dict], name: str = "sft.jsonl") -> Path:
    return write_jsonl(tmp_path / name, records)


def test_reasoning_and_tool_calls_render_as_upstream_minimind(tokenizer, tmp_path):
    dataset = SFTDataset(sft_file(tmp_path, [{"conversations": CONVERSATION, "tools": TOOLS}]), tokenizer, 1024)
    assert tokenizer.decode(dataset[0]["input_ids"]) == upstream_render(CONVERSATION, TOOLS)


def test_labels_cover_reasoning_content_and_tool_calls_of_every_reply(tokenizer, tmp_path):
    dataset = SFTDataset(sft_file(tmp_path, [{"conversations": CONVERSATION, "tools": TOOLS}]), tokenizer, 1024)
    replies = [upstream_reply(m) for m in CONVERSATION if m["role"] == "assistant"]
    assert labelled_runs(tokenizer, dataset[0]) == replies  # every turn's reasoning is kept and learned
    # nothing else is learned: the tool schemas, the tool result and the user turns carry no label
    unlabelled = tokenizer.decode(dataset[0]["input_ids"][dataset[0]["labels"] == IGNORE_INDEX])
    assert '"name": "calculator", "description"' in unlabelled and "<tool_response>\n408" in unlabelled


def test_the_format_grpo_rewards_is_the_one_sft_teaches(tokenizer):
    """A reply rendered from reasoning_content gets think_format 1, and its answer is read after </think>."""
    messages = [{"role": "user", "content": "Question: 3 apples and 4 more?\nAnswer:"},
                {"role": "assistant", "content": "7", "reasoning_content": "3 + 4 = 7, not 8."}]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    reply = tokenizer.apply_chat_template(messages, tokenize=False).removeprefix(prompt)
    completion = reply.removesuffix("<|im_end|>\n")  # the end of turn is not part of the completion text
    assert think_format([prompt], [completion]) == [1.0]
    assert final_answer(completion) == "7"


def test_sft_on_reasoning_data_makes_the_model_think_first(tokenizer, tmp_path):
    """Fine-tuned on replies with reasoning_content, a tiny model answers with <think> ... </think> and the answer."""
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]
    save_weights(tiny_model(len(tokenizer)), tokenizer, tmp_path / "out" / "pretrain_64")
    data = sft_file(tmp_path, [{"conversations": messages}] * 8)
    summary = train_full_sft.main(["--data_path", str(data), "--eval_data_path", "", "--save_dir",
                                   str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "checkpoints"),
                                   "--hidden_size", "64",
                                   "--device", "cpu", "--dtype", "float32", "--batch_size", "8", "--epochs", "40",
                                   "--learning_rate", "1e-2", "--warmup_steps", "2"])
    trained = MiniMindForCausalLM.from_pretrained(summary["weights_dir"]).eval()
    prompt = tokenizer.apply_chat_template(messages[:1], return_tensors="pt", add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    output = trained.generate(input_ids=prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1]:]
    completion = tokenizer.decode(output, skip_special_tokens=True)
    assert completion == "<think>\ntwo and two\n</think>\n\n4"
    assert think_format([""], [completion]) == [1.0]


def test_upstream_layout_tools_on_the_system_message_and_json_strings(tokenizer, tmp_path):
    """Upstream MiniMind's files put the tool schemas on the system message and may store "tools" and "tool_calls"
    as JSON strings: such a record gives the same tokens and labels as the same conversation in our layout."""
    upstream = [dict(message) for message in CONVERSATION]
    upstream[0]["tools"] = json.dumps(TOOLS)
    upstream[2]["tool_calls"] = json.dumps(upstream[2]["tool_calls"])
    ours = SFTDataset(sft_file(tmp_path, [{"conversations": CONVERSATION, "tools": TOOLS}], "ours.jsonl"),
                      tokenizer, 1024)[0]
    theirs = SFTDataset(sft_file(tmp_path, [{"conversations": upstream}], "upstream.jsonl"), tokenizer, 1024)[0]
    assert torch.equal(theirs["input_ids"], ours["input_ids"]) and torch.equal(theirs["labels"], ours["labels"])


@pytest.mark.parametrize("change, message", [
    ({2: {"tool_calls": "[{not json"}}, "conversations[2].tool_calls: invalid JSON string"),
    ({0: {"tools": "[]"}}, '"tools" on the system message and on the record'),
])
def test_bad_upstream_fields_name_file_and_line(tokenizer, tmp_path, change, message):
    messages = [{**m, **change.get(i, {})} for i, m in enumerate(CONVERSATION)]
    path = sft_file(tmp_path, [{"conversations": CONVERSATION}, {"conversations": messages, "tools": TOOLS}])
    with pytest.raises(DataFormatError, match=f"^{re.escape(str(path))}:2: .*{re.escape(message)}"):
        SFTDataset(path, tokenizer, 1024)

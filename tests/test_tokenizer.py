"""The shipped tokenizer (model/tokenizer) and the script that trains it (trainer/train_tokenizer.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                  "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@pytest.mark.parametrize("text", [
    "once upon a time, there was a little cat named tom.",
    "Hello, World!\n\n\tIndented  double  spaces, trailing space ",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "🙂👍🏽 🌟 emoji and a ZWJ family 👨‍👩‍👧",
    "Mixed 中英 text: 3.14159, naïve café, Привет, <b>html</b>",
])
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_control_token_ids_are_fixed(tokenizer):
    assert len(tokenizer) == 6400
    assert tokenizer.convert_ids_to_tokens(list(range(9))) == CONTROL_TOKENS
    for token_id, token in enumerate(CONTROL_TOKENS):
        assert tokenizer.encode(token) == [token_id]  # one token, never split into bytes
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token) == (0, 2, None)
    assert tokenizer.encode("hello world") == tokenizer("hello world")["input_ids"]  # nothing added


def test_skip_special_tokens_keeps_think_and_tool_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\n<tool_call>{}</tool_call><|im_end|>")
    expected = "assistant\n<think>\nhm\n</think>\n\n<tool_call>{}</tool_call>"  # only ids 0-2 are skipped
    assert tokenizer.decode(ids, skip_special_tokens=True) == expected


def test_chat_template_system_user_assistant(tokenizer):
    messages = [{"role": "system", "content": "You are MiniMind."},
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello, how can I help?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are MiniMind.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello, how can I help?<|im_end|>\n")


def test_chat_template_generation_prompt(tokenizer):
    messages = [{"role": "user", "content": "你好"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\n你好<|im_end|>\n"


def test_chat_template_reasoning_content(tokenizer):
    messages = [{"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "2", "reasoning_content": "\nOne plus one is two.\n"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nOne plus one is two.\n</think>\n\n2<|im_end|>\n")


def test_chat_template_tools_and_tool_calls(tokenizer):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [  # OpenAI style with arguments as an object, and bare with a JSON string
                     {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                     {"name": "get_weather", "arguments": '{"city": "Rome"}'}]},
                {"role": "tool", "content": "18C"},
                {"role": "tool", "content": "25C"},
                {"role": "assistant", "content": "Paris 18C, Rome 25C."}]
    assert tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False) == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(tool, ensure_ascii=False) +
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n25C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nParis 18C, Rome 25C.<|im_end|>\n")


def test_assistant_mask_covers_each_reply_and_its_im_end(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "再见"}, {"role": "assistant", "content": "再见！"}]
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    runs, previous = [], 0  # decoded runs of consecutive masked tokens
    for token_id, keep in zip(encoded["input_ids"], encoded["assistant_masks"]):
        if keep and not previous:
            runs.append([])
        if keep:
            runs[-1].append(token_id)
        previous = keep
    assert [tokenizer.decode(run) for run in runs] == ["Hello<|im_end|>", "再见！<|im_end|>"]


def test_chat_template_rejects_a_late_system_message(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(TemplateError, match="position 1"):
        tokenizer.apply_chat_template(messages, tokenize=False)


def run_train_tokenizer(*args, cwd):
    return subprocess.run([sys.executable, str(REPO_ROOT / "trainer" / "train_tokenizer.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_train_tokenizer_cli_trains_a_loadable_tokenizer(tmp_path):
    pretrain, sft = tmp_path / "pretrain.jsonl", tmp_path / "sft.jsonl"
    pretrain.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}. 小猫坐在垫子上。"}) + "\n"
                                for i in range(50)), encoding="utf-8")
    sft.write_text(json.dumps({"conversations": [{"role": "user", "content": "Where is the cat?"},
                                                 {"role": "assistant", "content": "On the mat."}]}) + "\n")
    save_dir = tmp_path / "tok"
    result = run_train_tokenizer("--data_path", f"{pretrain},{sft}", "--vocab_size", "300",
                                 "--save_dir", str(save_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "vocab size 300" in result.stderr

    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    assert len(tokenizer) == 300
    assert tokenizer.convert_ids_to_tokens(list(range(9))) == CONTROL_TOKENS
    text = "the cat sat on the mat. 小猫🙂"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("the cat sat on mat")) < len("the cat sat on mat".encode())  # merges learned
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n")


def test_train_tokenizer_defaults_to_out_not_the_shipped_tokenizer(tmp_path):
    result = run_train_tokenizer("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(default: out/tokenizer;" in " ".join(result.stdout.split())


def test_train_tokenizer_cli_reports_a_bad_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 3}\n')
    result = run_train_tokenizer("--data_path", str(data), "--vocab_size", "300",
                                 "--save_dir", str(tmp_path / "tok"), cwd=tmp_path)
    assert result.returncode != 0
    assert f"{data}:2:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "tok").exists()

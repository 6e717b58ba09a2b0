"""scripts/generation.py (the reply generation chat.py, web_demo.py and the server share) and scripts/chat.py,
checked against transformers' own `generate` and the shipped chat template."""

import json

import pytest
import torch

from model.loading import load_checkpoint
from scripts import chat
from scripts.generation import ReplyStream, parse_tool_calls, prompt_ids, safe_prefix, split_reasoning
from serving_helpers import greedy_ids, random_checkpoint, scripted_checkpoint, shipped_tokenizer

GREETING = [{"role": "user", "content": "Hi"}]
# 龘 is several byte-level tokens: the stream must not show half a character
THINKING_REPLY = "<think>\nA greeting; 龘 answer kindly.\n</think>\n\nHello there!<|im_end|>"


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return load_checkpoint(random_checkpoint(tmp_path_factory.mktemp("random")), "cpu")


@pytest.fixture(scope="module")
def thinking_checkpoint(tmp_path_factory):
    """A model that answers GREETING with THINKING_REPLY (memorized)."""
    return scripted_checkpoint(tmp_path_factory.mktemp("thinking"),
                               [(prompt_ids(shipped_tokenizer(), GREETING), THINKING_REPLY)])


def collect(reply: ReplyStream) -> tuple[str, str]:
    pieces = list(reply)
    return "".join(r for r, _ in pieces), "".join(c for _, c in pieces)


def test_split_reasoning_by_hand():
    assert split_reasoning("<think>\nstep 1\nstep 2\n</think>\n\nThe answer.") == ("step 1\nstep 2", "The answer.")
    assert split_reasoning("<think>\nstill thinking\n") == ("still thinking", "")
    assert split_reasoning("No reasoning <think> here.") == ("", "No reasoning <think> here.")


def test_tool_calls_rendered_by_the_chat_template_parse_back():
    tokenizer = shipped_tokenizer()
    calls = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}, {"name": "now", "arguments": {}}]
    message = {"role": "assistant", "content": "Let me check.",
               "tool_calls": [{"type": "function", "function": call} for call in calls]}
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, message], tokenize=False)
    answer = rendered.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    content, parsed = parse_tool_calls(answer)
    assert content == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in parsed] == [(c["name"], c["arguments"]) for c in calls]
    broken = 'Hi<tool_call>\n{"name": "f", "arguments": {\n</tool_call>'
    assert parse_tool_calls(broken) == (broken, [])  # a malformed call is text


def test_safe_prefix_holds_back_what_may_become_a_marker():
    assert safe_prefix("Hello wor", ["world"]) == (6, False)
    assert safe_prefix("Hello world!", ["world", "lo"]) == (3, True)
    assert safe_prefix("Hello", ["x"]) == (5, False)


def test_greedy_reply_is_transformers_generate(random_model):
    model, tokenizer = random_model
    prompt = prompt_ids(tokenizer, GREETING)
    assert prompt == tokenizer.apply_chat_template(GREETING, add_generation_prompt=True, return_dict=False)
    reply = ReplyStream(model, tokenizer, prompt, max_new_tokens=40)
    reasoning, content = collect(reply)
    reference = greedy_ids(model, tokenizer, prompt, 40)
    assert reply.token_ids == reference
    assert (reasoning, content) == ("", tokenizer.decode(reference, skip_special_tokens=True)) == ("", reply.content)
    assert reply.finish_reason == ("stop" if reference[-1] in (0, 2) else "length")


def test_sampling_with_a_seed_is_transformers_generate_with_that_seed(random_model):
    model, tokenizer = random_model
    prompt = prompt_ids(tokenizer, GREETING)
    reply = ReplyStream(model, tokenizer, prompt, max_new_tokens=30, temperature=0.8, top_p=0.9, seed=7).complete()
    torch.manual_seed(7)
    reference = model.generate(torch.tensor([prompt]), do_sample=True, temperature=0.8, top_p=0.9, top_k=0,
                               max_new_tokens=30, eos_token_id=[2, 0], pad_token_id=0)[0, len(prompt):].tolist()
    assert reply.token_ids == reference
    assert reply.token_ids != greedy_ids(model, tokenizer, prompt, 30)


def test_stop_string_ends_the_reply_where_it_first_appears(random_model):
    model, tokenizer = random_model
    prompt = prompt_ids(tokenizer, GREETING)
    full = ReplyStream(model, tokenizer, prompt, max_new_tokens=40).complete().content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    reply = ReplyStream(model, tokenizer, prompt, max_new_tokens=40, stop=[stop])
    assert collect(reply)[1] == reply.content == full[:full.index(stop)]
    assert reply.finish_reason == "stop" and len(reply.token_ids) < 40


def test_reasoning_streams_apart_from_the_answer(thinking_checkpoint):
    model, tokenizer = load_checkpoint(thinking_checkpoint, "cpu")
    reply = ReplyStream(model, tokenizer, prompt_ids(tokenizer, GREETING), max_new_tokens=60)
    pieces = list(reply)
    assert "".join(r for r, _ in pieces) == reply.reasoning == "A greeting; 龘 answer kindly."
    assert "".join(c for _, c in pieces) == reply.content == "Hello there!"
    assert not any("\ufffd" in r + c for r, c in pieces)  # the 3-byte character came out whole
    assert reply.finish_reason == "stop" and reply.token_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("show_thinking", [0, 1])
def test_chat_hides_the_reasoning_unless_asked(thinking_checkpoint, capsys, show_thinking):
    chat.main(["--model_path", str(thinking_checkpoint), "--prompt", "Hi", "--temperature", "0",
               "--repetition_penalty", "1", "--device", "cpu", "--show_thinking", str(show_thinking)])
    out = capsys.readouterr().out
    thinking = "<think>\nA greeting; 龘 answer kindly.\n</think>\n\n" if show_thinking else ""
    assert out == f"user: Hi\nassistant: {thinking}Hello there!\n"

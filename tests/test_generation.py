"""scripts/generation.py (the reply generation chat.py, web_demo.py and the server share) and scripts/chat.py,
checked against transformers' own `generate` and the shipped chat template."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from model.loading import load_checkpoint
from scripts import chat, serve_openai_api, web_demo
from scripts.convert_model import export_hf
from scripts.generation import (ReplyStream, generation_config, parse_tool_calls, prompt_ids, safe_prefix,
                                split_reasoning)
from serving_helpers import greedy_ids, post, random_checkpoint, scripted_checkpoint, serve_in_thread, shipped_tokenizer

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


# ----------------------------------------------------------------------------------------------------------------
# One generation configuration: greedy is greedy in chat, the server and stock transformers

def test_greedy_is_one_reply_in_chat_the_server_and_stock_transformers(tmp_path, capsys):
    directory = random_checkpoint(tmp_path / "tiny_random")
    # float32: in bfloat16 the same computation in another order rounds differently and near-ties flip
    model, tokenizer = load_checkpoint(directory, "cpu", dtype="float32")
    messages, new_tokens = GREETING, 24
    prompt = prompt_ids(tokenizer, messages)
    # the reference: the exported Qwen3 in plain transformers, greedy
    stock = AutoModelForCausalLM.from_pretrained(export_hf(directory, tmp_path / "hf"), dtype=torch.float32)
    ids = stock.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens, eos_token_id=[2, 0],
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert len(set(ids)) > 8 and not set(ids) & {3, 4, 5, 6}, "pick another prompt: a repetitive or <think> reply"
    expected = tokenizer.decode(ids, skip_special_tokens=True)

    chat.main(["--model_path", str(directory), "--prompt", "Hi", "--temperature", "0", "--max_new_tokens",
               str(new_tokens), "--device", "cpu", "--dtype", "float32"])
    assert capsys.readouterr().out.endswith(f"user: Hi\nassistant: {expected}\n")  # after any import warning
    url, server, thread = serve_in_thread(serve_openai_api.create_app(model, tokenizer, "tiny_random", new_tokens))
    try:
        status, body = post(f"{url}/chat/completions", json.dumps(
            {"model": "tiny_random", "messages": messages, "temperature": 0}).encode())
    finally:
        server.should_exit = True
        thread.join()
    assert status == 200 and body["choices"][0]["message"]["content"] == expected
    # chat's former default, a 1.1 repetition penalty at temperature 0, gives another reply: the test can tell
    assert ReplyStream(model, tokenizer, prompt, max_new_tokens=new_tokens, repetition_penalty=1.1).complete(
    ).content != expected


def test_temperature_0_is_plain_greedy_and_the_penalty_is_off_by_default_everywhere():
    greedy = generation_config(temperature=0, top_p=0.85, max_new_tokens=8)
    assert (greedy.do_sample, greedy.repetition_penalty, greedy.max_new_tokens) == (False, 1.0, 8)
    sampling = generation_config(temperature=0.7, top_p=0.9)
    assert (sampling.do_sample, sampling.temperature, sampling.top_p, sampling.top_k) == (True, 0.7, 0.9, 0)
    defaults = [chat.parse_args([]).repetition_penalty, web_demo.parse_args([]).repetition_penalty,
                serve_openai_api.ChatCompletionRequest(model="m", messages=[GREETING[0]]).repetition_penalty]
    assert defaults == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------------------------------------------
# Upstream MiniMind's flag names: --load_from, --weight / --lora_weight under --save_dir

FRONT_ENDS = pytest.mark.parametrize("front_end", [chat, serve_openai_api, web_demo], ids=lambda m: m.__name__)


def checkpoint_dirs(save_dir, *names, marker="config.json"):
    for name in names:
        (save_dir / name).mkdir(parents=True)
        (save_dir / name / marker).write_text("{}")


@FRONT_ENDS
def test_upstream_flag_names_open_the_same_checkpoints(front_end, tmp_path):
    checkpoint_dirs(tmp_path, "full_sft_512", "dpo_512_moe")
    checkpoint_dirs(tmp_path, "lora_identity_512", marker="adapter_config.json")
    parse = front_end.parse_args
    assert parse(["--load_from", str(tmp_path / "dpo_512_moe")]).model_path == str(tmp_path / "dpo_512_moe")
    by_name = parse(["--save_dir", str(tmp_path), "--weight", "dpo", "--hidden_size", "512", "--use_moe", "1"])
    assert (by_name.model_path, by_name.base_model_path) == (str(tmp_path / "dpo_512_moe"), None)
    lora = parse(["--save_dir", str(tmp_path), "--hidden_size", "512", "--weight", "full_sft",
                  "--lora_weight", "lora_identity"])
    assert lora.model_path == str(tmp_path / "lora_identity_512")
    assert lora.base_model_path == str(tmp_path / "full_sft_512")
    alone = parse(["--save_dir", str(tmp_path), "--hidden_size", "512", "--lora_weight", "lora_identity"])
    assert alone.base_model_path is None  # the base the adapter names in its adapter_config.json
    assert parse(["--lora_weight", "None", "--model_path", "x"]).model_path == "x"  # upstream's "no adapter"


@FRONT_ENDS
def test_help_shows_both_names_of_a_flag(front_end, capsys):
    with pytest.raises(SystemExit):
        front_end.parse_args(["--help"])
    assert "--model_path MODEL_PATH, --load_from MODEL_PATH" in capsys.readouterr().out


def test_a_weight_not_in_save_dir_is_one_sentence_naming_what_is_there(tmp_path):
    checkpoint_dirs(tmp_path, "full_sft_512")
    with pytest.raises(SystemExit, match=r"--weight full_sft: no checkpoint at .*full_sft_256 .*holds full_sft_512"):
        chat.parse_args(["--save_dir", str(tmp_path), "--weight", "full_sft"])
    with pytest.raises(SystemExit, match="name two checkpoints"):
        chat.parse_args(["--model_path", str(tmp_path / "full_sft_512"), "--weight", "full_sft"])

"""scripts/serve_openai_api.py through the official `openai` client: the server runs as a real process on a
free localhost port, and its answers are checked against transformers' greedy `generate` on the same checkpoint.
Reasoning and tool calls come from a small model trained to produce them (serving_helpers.scripted_checkpoint)."""

import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from model.loading import load_checkpoint
from scripts.generation import prompt_ids
from scripts.serve_openai_api import create_app
from serving_helpers import (REPO, assert_help_and_install_line_without_serve_extra, free_port, greedy_ids, post,
                             post_chunked, random_checkpoint, scripted_checkpoint, serve_in_thread, shipped_tokenizer,
                             start_server, stop_server)

CAP = 24  # the server's --max_tokens_cap
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
WEATHER = [{"role": "user", "content": "Weather in Paris?"}]
TOOL_REPLY = ('<think>\nThe user wants the weather: call the tool.\n</think>\n\nLet me check.\n<tool_call>\n'
              '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
GREETING = [{"role": "user", "content": "Hi"}]
THINKING_REPLY = "<think>\nA greeting: answer kindly.\n</think>\n\nHello there!<|im_end|>"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base_url, model, tokenizer, served name) of the server process on a random tiny checkpoint."""
    directory = random_checkpoint(tmp_path_factory.mktemp("served") / "tiny_random")
    port = free_port()
    process = start_server([sys.executable, str(REPO / "scripts" / "serve_openai_api.py"), "--model_path",
                            str(directory), "--port", str(port), "--device", "cpu", "--max_tokens_cap", str(CAP)],
                           f"http://127.0.0.1:{port}/v1/models", directory.parent / "server.log")
    model, tokenizer = load_checkpoint(directory, "cpu")
    yield f"http://127.0.0.1:{port}/v1", model, tokenizer, "tiny_random"
    stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def scripted_clients(tmp_path_factory):
    """OpenAI clients of two servers of a model that answers WEATHER (with TOOLS) with TOOL_REPLY and GREETING
    with THINKING_REPLY: one returning reasoning_content, one started as with --show_thinking 0."""
    tokenizer = shipped_tokenizer()
    directory = scripted_checkpoint(tmp_path_factory.mktemp("scripted"), [
        (prompt_ids(tokenizer, WEATHER, TOOLS), TOOL_REPLY), (prompt_ids(tokenizer, GREETING), THINKING_REPLY)])
    model, tokenizer = load_checkpoint(directory, "cpu")
    servers = [serve_in_thread(create_app(model, tokenizer, "scripted", 128, show_thinking=show))
               for show in (True, False)]
    yield [openai.OpenAI(base_url=url, api_key="unused", max_retries=0) for url, _, _ in servers]
    for _, server, thread in servers:
        server.should_exit = True
        thread.join()


def reference(server, messages: list[dict], max_tokens: int) -> tuple[str, int, list[int]]:
    """(text, prompt token count, token ids) of transformers' greedy generate on the served checkpoint."""
    _, model, tokenizer, _ = server
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    ids = greedy_ids(model, tokenizer, prompt, max_tokens)
    assert not set(ids) & {3, 4, 5, 6}, "pick another prompt: this reply has <think> or <tool_call> tokens"
    return tokenizer.decode(ids, skip_special_tokens=True), len(prompt), ids


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == ["tiny_random"]


def test_completion_is_greedy_generate_and_usage_counts_its_tokens(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    text, prompt_tokens, ids = reference(server, messages, 16)
    completion = client.chat.completions.create(model="tiny_random", messages=messages, temperature=0, max_tokens=16)
    assert completion.choices[0].message.content == text
    assert completion.choices[0].finish_reason == ("stop" if ids[-1] in (0, 2) else "length")
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        prompt_tokens, len(ids), prompt_tokens + len(ids))


def test_streamed_completion_is_greedy_generate(server, client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    text, prompt_tokens, ids = reference(server, messages, 20)
    chunks = list(client.chat.completions.create(model="tiny_random", messages=messages, temperature=0,
                                                 max_tokens=20, stream=True, stream_options={"include_usage": True}))
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == text
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] in ("stop", "length")
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, len(ids))


def test_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": "tiny_random", "messages": GREETING, "max_tokens": 3, "stream": True}
    request = urllib.request.Request(f"{server[0]}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(json.loads(event.removeprefix("data: "))["object"] == "chat.completion.chunk" for event in events[:-2])


def test_max_tokens_is_capped(server, client):
    text, _, ids = reference(server, GREETING, CAP)
    completion = client.chat.completions.create(model="tiny_random", messages=GREETING, temperature=0,
                                                max_tokens=10 * CAP)
    assert completion.usage.completion_tokens == len(ids) <= CAP
    assert completion.choices[0].message.content == text


def test_stop_string_cuts_the_reply(server, client):
    text, _, _ = reference(server, GREETING, 16)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    completion = client.chat.completions.create(model="tiny_random", messages=GREETING, temperature=0,
                                                max_tokens=16, stop=[stop])
    assert completion.choices[0].message.content == text[:text.index(stop)]
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, status", [
    ({"model": "tiny_random"}, 400),                                                          # no messages
    ({"model": "tiny_random", "messages": "Hi"}, 400),                                        # not a list
    ({"model": "tiny_random", "messages": []}, 400),
    ({"model": "tiny_random", "messages": [{"role": "user"}]}, 400),                          # no content
    ({"model": "tiny_random", "messages": [{"role": "robot", "content": "Hi"}]}, 400),
    ({"model": "tiny_random", "messages": [{"content": "Hi"}]}, 400),                         # no role
    ({"model": "tiny_random", "messages": GREETING + [{"role": "system", "content": "late"}]}, 400),
    ({"model": "tiny_random", "messages": GREETING, "temperature": -1}, 400),
    ({"model": "tiny_random", "messages": GREETING, "temperature": "hot"}, 400),
    ({"model": "tiny_random", "messages": GREETING, "top_p": 0}, 400),
    ({"model": "tiny_random", "messages": GREETING, "max_tokens": 0}, 400),
    ({"model": "tiny_random", "messages": GREETING, "n": 2}, 400),
    ({"model": "tiny_random", "messages": GREETING, "stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"model": "gpt-4o", "messages": GREETING}, 404),
    ([1, 2], 400),
    ("not json", 400),
])
def test_malformed_request_gets_a_4xx_in_openai_error_shape(server, client, body, status):
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    code, answer = post(f"{server[0]}/chat/completions", raw)
    assert code == status
    assert set(answer) == {"error"} and answer["error"]["message"] and answer["error"]["type"]
    assert client.models.list().data  # the server lives on


def test_openai_client_raises_on_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny_random", messages=GREETING, temperature=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=GREETING)


def test_concurrent_requests_each_get_their_greedy_answer(server, client):
    conversations = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(4)]
    expected = [reference(server, messages, 20)[0] for messages in conversations]

    def ask(i: int) -> str:
        if i % 2:  # half streamed, half not
            stream = client.chat.completions.create(model="tiny_random", messages=conversations[i], temperature=0,
                                                    max_tokens=20, stream=True)
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        return client.chat.completions.create(model="tiny_random", messages=conversations[i], temperature=0,
                                              max_tokens=20).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(4))) == expected
    assert len(set(expected)) == 4


def test_reasoning_and_tool_calls_come_back_in_their_own_fields(scripted_clients):
    completion = scripted_clients[0].chat.completions.create(model="scripted", messages=WEATHER, tools=TOOLS,
                                                             temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "The user wants the weather: call the tool."
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function", "get_weather", {"city": "Paris"})


def test_streamed_reasoning_and_tool_calls(scripted_clients):
    chunks = list(scripted_clients[0].chat.completions.create(model="scripted", messages=WEATHER, tools=TOOLS,
                                                              temperature=0, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == \
        "The user wants the weather: call the tool."
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    [call] = [call for d in deltas for call in d.tool_calls or []]
    assert (call.index, call.function.name, json.loads(call.function.arguments)) == (
        0, "get_weather", {"city": "Paris"})
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_call_history_is_rendered_by_the_chat_template(scripted_clients):
    tokenizer = shipped_tokenizer()
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = WEATHER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'}]
    completion = scripted_clients[0].chat.completions.create(model="scripted", messages=messages, tools=TOOLS,
                                                             max_tokens=4)
    expected = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, return_dict=False)
    assert completion.usage.prompt_tokens == len(expected)


def test_without_tools_in_the_request_there_are_no_tool_calls(scripted_clients):
    completion = scripted_clients[0].chat.completions.create(model="scripted", messages=WEATHER, temperature=0)
    assert completion.choices[0].message.tool_calls is None


def test_show_thinking_0_leaves_the_reasoning_out(scripted_clients):
    shown, hidden = (client.chat.completions.create(model="scripted", messages=GREETING, temperature=0).choices[0]
                     for client in scripted_clients)
    assert (shown.message.reasoning_content, shown.message.content) == ("A greeting: answer kindly.", "Hello there!")
    assert getattr(hidden.message, "reasoning_content", None) is None and hidden.message.content == "Hello there!"


@pytest.mark.parametrize("seed, status", [(2**70, 400), (2**63, 400), (-2**63 - 1, 400),
                                          (2**63 - 1, 200), (-2**63, 200)])
def test_seed_must_be_a_signed_64_bit_integer(server, seed, status):
    # 2**70 once made torch.manual_seed raise in the generating thread and the request never returned
    body = {"model": "tiny_random", "messages": GREETING, "max_tokens": 2, "temperature": 1, "seed": seed}
    code, answer = post(f"{server[0]}/chat/completions", json.dumps(body).encode(), timeout=30)
    assert code == status
    if status == 400:
        assert (answer["error"]["type"], answer["error"]["param"]) == ("invalid_request_error", "seed")


def conversation_of(tokenizer, prompt_tokens: int) -> list[dict]:
    """One user message whose prompt, chat template included, is exactly `prompt_tokens` tokens."""
    def length(words: int) -> int:
        return len(prompt_ids(tokenizer, [{"role": "user", "content": " hello" * words}]))
    assert length(2) == length(1) + 1  # one token a word
    messages = [{"role": "user", "content": " hello" * (prompt_tokens - length(1) + 1)}]
    assert len(prompt_ids(tokenizer, messages)) == prompt_tokens
    return messages


@pytest.mark.parametrize("prompt_tokens, max_tokens", [(40_000, None), (32_768, None), (32_760, 9)])
def test_a_request_beyond_the_context_gets_context_length_exceeded(server, prompt_tokens, max_tokens):
    _, model, tokenizer, _ = server
    assert model.config.max_position_embeddings == 32_768
    body = {"model": "tiny_random", "messages": conversation_of(tokenizer, prompt_tokens)}
    code, answer = post(f"{server[0]}/chat/completions",
                        json.dumps(body | ({"max_tokens": max_tokens} if max_tokens else {})).encode(), timeout=30)
    assert code == 400
    assert {key: answer["error"][key] for key in ("type", "param", "code")} == {
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}
    assert f"maximum context length is 32768 tokens, but the request needs {prompt_tokens + (max_tokens or 1)}" \
        in answer["error"]["message"]


def test_a_body_over_max_request_bytes_gets_413_and_the_server_lives_on(server, client):
    two_megabytes = [{"role": "user", "content": "x" * 2_000_000}]  # over the default limit, 1 MiB
    with pytest.raises(openai.APIStatusError) as raised:  # its Content-Length says so: refused before it is read
        client.chat.completions.create(model="tiny_random", messages=two_megabytes, max_tokens=1, timeout=30)
    assert raised.value.status_code == 413 and "--max_request_bytes" in raised.value.message
    body = json.dumps({"model": "tiny_random", "messages": two_megabytes}).encode()
    code, answer = post_chunked(f"{server[0]}/chat/completions", body, timeout=30)  # no Content-Length
    assert code == 413 and "--max_request_bytes" in answer["error"]["message"]
    assert client.chat.completions.create(model="tiny_random", messages=GREETING, max_tokens=2, timeout=30).choices


def test_without_the_serve_extra_help_works_and_a_run_says_what_to_install():
    assert_help_and_install_line_without_serve_extra(REPO / "scripts" / "serve_openai_api.py", "--max_request_bytes")

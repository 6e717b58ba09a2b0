"""scripts/serve_openai_api.py under misuse, as a real process on a free localhost port: clients that leave
mid-reply, replies that would run for minutes, a generation that fails, and a burst of malformed, oversized,
huge-seed, leaving and normal requests; afterwards the server answers in its usual time and stops on SIGTERM.

The served model never ends its turn (serving_helpers.endless_checkpoint), so a reply runs to max_tokens unless
the server stops it: LONG tokens take the tiny model over a minute on one CPU thread, a normal reply milliseconds.
"""

import http.client
import json
import select
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from model.loading import load_checkpoint
from scripts.generation import ReplyStream, prompt_ids
from scripts.serve_openai_api import SHUTDOWN_GRACE_S, create_app
from serving_helpers import (REPO, endless_checkpoint, free_port, post, post_chunked, serve_in_thread,
                             sigterm_exit_seconds, start_server, stop_server)

LONG = 20_000  # max_tokens of a reply that would keep the model busy for over a minute
GREETING = [{"role": "user", "content": "Hi"}]
USUAL_S = 5  # a normal 8-token reply takes well under this, even on a loaded machine


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    return endless_checkpoint(tmp_path_factory.mktemp("endless") / "endless")


def serve(checkpoint, *flags: str):
    """(base url, process) of the server on `checkpoint`, its --max_tokens_cap above LONG."""
    port = free_port()
    process = start_server([sys.executable, str(REPO / "scripts" / "serve_openai_api.py"), "--model_path",
                            str(checkpoint), "--port", str(port), "--device", "cpu", "--max_tokens_cap",
                            str(2 * LONG), *flags],
                           f"http://127.0.0.1:{port}/v1/models", checkpoint.parent / f"server_{port}.log")
    return f"http://127.0.0.1:{port}/v1", process


@pytest.fixture(scope="module")
def server(endless):
    url, process = serve(endless)
    yield url
    stop_server(process)


def client(url: str, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=timeout)


def answer_seconds(url: str) -> float:
    """Seconds a normal request (8 tokens) takes to be answered."""
    start = time.monotonic()
    with client(url) as normal:
        completion = normal.chat.completions.create(model="endless", messages=GREETING, max_tokens=8)
    assert completion.usage.completion_tokens == 8
    return time.monotonic() - start


def leave_midway(url: str, stream: bool) -> str:
    """Ask for a LONG reply and disconnect: after three chunks when streamed, after half a second otherwise."""
    with client(url, timeout=0.5 if not stream else 30) as leaving:
        if stream:
            with leaving.chat.completions.create(model="endless", messages=GREETING, max_tokens=LONG,
                                                 stream=True) as chunks:
                for _, _ in zip(range(3), chunks):
                    pass
        else:
            with pytest.raises(openai.APITimeoutError):
                leaving.chat.completions.create(model="endless", messages=GREETING, max_tokens=LONG)
    return "left"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_the_model(server, stream):
    answer_seconds(server)  # warm
    leave_midway(server, stream)
    assert answer_seconds(server) < USUAL_S  # rather than waiting for the LONG reply no one reads


def test_request_timeout_ends_a_long_reply_with_finish_reason_length(endless):
    url, process = serve(endless, "--request_timeout", "1")
    try:
        start = time.monotonic()
        with client(url) as patient:
            completion = patient.chat.completions.create(model="endless", messages=GREETING, max_tokens=LONG)
            chunks = list(patient.chat.completions.create(model="endless", messages=GREETING, max_tokens=LONG,
                                                          stream=True, stream_options={"include_usage": True}))
        assert time.monotonic() - start < 2 * (1 + USUAL_S)
        assert completion.choices[0].finish_reason == "length" and 0 < completion.usage.completion_tokens < LONG
        assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
        assert 0 < chunks[-1].usage.completion_tokens < LONG
    finally:
        stop_server(process)


def test_an_error_in_the_generating_thread_ends_the_reply(endless):
    model, tokenizer = load_checkpoint(endless, "cpu")
    reply = ReplyStream(model, tokenizer, prompt_ids(tokenizer, GREETING), max_new_tokens=4, temperature=1,
                        seed=2**70)  # torch.manual_seed raises in the generating thread, before generate
    raised = []

    def read():
        try:
            reply.complete()
        except Exception as error:
            raised.append(error)

    reader = threading.Thread(target=read, daemon=True)  # a reader waiting forever must not hold up the tests
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "the reply never ended"
    assert len(raised) == 1 and "Overflow" in str(raised[0])


def test_a_failed_generation_answers_an_openai_error(endless):
    """A generation that raises (here `generate` itself, which no request can make fail on purpose, so this server
    runs in-process) answers 500, or ends the stream with an error event the openai client raises."""
    model, tokenizer = load_checkpoint(endless, "cpu")

    def failing_generate(**kwargs):
        raise RuntimeError("the device fell over")

    model.generate = failing_generate
    url, server, thread = serve_in_thread(create_app(model, tokenizer, "endless", 16))
    try:
        with client(url) as asking:
            with pytest.raises(openai.InternalServerError, match="fell over"):
                asking.chat.completions.create(model="endless", messages=GREETING)
            with pytest.raises(openai.APIError, match="fell over"):
                list(asking.chat.completions.create(model="endless", messages=GREETING, stream=True))
    finally:
        server.should_exit = True
        thread.join()


def declare_huge_body(url: str) -> int:
    """Send only the headers of a 10 GB POST; the status the server answers without waiting for the body."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.putrequest("POST", f"{address.path}/chat/completions")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(10**10))
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def post_too_large(url: str, body: bytes, wait_s: float = 10.0) -> int:
    """POST `body` with its Content-Length as a careful client does (curl's Expect: 100-continue): the headers first,
    then the body only if the server has not answered within `wait_s`. The status it answers.

    The server refuses an oversized body before reading it and closes the connection, so a client that pushes the
    whole body at once may get a broken pipe instead of the 413 (a race that depends on the host's load)."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.putrequest("POST", address.path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        if not select.select([connection.sock], [], [], wait_s)[0]:  # no early answer: send the body
            connection.send(body)
        return connection.getresponse().status
    finally:
        connection.close()


def test_a_burst_of_bad_and_leaving_clients_leaves_the_server_answering_and_stoppable(endless, tmp_path):
    url, process = serve(endless)
    try:
        usual = answer_seconds(url)
        completions = f"{url}/chat/completions"

        def status(body, chunked: bool = False) -> int:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            return (post_chunked if chunked else post)(completions, raw, timeout=30)[0]

        ok = {"model": "endless", "messages": GREETING, "max_tokens": 8}
        two_megabytes = {**ok, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
        burst = {  # job: the answer it must get
            "not json": (lambda: status(b"{not json"), 400),
            "a list": (lambda: status(b"[1, 2]"), 400),
            "no messages": (lambda: status({"model": "endless"}), 400),
            "a robot": (lambda: status({**ok, "messages": [{"role": "robot", "content": "Hi"}]}), 400),
            "hot": (lambda: status({**ok, "temperature": "hot"}), 400),
            "unknown model": (lambda: status({**ok, "model": "gpt-4o"}), 404),
            "huge seed": (lambda: status({**ok, "seed": 1180591620717411303424}), 400),
            "huge negative seed": (lambda: status({**ok, "seed": -2**70}), 400),
            "40k-token prompt": (lambda: status({**ok, "messages": [{"role": "user", "content": " hello" * 40_000}]}),
                                 400),
            "2 MB": (lambda: post_too_large(completions, json.dumps(two_megabytes).encode()), 413),
            "2 MB chunked": (lambda: status(two_megabytes, chunked=True), 413),
            "10 GB declared": (lambda: declare_huge_body(url), 413),
            **{f"leaving {i}": (lambda i=i: leave_midway(url, stream=i % 2 == 1), "left") for i in range(4)},
            **{f"normal {i}": (lambda: status(ok), 200) for i in range(3)},
        }
        with ThreadPoolExecutor(len(burst)) as pool:
            answers = dict(zip(burst, pool.map(lambda job: job[0](), burst.values())))
        assert answers == {name: expected for name, (_, expected) in burst.items()}
        assert answer_seconds(url) < USUAL_S, f"usually {usual:.2f} s"

        in_flight = threading.Event()

        def read_long_reply():
            try:
                with client(url) as reading:
                    for _ in reading.chat.completions.create(model="endless", messages=GREETING, max_tokens=LONG,
                                                             stream=True):
                        in_flight.set()
            except Exception:  # the server stopping cuts the reply off
                pass

        threading.Thread(target=read_long_reply, daemon=True).start()
        assert in_flight.wait(timeout=30)
        exit_s = sigterm_exit_seconds(process, limit_s=SHUTDOWN_GRACE_S + 30)
        assert exit_s is not None and exit_s < SHUTDOWN_GRACE_S + USUAL_S, f"exited after {exit_s} s"
    finally:
        stop_server(process)

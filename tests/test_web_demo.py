"""scripts/web_demo.py in a real browser: the test starts `streamlit run` on a free localhost port with a tiny
random checkpoint, drives Debian's Chromium headless through Playwright, chats two turns and checks each streamed
reply against transformers' greedy `generate` on the conversation so far.

A screenshot is written to the test's tmp dir and, when MINIMIND_TEST_ARTIFACTS names a directory, copied there
as web_demo.png. Needs the chromium package (apt-get install chromium); skipped where it is missing.

Without a browser: the address the started demo listens on (read from Linux's /proc/net/tcp), the usage-statistics
setting its first page gets (Streamlit's websocket protocol, as a browser tab speaks it), and what the page shows
for a checkpoint it cannot load, and a tool-using reply with "Use tools" on (Streamlit's AppTest)."""

import asyncio
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import websockets
from playwright.sync_api import expect, sync_playwright
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.testing.v1 import AppTest

from dataset.chat_format import tool_call_text
from dataset.tools import TOOL_SCHEMAS
from model.loading import load_checkpoint
from scripts.generation import build_messages, prompt_ids
from scripts.web_demo import CURSOR, checkpoint_dirs
from serving_helpers import (REPO, assert_help_and_install_line_without_serve_extra, free_port, greedy_ids,
                             random_checkpoint, scripted_checkpoint, shipped_tokenizer, start_server, stop_server)

CHROMIUM = shutil.which("chromium")
# Without the background-networking flags Chromium keeps calling Google's services and misbehaves offline
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_NEW_TOKENS = 48
THINKING_REPLY = "<think>\nA greeting: answer kindly.\n</think>\n\nHello there!<|im_end|>"
FINISHED_REPLY = re.compile(f"^[^{CURSOR}]*[^\\s{CURSOR}][^{CURSOR}]*$")  # some text, and the streaming cursor gone
# Records every text the newest assistant message shows, to see the reply grow while it streams
RECORD_REPLY_TEXTS = """() => {
    window.replyTexts = [];
    new MutationObserver(() => {
        const messages = document.querySelectorAll('[data-testid="stChatMessageContent"]');
        const text = messages.length ? messages[messages.length - 1].innerText : '';
        if (window.replyTexts[window.replyTexts.length - 1] !== text) window.replyTexts.push(text);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def words(text: str) -> list[str]:
    """The runs of letters and digits in `text`: what survives Markdown rendering of a reply unchanged."""
    return re.findall(r"[^\W_]+", text)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, checkpoint dir) of `streamlit run scripts/web_demo.py` on a tiny random checkpoint under an out dir."""
    out = tmp_path_factory.mktemp("out")
    directory = random_checkpoint(out / "tiny_random")
    port = free_port()
    process = start_server([sys.executable, "-m", "streamlit", "run", str(REPO / "scripts" / "web_demo.py"),
                            "--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port),
                            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none", "--",
                            "--out_dir", str(out), "--model_path", str(directory), "--device", "cpu",
                            "--temperature", "0", "--repetition_penalty", "1", "--max_new_tokens", str(MAX_NEW_TOKENS)],
                           f"http://127.0.0.1:{port}/_stcore/health", out / "streamlit.log")
    yield f"http://127.0.0.1:{port}", directory
    stop_server(process)


def test_checkpoint_dirs_lists_weights_and_adapters(tmp_path):
    for name, marker in [("full_sft_64", "config.json"), ("lora_identity_64", "adapter_config.json"),
                         ("runs", "metrics.jsonl")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text("{}")
    assert checkpoint_dirs(tmp_path) == [str(tmp_path / "full_sft_64"), str(tmp_path / "lora_identity_64")]
    assert checkpoint_dirs(tmp_path / "missing") == []


@pytest.fixture(scope="module")
def thinking_checkpoint(tmp_path_factory):
    """A model that answers "Hi" with THINKING_REPLY (memorized)."""
    prompt = prompt_ids(shipped_tokenizer(), [{"role": "user", "content": "Hi"}])
    return scripted_checkpoint(tmp_path_factory.mktemp("thinking"), [(prompt, THINKING_REPLY)])


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_chat_in_the_browser_streams_greedy_replies_and_clears(app, thinking_checkpoint, tmp_path):
    url, directory = app
    model, tokenizer = load_checkpoint(directory, "cpu")
    history = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.get_by_test_id("stChatInputTextArea")).to_be_visible(timeout=60_000)  # the model is loaded
            expect(page.get_by_role("combobox", name="Checkpoint")).to_have_value("tiny_random")  # found in --out_dir
            page.evaluate(RECORD_REPLY_TEXTS)
            for turn, question in enumerate(["Hello!", "Tell me more."]):
                history.append({"role": "user", "content": question})
                expected = tokenizer.decode(greedy_ids(model, tokenizer, prompt_ids(
                    tokenizer, build_messages(history, None, 8)), MAX_NEW_TOKENS), skip_special_tokens=True)
                history.append({"role": "assistant", "content": expected.strip()})

                box = page.get_by_test_id("stChatInputTextArea")
                box.fill(question)
                box.press("Enter")
                reply = page.get_by_test_id("stChatMessageContent").nth(2 * turn + 1)
                expect(reply).to_have_text(FINISHED_REPLY, timeout=60_000)
                expect(page.get_by_test_id("stChatMessage")).to_have_count(2 * turn + 2)
                assert words(reply.inner_text()) == words(expected) != []
            first_reply = page.get_by_test_id("stChatMessageContent").nth(1)  # redrawn from the history, once
            assert words(first_reply.inner_text()) == words(history[1]["content"])
            shown = page.evaluate("window.replyTexts")
            assert any(CURSOR in text for text in shown), "no partial reply was ever shown"
            page.screenshot(path=str(tmp_path / "web_demo.png"), full_page=True)
            page.get_by_role("button", name="Clear history").click()
            expect(page.get_by_test_id("stChatMessage")).to_have_count(0)

            # another checkpoint by its path, and its <think> reasoning shown on request
            path_box = page.get_by_role("textbox", name="...or a checkpoint directory")
            path_box.fill(str(thinking_checkpoint))
            path_box.press("Enter")
            page.get_by_text("Show thinking").click()
            expect(page.get_by_role("switch", name="Show thinking")).to_be_checked()
            box = page.get_by_test_id("stChatInputTextArea")
            box.fill("Hi")
            box.press("Enter")
            reply = page.get_by_test_id("stChatMessageContent").nth(1)
            expect(reply).to_have_text(re.compile(r"^A greeting: answer kindly\.\s*Hello there!\s*$"), timeout=60_000)
            expect(reply.get_by_test_id("stCaptionContainer")).to_have_text("A greeting: answer kindly.")
        finally:
            browser.close()
    if os.environ.get("MINIMIND_TEST_ARTIFACTS"):
        os.makedirs(os.environ["MINIMIND_TEST_ARTIFACTS"], exist_ok=True)
        shutil.copy(tmp_path / "web_demo.png", os.environ["MINIMIND_TEST_ARTIFACTS"])


def listening_addresses(port: int) -> set[str]:
    """The addresses TCP sockets listen on at `port` on this machine ('127.0.0.1', '0.0.0.0', '::'...), read from
    Linux's /proc/net/tcp and tcp6."""
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for row in Path("/proc/net", table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in the kernel's (little-endian) byte order
                found.add(socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))))
    return found


def gathers_usage_stats(port: int) -> bool:
    """The usage-statistics setting the demo sends a new browser tab (ForwardMsg new_session), which decides
    whether the page reports usage to Streamlit."""
    async def first_session() -> bool:
        async with websockets.connect(f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"]) as tab:
            rerun = BackMsg()
            rerun.rerun_script.query_string = ""
            await tab.send(rerun.SerializeToString())
            while True:
                message = ForwardMsg()
                message.ParseFromString(await asyncio.wait_for(tab.recv(), timeout=60))
                if message.WhichOneof("type") == "new_session":
                    return message.new_session.config.gather_usage_stats
    return asyncio.run(first_session())


@pytest.fixture
def quiet_streamlit(monkeypatch):
    """Streamlit settings for a test run, as environment variables (the way to reach `python scripts/web_demo.py`):
    no browser opened and no e-mail prompt, no file watcher on the checkout."""
    monkeypatch.setenv("STREAMLIT_SERVER_HEADLESS", "true")
    monkeypatch.setenv("STREAMLIT_SERVER_FILE_WATCHER_TYPE", "none")


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads Linux's /proc/net/tcp")
@pytest.mark.parametrize("started_by", ["python", "streamlit run"])
def test_the_demo_listens_on_localhost_only_and_gathers_no_usage_stats(started_by, quiet_streamlit, tmp_path):
    directory = random_checkpoint(tmp_path / "tiny_random")
    port = free_port()
    script, app_flags = str(REPO / "scripts" / "web_demo.py"), ["--model_path", str(directory), "--device", "cpu"]
    command = ([sys.executable, script, "--port", str(port), *app_flags] if started_by == "python" else
               [sys.executable, "-m", "streamlit", "run", script, "--server.port", str(port), "--", *app_flags])
    process = start_server(command, f"http://127.0.0.1:{port}/_stcore/health", tmp_path / "streamlit.log")
    try:
        assert listening_addresses(port) == {"127.0.0.1"}
        assert gathers_usage_stats(port) is False
    finally:
        stop_server(process)


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads Linux's /proc/net/tcp")
def test_host_opens_the_demo_on_that_address_with_a_warning(quiet_streamlit, tmp_path):
    port = free_port()
    host = "127.0.0.2"  # another address, still of this machine only (Linux routes all of 127/8 to loopback)
    process = start_server([sys.executable, str(REPO / "scripts" / "web_demo.py"), "--host", host, "--port",
                            str(port), "--device", "cpu"], f"http://{host}:{port}/_stcore/health",
                           tmp_path / "streamlit.log")
    try:
        assert listening_addresses(port) == {host}
    finally:
        stop_server(process)
    warnings = [line for line in (tmp_path / "streamlit.log").read_text().splitlines() if "warning" in line]
    assert warnings == [f"warning: the web demo listens on {host}:{port}, so whoever can reach this machine there "
                        "can use the model"]


def no_weights(directory: Path) -> Path:
    """A checkpoint directory with its config.json and tokenizer but no model.safetensors."""
    random_checkpoint(directory)
    (directory / "model.safetensors").unlink()
    return directory


def unreadable_config(directory: Path) -> Path:
    """A checkpoint directory whose config.json is not JSON."""
    random_checkpoint(directory)
    (directory / "config.json").write_text("{not json")
    return directory


@pytest.mark.parametrize("broken", [no_weights, unreadable_config])
def test_a_checkpoint_that_cannot_be_loaded_shows_one_sentence_not_a_traceback(broken, tmp_path, monkeypatch):
    directory = broken(tmp_path / "broken")
    monkeypatch.setattr(sys, "argv", ["web_demo.py", "--model_path", str(directory), "--out_dir", str(tmp_path),
                                      "--device", "cpu"])
    page = AppTest.from_file(str(REPO / "scripts" / "web_demo.py"), default_timeout=120).run()
    assert not page.exception
    [error] = page.error
    assert str(directory) in error.value and "\n" not in error.value and "Traceback" not in error.value


def test_without_the_serve_extra_help_works_and_a_run_says_what_to_install():
    assert_help_and_install_line_without_serve_extra(REPO / "scripts" / "web_demo.py", "--host")


TOOL_QUESTION = "What is 48 / 2?"
CALCULATOR_CALL = {"name": "calculator", "arguments": {"expression": "48/2"}}


@pytest.fixture(scope="module")
def tool_checkpoint(tmp_path_factory):
    """A model that, offered the tools, answers TOOL_QUESTION with a calculator call and its result with the answer."""
    tokenizer = shipped_tokenizer()
    asked = [{"role": "user", "content": TOOL_QUESTION}]
    called = asked + [{"role": "assistant", "content": "", "tool_calls": [CALCULATOR_CALL]},
                      {"role": "tool", "content": "24"}]
    return scripted_checkpoint(tmp_path_factory.mktemp("tools"), [
        (prompt_ids(tokenizer, asked, TOOL_SCHEMAS), tool_call_text(CALCULATOR_CALL) + "<|im_end|>"),
        (prompt_ids(tokenizer, called, TOOL_SCHEMAS), "It is 24.<|im_end|>")])


def test_use_tools_runs_the_models_call_and_shows_it_with_its_result(tool_checkpoint, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["web_demo.py", "--model_path", str(tool_checkpoint), "--device", "cpu",
                                      "--temperature", "0", "--max_new_tokens", "64"])
    page = AppTest.from_file(str(REPO / "scripts" / "web_demo.py"), default_timeout=120).run()
    [use_tools] = [toggle for toggle in page.toggle if toggle.label == "Use tools"]
    use_tools.set_value(True).run()
    page.chat_input[0].set_value(TOOL_QUESTION).run()
    assert not page.exception
    shown = [(message.name, [code.value for code in message.code], [text.value for text in message.markdown])
             for message in page.chat_message]
    assert shown == [("user", [], [TOOL_QUESTION]),
                     ("assistant", ['calculator({"expression": "48/2"})'], [""]),
                     ("tool", ["24"], []),
                     ("assistant", [], ["It is 24."])]
    assert [m["role"] for m in page.session_state["history"]] == ["user", "assistant", "tool", "assistant"]

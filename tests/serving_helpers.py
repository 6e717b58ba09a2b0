"""What the tests of chat, the web demo and the OpenAI server share: small real checkpoints written to a tmp
dir, and starting a local server.

random_checkpoint: a tiny MiniMind with random weights, whose greedy replies vary from prompt to prompt.
endless_checkpoint: the same, never ending its turn: every reply runs to max_tokens (a long-running request).
scripted_checkpoint: a tiny MiniMind trained until greedy decoding answers given conversations with given
replies (memorized), so a test knows the model's answer in advance: a reasoning block, a tool call.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch
import uvicorn
from transformers import AutoTokenizer

from dataset.lm_dataset import IGNORE_INDEX
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

REPO = Path(__file__).resolve().parents[1]
SERVE_EXTRA = ("fastapi", "starlette", "pydantic", "uvicorn", "streamlit")  # what `pip install -e ".[serve]"` adds
# Runs the script named by argv[1] as __main__ with the modules in argv[2] (comma-separated) failing to import
WITHOUT_MODULES = """
import runpy, sys
blocked = set(sys.argv[2].split(","))
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
script, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def shipped_tokenizer():
    return AutoTokenizer.from_pretrained(REPO / "model" / "tokenizer")


def random_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random MiniMind and the shipped tokenizer in `directory`. Its matrices are drawn with std 0.3
    rather than the usual 0.02, with which an untrained model repeats one token whatever the prompt."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    model.save_pretrained(directory)
    shipped_tokenizer().save_pretrained(directory)
    return directory


def endless_checkpoint(directory: Path) -> Path:
    """A random_checkpoint whose generation_config.json suppresses <|endoftext|> and <|im_end|> (transformers'
    suppress_tokens), so that it never ends a reply before max_tokens."""
    random_checkpoint(directory)
    config_path = directory / "generation_config.json"
    config = json.loads(config_path.read_text())
    tokenizer = shipped_tokenizer()
    config["suppress_tokens"] = [tokenizer.pad_token_id, tokenizer.eos_token_id]
    config_path.write_text(json.dumps(config))
    return directory


def scripted_checkpoint(directory: Path, examples: list[tuple[list[int], str]], max_steps: int = 400) -> Path:
    """Train a tiny MiniMind on `examples` (prompt token ids, reply text ending with <|im_end|>) until greedy
    decoding of each prompt gives its reply exactly; save it with the shipped tokenizer in `directory`.

    Raises:
        AssertionError: if the replies are not memorized within max_steps full-batch AdamW steps.
    """
    tokenizer = shipped_tokenizer()
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**TINY))
    replies = [tokenizer(reply, add_special_tokens=False)["input_ids"] for _, reply in examples]
    length = max(len(prompt) + len(reply) for (prompt, _), reply in zip(examples, replies))
    input_ids = torch.full((len(examples), length), tokenizer.pad_token_id)
    labels = torch.full((len(examples), length), IGNORE_INDEX)
    for row, ((prompt, _), reply) in enumerate(zip(examples, replies)):
        input_ids[row, :len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        labels[row, len(prompt):len(prompt) + len(reply)] = torch.tensor(reply)
    attention_mask = (labels != IGNORE_INDEX) | (torch.arange(length) < torch.tensor(
        [len(prompt) for prompt, _ in examples])[:, None])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(max_steps):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9 and greedy_replies_are(model, tokenizer, examples, replies):
            break
    assert greedy_replies_are(model, tokenizer, examples, replies), f"not memorized in {max_steps} steps"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def greedy_replies_are(model, tokenizer, examples, replies) -> bool:
    model.eval()
    with torch.no_grad():
        memorized = all(greedy_ids(model, tokenizer, prompt, len(reply) + 1) == reply
                        for (prompt, _), reply in zip(examples, replies))
    model.train()
    return memorized


def greedy_ids(model, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The reference: transformers' greedy `generate` after `prompt`, ending a turn at <|im_end|> or
    <|endoftext|> as the chat front ends do; the new token ids."""
    output = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                            eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
                            pad_token_id=tokenizer.pad_token_id)
    return output[0, len(prompt):].tolist()


def free_port() -> int:
    """A TCP port nothing listens on now, on localhost."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(command: list[str], url: str, log: Path, timeout_s: float = 180) -> subprocess.Popen:
    """Start `command` (its output to the file `log`, with one thread per torch op as on a shared machine) and
    wait until `url` answers 200; fail with the output if it exits first or the time runs out."""
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{command[:3]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return process
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    process.kill()
    raise AssertionError(f"no answer from {url} within {timeout_s} s:\n{log.read_text()[-3000:]}")


def serve_in_thread(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    """Run `app` under uvicorn on a free localhost port in a thread of this process (no second model load)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    return f"http://127.0.0.1:{server.config.port}/v1", server, thread


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def sigterm_exit_seconds(process: subprocess.Popen, limit_s: float) -> float | None:
    """Send SIGTERM to `process`; the seconds it took to exit, or None (and then it is killed) past `limit_s`."""
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return None
    return time.monotonic() - start


def post(url: str, body: bytes, timeout: float = 60) -> tuple[int, dict]:
    """POST a raw JSON body to the server; its status and JSON answer."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post_chunked(url: str, body: bytes, chunk_size: int = 65536, timeout: float = 60) -> tuple[int, dict]:
    """POST a raw JSON body without a Content-Length, in chunks (Transfer-Encoding: chunked); status and answer."""
    address = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    try:
        chunks = (body[start:start + chunk_size] for start in range(0, len(body), chunk_size))
        connection.request("POST", address.path, body=chunks, headers={"Content-Type": "application/json"},
                           encode_chunked=True)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def run_without_serve_extra(script: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `python script args` as if the serve extra (SERVE_EXTRA) were not installed; its output as text."""
    return subprocess.run([sys.executable, "-c", WITHOUT_MODULES, str(script), ",".join(SERVE_EXTRA), *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_help_and_install_line_without_serve_extra(script: Path, flag: str) -> None:
    """With the serve extra hidden, `script --help` exits 0 listing `flag`, and a run exits non-zero with one line,
    no traceback, naming the missing library and the command that installs it."""
    shown = run_without_serve_extra(script, "--help")
    assert shown.returncode == 0 and flag in shown.stdout
    run = run_without_serve_extra(script, "--port", "1")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert re.fullmatch(r'error: \w+ is not installed; install the serving libraries: pip install -e "\.\[serve\]"',
                        run.stderr.strip().splitlines()[-1])

"""Generating a chat reply, once for scripts/chat.py, scripts/web_demo.py and scripts/serve_openai_api.py:
render a conversation with the chat template, stream the reply while `model.generate` runs, and split off
what the chat template puts around an answer: the reasoning in <think>...</think> and the tool calls in
<tool_call>{json}</tool_call>.

    ids = prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])
    reply = ReplyStream(model, tokenizer, ids, max_new_tokens=64, temperature=0)
    for reasoning_piece, content_piece in reply:      # pieces of text as the tokens come
        print(content_piece, end="")
    reply.content, reply.reasoning, reply.finish_reason, len(reply.token_ids)

The streamed pieces always add up to the final fields, and `reply.token_ids` are exactly the ids that
`model.generate(prompt, max_new_tokens=..., eos_token_id=[<|im_end|>, <|endoftext|>])` returns after the
prompt (same sampling settings, same seed).
"""

import argparse
import json
import re
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from queue import Queue
from threading import Event, Thread
from typing import Callable, Iterator, NoReturn

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

REPO_ROOT = Path(__file__).resolve().parents[1]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# A byte-level tokenizer decodes an unfinished UTF-8 character (its first bytes only) to this replacement character
UNFINISHED_CHARACTER = "\ufffd"


def serve_extra_missing(error: ModuleNotFoundError, parse_args: Callable, module_name: str) -> NoReturn:
    """What the web demo and the server do when a library of the serve extra is not installed: run as a script
    (`module_name` "__main__"), answer --help through `parse_args`, else exit with one line saying what to install;
    imported, raise `error`."""
    if module_name != "__main__":
        raise error
    parse_args()
    raise SystemExit(f'error: {error.name} is not installed; install the serving libraries: pip install -e ".[serve]"')


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """--model_path, --base_model_path, --device: which checkpoint to open and where (see model.loading)."""
    parser.add_argument("--model_path", default=str(REPO_ROOT / "out" / "full_sft_256"),
                        help="checkpoint directory written by a training stage, or a LoRA adapter directory "
                             "(default: %(default)s)")
    parser.add_argument("--base_model_path", default=None,
                        help="for a LoRA adapter directory: the base checkpoint (default: the one the adapter "
                             "was trained on, from its adapter_config.json)")
    parser.add_argument("--device", default=None,
                        help="cuda, mps or cpu (default: the first available in that order)")


def add_chat_flags(parser: argparse.ArgumentParser) -> None:
    """The sampling and conversation flags of the chat front ends (terminal and browser), with their defaults."""
    parser.add_argument("--system_prompt", default=None, help="optional system message (default: none)")
    parser.add_argument("--max_new_tokens", type=int, default=256,
                        help="tokens generated per reply at most (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.85,
                        help="sampling temperature; 0 means greedy decoding (default: 0.85)")
    parser.add_argument("--top_p", type=float, default=0.85, help="nucleus sampling probability mass (default: 0.85)")
    parser.add_argument("--repetition_penalty", type=float, default=1.1,
                        help="divides the logits of already generated tokens, 1.0 = off (default: 1.1)")
    parser.add_argument("--history_turns", type=int, default=8,
                        help="earlier user/assistant exchanges kept in the context (default: 8)")
    parser.add_argument("--show_thinking", type=int, default=0, choices=[0, 1],
                        help="1: also show the reasoning a model writes in <think>...</think> before its answer "
                             "(default: 0, only the answer)")


def build_messages(history: list[dict], system_prompt: str | None, history_turns: int) -> list[dict]:
    """The conversation sent to the model: the system prompt, then the last `history_turns` user/assistant
    exchanges of `history` before its last message, then the last message (the one being answered)."""
    kept = history[-(2 * history_turns + 1):]
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + kept


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template, ending with the opening of the
    assistant's turn (add_generation_prompt). `tools` (OpenAI function schemas) go into the system turn.

    Raises:
        jinja2.TemplateError: when the template refuses the conversation (an unknown role, a system message
            that is not first).
    """
    text = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sampling_options(temperature: float, top_p: float) -> dict:
    """`generate` arguments for a temperature and a nucleus mass: greedy (argmax) when temperature == 0, else
    sampling from softmax(logits / temperature) cut to the top_p mass (Holtzman et al. 2019). top_k is switched
    off (transformers would otherwise apply its default top_k=50), so the two settings alone shape the sampling,
    as in the OpenAI API."""
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, content) of a reply. A reply that opens with <think> holds its reasoning up to </think>
    (the newlines the chat template writes around it stripped) and its answer after; while </think> has not come
    yet, all of it is reasoning. Any other reply is all content. The Qwen3 / DeepSeek-R1 convention."""
    if not text.startswith(THINK_OPEN):
        return "", text
    reasoning, _, content = text[len(THINK_OPEN):].partition(THINK_CLOSE)
    return reasoning.strip("\n"), content.lstrip("\n")


def parse_tool_calls(content: str) -> tuple[str, list[dict]]:
    """Split the <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks the chat template writes out of
    an answer (the Hermes / Qwen format).

    Returns:
        (the text outside the blocks, trailing newlines stripped; [{"name": str, "arguments": JSON string}])
        The text unchanged and no calls when a block is not a JSON object with a string "name": a model that
        writes a malformed call has written text.
    """
    calls = []
    for block in TOOL_CALL_BLOCK.findall(content):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return content, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return content, []
        arguments = call.get("arguments", {})
        calls.append({"name": call["name"], "arguments": arguments if isinstance(arguments, str)
                      else json.dumps(arguments, ensure_ascii=False)})
    if not calls:
        return content, []
    return TOOL_CALL_BLOCK.sub("", content).rstrip("\n"), calls


def safe_prefix(text: str, markers: list[str]) -> tuple[int, bool]:
    """How much of a growing `text` can be shown before any of `markers` may start, and whether one has.

    Returns (length, found): found is True and length the index of the earliest marker when one occurs;
    otherwise length leaves out the longest end of `text` that could still grow into a marker.
    """
    starts = [index for index in (text.find(marker) for marker in markers) if index >= 0]
    if starts:
        return min(starts), True
    partial = max((size for marker in markers for size in range(1, len(marker)) if text.endswith(marker[:size])),
                  default=0)
    return len(text) - partial, False


class _TokenQueue(BaseStreamer):
    """A `generate` streamer that hands each new token id to another thread through a queue (the prompt,
    which `generate` passes first, is skipped); None marks the end, an Exception a failed generation."""

    def __init__(self):
        self.queue: Queue = Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:  # (1, prompt_len) once, then (1,) per new token
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.flatten().tolist():
            self.queue.put(token)

    def end(self) -> None:
        pass  # the generating thread puts the end marker itself, in a `finally`, however generation ends


class _StopWhen(StoppingCriteria):
    """Ends generation after the current token once `should_stop()` is true (a stop string seen, a client gone,
    the deadline passed)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


class ReplyStream:
    """One reply being generated: iterate it for (reasoning_piece, content_piece) pairs of text as tokens come.

    Args:
        prompt_ids: the conversation's token ids (`prompt_ids`).
        max_new_tokens: tokens generated at most.
        temperature, top_p: see `sampling_options` (temperature 0: greedy).
        repetition_penalty: CTRL's penalty (Keskar et al. 2019): logits of tokens already in the sequence are
            divided by it (multiplied when negative); 1.0 is off.
        stop: strings that end the reply where they first appear (they are not part of it).
        parse_tools: take <tool_call> blocks out of the answer into `tool_calls` (held back while streaming).
        seed: seeds torch's generator right before generating, for reproducible sampling (torch takes
            -2**63 to 2**64 - 1; another value ends the reply with the error torch raises).
        lock: held while the model generates, so requests from several threads take turns on one model.
        timeout_s: seconds from now (waiting for the lock included) after which generation ends after the current
            token, as at max_new_tokens (finish_reason "length"); None: no deadline.

    After the iteration: `token_ids` (the generated ids, a final <|im_end|> included: the completion's token
    count), `reasoning`, `content`, `tool_calls` ([{"name", "arguments"}]) and `finish_reason` ("stop": end of
    turn or a stop string, "length": max_new_tokens, the deadline or `cancel()` reached, "tool_calls").
    An error in the generating thread is raised by the iteration.

    Generation runs in a thread; the pieces are the decoded text of the tokens so far, less an unfinished UTF-8
    character and less any end that may still become a stop string or a marker, so they add up exactly to
    `tokenizer.decode(token_ids, skip_special_tokens=True)` split by `split_reasoning` (and cut at a stop string).
    """

    def __init__(self, model, tokenizer, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, stop: list[str] = (),
                 parse_tools: bool = False, seed: int | None = None, lock: AbstractContextManager | None = None,
                 timeout_s: float | None = None):
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt_ids
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._stop = Event()  # set by cancel(), or when the reader leaves early
        self.generate_options = dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                     **sampling_options(temperature, top_p))
        self.eos_ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # <|im_end|> ends a turn, <|endoftext|> a text
        self.stop, self.parse_tools, self.seed = [s for s in stop if s], parse_tools, seed
        self.lock = lock or nullcontext()
        self.token_ids: list[int] = []
        self.reasoning = self.content = ""
        self.tool_calls: list[dict] = []
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        tokens = self._tokens()
        try:
            for token in tokens:
                self.token_ids.append(token)
                text = self._decode().rstrip(UNFINISHED_CHARACTER)
                length, stopped = safe_prefix(text, self.stop)
                pieces = self._advance(text[:length], final=stopped, finish_reason="stop")
                if any(pieces):
                    yield pieces
                if stopped:
                    return
            text = self._decode()
            length, stopped = safe_prefix(text, self.stop)
            ended = stopped or (bool(self.token_ids) and self.token_ids[-1] in self.eos_ids)
            pieces = self._advance(text[:length] if stopped else text, final=True,
                                   finish_reason="stop" if ended else "length")
            if any(pieces):
                yield pieces
        finally:
            tokens.close()  # stops the generating thread when the reply ends early (a stop string, a closed client)

    def cancel(self) -> None:
        """End generation after the current token (the client is gone), or before it starts if it waits for the
        lock; the reply ends as at max_new_tokens. Safe to call from any thread, at any time."""
        self._stop.set()

    def complete(self) -> "ReplyStream":
        """Generate the whole reply without looking at the pieces; return self, its fields filled."""
        for _ in self:
            pass
        return self

    def _decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def _advance(self, text: str, final: bool, finish_reason: str | None = None) -> tuple[str, str]:
        """Take `text` (the reply so far, a prefix of the final one) into the fields; return what is new in each."""
        reasoning, content = split_reasoning(text)
        if not final and THINK_OPEN.startswith(text):
            content = ""  # "<thi" may still become "<think>"
        if self.parse_tools and final:
            content, self.tool_calls = parse_tool_calls(content)
        elif self.parse_tools:
            content = content[:safe_prefix(content, [TOOL_CALL_OPEN])[0]].rstrip("\n")
        pieces = reasoning[len(self.reasoning):], content[len(self.content):]
        self.reasoning, self.content = reasoning, content
        if final:
            self.finish_reason = "tool_calls" if self.tool_calls else finish_reason
        return pieces

    def _tokens(self) -> Iterator[int]:
        """Run `model.generate` in a thread; yield its new token ids as they come."""
        streamer = _TokenQueue()
        Thread(target=self._generate, args=(streamer,), daemon=True).start()
        try:
            while (token := streamer.queue.get()) is not None:
                if isinstance(token, Exception):
                    raise token
                yield token
        finally:
            self._stop.set()

    def _should_stop(self) -> bool:
        return self._stop.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)

    def _generate(self, streamer: _TokenQueue) -> None:
        try:
            with self.lock:
                if self._should_stop():  # cancelled, or out of time, while this request waited for the model
                    return
                if self.seed is not None:
                    torch.manual_seed(self.seed)
                input_ids = torch.tensor([self.prompt], device=self.model.device)
                self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                    eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([_StopWhen(self._should_stop)]), **self.generate_options,
                )
        except Exception as error:  # handed to the reading thread, which raises it
            streamer.queue.put(error)
        finally:  # whatever happened above, the reader must not wait for a token forever
            streamer.queue.put(None)

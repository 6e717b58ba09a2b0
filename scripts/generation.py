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
`model.generate(prompt, generation_config=generation_config(...))` returns after the prompt (same settings, same
seed). `generation_config` is the one decoding setup of every front end, eval/ and the export checks: temperature 0
is plain greedy decoding, and the repetition penalty is off unless asked for. `ReplyStream(..., written_out=True)`
decodes with model/inference.py's own KV cache and loop instead (scripts/chat.py does): the same tokens.
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
from transformers import GenerationConfig
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from dataset.chat_format import render_prompt
from model.inference import generate_tokens

REPO_ROOT = Path(__file__).resolve().parents[1]
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# A byte-level tokenizer decodes an unfinished UTF-8 character (its first bytes only) to this replacement character
UNFINISHED_CHARACTER = "\ufffd"
# the checkpoint the front ends open by default: what trainer/train_full_sft.py writes with its default flags
DEFAULT_SAVE_DIR, DEFAULT_WEIGHT, DEFAULT_HIDDEN_SIZE = REPO_ROOT / "out", "full_sft", 256
DEFAULT_REPETITION_PENALTY = 1.0  # off: the same default in chat, the web demo, the server and transformers


def serve_extra_missing(error: ModuleNotFoundError, parse_args: Callable, module_name: str) -> NoReturn:
    """What the web demo and the server do when a library of the serve extra is not installed: run as a script
    (`module_name` "__main__"), answer --help through `parse_args`, else exit with one line saying what to install;
    imported, raise `error`."""
    if module_name != "__main__":
        raise error
    parse_args()
    raise SystemExit(f'error: {error.name} is not installed; install the serving libraries: pip install -e ".[serve]"')


def add_checkpoint_flags(parser: argparse.ArgumentParser, save_dir_names: tuple[str, ...] = ("--save_dir",)) -> None:
    """--model_path, --base_model_path, --device, --dtype: which checkpoint to open and how (model.loading); and
    upstream MiniMind's names for the same choice: --load_from (= --model_path), --weight / --lora_weight under
    --save_dir (`save_dir_names`: that flag's names), picked by --hidden_size and --use_moe as the trainer names
    its directories. `resolve_checkpoint_flags` turns them into model_path and base_model_path."""
    parser.add_argument("--model_path", "--load_from", default=None,
                        help="checkpoint directory written by a training stage, or a LoRA adapter directory "
                             f"(default: <save_dir>/{DEFAULT_WEIGHT}_<hidden_size>, i.e. "
                             f"{DEFAULT_SAVE_DIR / f'{DEFAULT_WEIGHT}_{DEFAULT_HIDDEN_SIZE}'})")
    parser.add_argument("--base_model_path", default=None,
                        help="for a LoRA adapter directory: the base checkpoint (default: the one the adapter "
                             "was trained on, from its adapter_config.json)")
    parser.add_argument("--device", default=None,
                        help="cuda, mps or cpu (default: the first available in that order)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="dtype the model runs in; auto: bfloat16 on CUDA GPUs that have it and on CPUs whose "
                             "bfloat16 matrix products are faster (timed), else float32 (default: %(default)s)")
    upstream = parser.add_argument_group(
        "a checkpoint by stage name, as upstream MiniMind's scripts pick one (instead of --model_path)")
    upstream.add_argument("--weight", default=None,
                          help=f"stage name: opens <save_dir>/<weight>_<hidden_size>[_moe] (default: {DEFAULT_WEIGHT})")
    upstream.add_argument("--lora_weight", default=None,
                          help="LoRA adapter name: opens <save_dir>/<lora_weight>_<hidden_size>[_moe] on the base "
                               "that --weight or --model_path names (default: none; None also means none)")
    upstream.add_argument(*save_dir_names, dest="save_dir", default=str(DEFAULT_SAVE_DIR),
                          help="directory of the checkpoint directories (default: %(default)s)")
    upstream.add_argument("--hidden_size", type=int, default=DEFAULT_HIDDEN_SIZE,
                          help="the <hidden_size> in the directory names, as the trainer wrote them "
                               "(default: %(default)s)")
    upstream.add_argument("--use_moe", type=int, default=0, choices=[0, 1],
                          help="1: the MoE checkpoints, whose directory names end in _moe (default: %(default)s)")


def resolve_checkpoint_flags(args: argparse.Namespace) -> argparse.Namespace:
    """Set args.model_path (and for --lora_weight args.base_model_path) from the checkpoint flags; return args.

    --model_path wins when given; else --weight (default DEFAULT_WEIGHT) names <save_dir>/<weight>_<hidden_size>
    [_moe]. --lora_weight makes that checkpoint the base of the adapter <save_dir>/<lora_weight>_<hidden_size>[_moe]
    (with neither --model_path nor --weight, the base the adapter names in its adapter_config.json).
    Raises:
        SystemExit: --model_path with --weight, --lora_weight with --base_model_path, or a --weight / --lora_weight
            with no checkpoint in --save_dir (the message lists those there).
    """
    lora_weight = None if args.lora_weight in (None, "None", "none") else args.lora_weight
    if args.model_path is not None and args.weight is not None:
        raise SystemExit(f"error: --model_path {args.model_path} and --weight {args.weight} name two checkpoints; "
                         "give one")
    if lora_weight and args.base_model_path is not None:
        raise SystemExit("error: --lora_weight puts the adapter on the base --weight or --model_path names; "
                         "drop --base_model_path")
    base = args.model_path or (stage_dir(args, args.weight, "--weight") if args.weight else None)
    if lora_weight:
        args.model_path, args.base_model_path = stage_dir(args, lora_weight, "--lora_weight"), base
    else:
        args.model_path = base or str(Path(args.save_dir) / checkpoint_dir_name(DEFAULT_WEIGHT, args))
    return args


def checkpoint_dir_name(weight: str, args: argparse.Namespace) -> str:
    """The trainer's name for a stage's directory: <weight>_<hidden_size>[_moe], e.g. full_sft_512_moe."""
    return f"{weight}_{args.hidden_size}{'_moe' if args.use_moe else ''}"


def stage_dir(args: argparse.Namespace, weight: str, flag: str) -> str:
    """<save_dir>/<weight>_<hidden_size>[_moe], or SystemExit listing the checkpoints --save_dir holds."""
    save_dir = Path(args.save_dir)
    directory = save_dir / checkpoint_dir_name(weight, args)
    if not any((directory / name).is_file() for name in ("config.json", "adapter_config.json")):
        held = sorted(path.name for path in save_dir.iterdir() if (path / "config.json").is_file()
                      or (path / "adapter_config.json").is_file()) if save_dir.is_dir() else []
        raise SystemExit(f"error: {flag} {weight}: no checkpoint at {directory} (--hidden_size {args.hidden_size}, "
                         f"--use_moe {args.use_moe}); {save_dir} holds {', '.join(held) or 'no checkpoint'}")
    return str(directory)


def add_chat_flags(parser: argparse.ArgumentParser) -> None:
    """The sampling and conversation flags of the chat front ends (terminal and browser), with their defaults."""
    parser.add_argument("--system_prompt", default=None, help="optional system message (default: none)")
    parser.add_argument("--max_new_tokens", type=int, default=256,
                        help="tokens generated per reply at most (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.85,
                        help="sampling temperature; 0 means greedy decoding (default: 0.85)")
    parser.add_argument("--top_p", type=float, default=0.85, help="nucleus sampling probability mass (default: 0.85)")
    parser.add_argument("--repetition_penalty", type=float, default=DEFAULT_REPETITION_PENALTY,
                        help="divides the logits of tokens already in the text (CTRL), at every temperature; "
                             "1.0 = off, as in the server and transformers (default: %(default)s)")
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
    """Token ids of `messages` rendered as in training (dataset/chat_format.py: the chat template's layout, built
    in Python), ending with the opening of the assistant's turn. `tools` (OpenAI function schemas) go into the
    system turn. Control tokens typed inside a message (<|im_start|>, <|im_end|>, ...) stay plain text, so a user
    cannot open a turn of another role.

    Raises:
        ValueError: when the conversation is refused (an unknown role, a system message that is not first).
    """
    return render_prompt(tokenizer, messages, tools or None)


def generation_config(temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256,
                      repetition_penalty: float = DEFAULT_REPETITION_PENALTY, **options) -> GenerationConfig:
    """The one decoding setup of chat, the web demo, the server, eval/ and the export checks, for `generate`.

    temperature 0 is greedy decoding: the most probable token at every step (do_sample=False), the tokens of
    transformers' `generate(do_sample=False)`, of llama.cpp at temp 0 and of an OpenAI server at temperature 0.
    Otherwise tokens are sampled from softmax(logits / temperature) cut to the top_p mass (Holtzman et al. 2019);
    top_k is switched off (transformers would apply its default top_k=50), so the two settings alone shape the
    sampling, as in the OpenAI API.

    repetition_penalty is CTRL's (Keskar et al. 2019): logits of tokens already in the sequence are divided by it
    (multiplied when negative). It is 1.0 (off) by default in every front end, so "greedy" with default flags is
    plain greedy everywhere; a penalty the user sets applies at every temperature, greedy included (as in vLLM
    and transformers).

    Args:
        options: further GenerationConfig fields (eos_token_id, pad_token_id, stop_strings, ...).
    Fields left unset here come from the checkpoint's generation_config.json when `generate` runs.
    """
    if temperature == 0:
        sampling = {"do_sample": False}
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    return GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, **sampling,
                            **options)


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
        temperature, top_p, repetition_penalty: see `generation_config` (temperature 0: greedy; penalty 1.0: off).
        stop: strings that end the reply where they first appear (they are not part of it).
        parse_tools: take <tool_call> blocks out of the answer into `tool_calls` (held back while streaming).
        seed: seeds torch's generator right before generating, for reproducible sampling (torch takes
            -2**63 to 2**64 - 1; another value ends the reply with the error torch raises).
        lock: held while the model generates, so requests from several threads take turns on one model.
        timeout_s: seconds from now (waiting for the lock included) after which generation ends after the current
            token, as at max_new_tokens (finish_reason "length"); None: no deadline.
        written_out: decode with model/inference.py's loop (its KV cache, its sampling), in the reading thread,
            instead of `model.generate` in a thread: the same tokens for the same settings and seed, but the
            checkpoint's generation_config.json is not read (model/inference.py says what that leaves out).

    After the iteration: `token_ids` (the generated ids, a final <|im_end|> included: the completion's token
    count), `reasoning`, `content`, `tool_calls` ([{"name", "arguments"}]) and `finish_reason` ("stop": end of
    turn or a stop string, "length": max_new_tokens, the deadline or `cancel()` reached, "tool_calls").
    An error in the generating thread is raised by the iteration.

    Generation runs in a thread; the pieces are the decoded text of the tokens so far, less an unfinished UTF-8
    character and less any end that may still become a stop string or a marker, so they add up exactly to
    `tokenizer.decode(token_ids, skip_special_tokens=True)` split by `split_reasoning` (and cut at a stop string).
    """

    def __init__(self, model, tokenizer, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, repetition_penalty: float = DEFAULT_REPETITION_PENALTY, stop: list[str] = (),
                 parse_tools: bool = False, seed: int | None = None, lock: AbstractContextManager | None = None,
                 timeout_s: float | None = None, written_out: bool = False):
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt_ids
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._stop = Event()  # set by cancel(), or when the reader leaves early
        self.eos_ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # <|im_end|> ends a turn, <|endoftext|> a text
        self.generation = generation_config(temperature, top_p, max_new_tokens, repetition_penalty,
                                            eos_token_id=self.eos_ids, pad_token_id=tokenizer.pad_token_id)
        self.written_out = written_out
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
        """Run `model.generate` in a thread (or, written_out, model/inference.py's loop here); yield its new token
        ids as they come."""
        if self.written_out:
            yield from self._written_out_tokens()
            return
        streamer = _TokenQueue()
        Thread(target=self._generate, args=(streamer,), daemon=True).start()
        try:
            while (token := streamer.queue.get()) is not None:
                if isinstance(token, Exception):
                    raise token
                yield token
        finally:
            self._stop.set()

    def _written_out_tokens(self) -> Iterator[int]:
        """model/inference.py's decoding loop with this reply's settings (those `generation_config` gives
        `generate`: top_k off, top_p only when sampling), ending after the current token when _should_stop()."""
        with self.lock:
            if self._should_stop():
                return
            if self.seed is not None:
                torch.manual_seed(self.seed)
            sampling = self.generation.do_sample
            tokens = generate_tokens(
                self.model, torch.tensor([self.prompt], device=self.model.device),
                max_new_tokens=self.generation.max_new_tokens,
                temperature=self.generation.temperature if sampling else 0.0,
                top_p=self.generation.top_p if sampling else 1.0,
                repetition_penalty=self.generation.repetition_penalty,
                stop_token_ids=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
            )
            for token in tokens:
                yield token.item()
                if self._should_stop():
                    return

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
                    generation_config=self.generation,
                    stopping_criteria=StoppingCriteriaList([_StopWhen(self._should_stop)]),
                )
        except Exception as error:  # handed to the reading thread, which raises it
            streamer.queue.put(error)
        finally:  # whatever happened above, the reader must not wait for a token forever
            streamer.queue.put(None)

"""Chat with a trained checkpoint in the terminal, replies streamed token by token.

    python scripts/chat.py --model_path out/full_sft_256                  # interactive, multi-turn
    python scripts/chat.py --model_path out/full_sft_256 --prompt "Tell me a story."
    python scripts/chat.py --model_path out/pretrain_256 --raw 1 --prompt "Once upon a time"
    python scripts/chat.py --model_path out/lora_identity_256 --prompt "Who are you?"   # a LoRA adapter dir
    python scripts/chat.py --weight full_sft --lora_weight lora_identity --hidden_size 256   # upstream's flags

Replies are decoded by model/inference.py, the KV cache and sampling loop written out (prefill, then one token at
a time: repetition penalty, temperature, top-p), which gives token for token what transformers' `generate` gives
with the same settings and `--seed`. `--temperature 0` is plain greedy decoding, the reply
`generate(do_sample=False)` and the server at temperature 0 give; the repetition penalty is off (1.0) unless
`--repetition_penalty` sets it.

Interactive commands: `/clear` forgets the history, `/exit` (or Ctrl-D) quits. With `--raw 1` the text is
continued as it is, without the chat template: the way to try a pretrained-only checkpoint. A reasoning model's
<think>...</think> is hidden unless `--show_thinking 1`; it is never kept in the history (as in Qwen3).
"""

import argparse
import sys

import torch

from model.inference import check_settings
from model.loading import load_checkpoint
from scripts.generation import (ReplyStream, add_chat_flags, add_checkpoint_flags, build_messages, prompt_ids,
                                resolve_checkpoint_flags)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(parser)
    parser.add_argument("--prompt", action="append", default=None,
                        help="a user message; repeat the flag for several turns of one conversation; "
                             "without it the chat is interactive")
    parser.add_argument("--raw", type=int, default=0, choices=[0, 1],
                        help="1: continue the prompt as plain text, no chat template (for pretrained checkpoints)")
    add_chat_flags(parser)
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling (default: none)")
    args = parser.parse_args(argv)
    check_sampling_flags(parser, args)
    return resolve_checkpoint_flags(args)


def check_sampling_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with one line naming the sampling flag out of its range (the ranges model/inference.py accepts)."""
    try:
        check_settings(args.max_new_tokens, args.temperature, 0, args.top_p, args.repetition_penalty)
    except ValueError as error:
        parser.error(f"--{error}")  # each message starts with the setting's name, which is the flag's


def stream_reply(model, tokenizer, ids: list[int], args) -> str:
    """Generate a reply to the prompt `ids` with model/inference.py's decoding loop, print it as it streams (its
    reasoning in <think>...</think> too with --show_thinking 1), and return the answer."""
    reply = ReplyStream(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, repetition_penalty=args.repetition_penalty, written_out=True)
    thinking = False
    for reasoning, content in reply:
        if args.show_thinking and reasoning:
            print(reasoning if thinking else f"<think>\n{reasoning}", end="", flush=True)
            thinking = True
        if content:
            print(f"\n</think>\n\n{content}" if thinking else content, end="", flush=True)
            thinking = False
    print("\n</think>" if thinking else "", flush=True)
    return reply.content


def render_prompt(tokenizer, history: list[dict], args) -> list[int]:
    """The token ids the model continues: the chat template over the kept history, or the raw last message."""
    if args.raw:
        return tokenizer(history[-1]["content"], add_special_tokens=False)["input_ids"]
    return prompt_ids(tokenizer, build_messages(history, args.system_prompt, args.history_turns))


def user_messages(args):
    """The user's turns: the --prompt flags, or lines typed at the prompt until /exit or end of input."""
    if args.prompt:
        for prompt in args.prompt:
            print(f"user: {prompt}")
            yield prompt
        return
    while True:
        try:
            line = input("user: ").strip()
        except EOFError:
            return
        if line == "/exit":
            return
        if line:
            yield line


def main(argv=None):
    args = parse_args(argv)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_checkpoint(args.model_path, args.device, args.base_model_path, args.dtype)
    history: list[dict] = []
    for message in user_messages(args):
        if message == "/clear":
            history.clear()
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": message})
        print("assistant: ", end="", flush=True)
        reply = stream_reply(model, tokenizer, render_prompt(tokenizer, history, args), args)
        history.append({"role": "assistant", "content": reply.strip()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

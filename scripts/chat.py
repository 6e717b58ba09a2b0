"""Chat with a trained checkpoint in the terminal, replies streamed token by token.

    python scripts/chat.py --model_path out/full_sft_256                  # interactive, multi-turn
    python scripts/chat.py --model_path out/full_sft_256 --prompt "Tell me a story."
    python scripts/chat.py --model_path out/pretrain_256 --raw 1 --prompt "Once upon a time"
    python scripts/chat.py --model_path out/lora_identity_256 --prompt "Who are you?"   # a LoRA adapter dir

Interactive commands: `/clear` forgets the history, `/exit` (or Ctrl-D) quits. With `--raw 1` the text is
continued as it is, without the chat template: the way to try a pretrained-only checkpoint.
"""

import argparse
import sys
from pathlib import Path
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from model.loading import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(REPO_ROOT / "out" / "full_sft_256"),
                        help="checkpoint directory written by a training stage (default: %(default)s)")
    parser.add_argument("--base_model_path", default=None,
                        help="for a LoRA adapter directory: the base checkpoint (default: the one the adapter "
                             "was trained on, from its adapter_config.json)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a user message; repeat the flag for several turns of one conversation; "
                             "without it the chat is interactive")
    parser.add_argument("--system_prompt", default=None, help="optional system message (default: none)")
    parser.add_argument("--raw", type=int, default=0, choices=[0, 1],
                        help="1: continue the prompt as plain text, no chat template (for pretrained checkpoints)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="tokens generated per reply at most (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.85,
                        help="sampling temperature; 0 means greedy decoding (default: 0.85)")
    parser.add_argument("--top_p", type=float, default=0.85, help="nucleus sampling probability mass (default: 0.85)")
    parser.add_argument("--repetition_penalty", type=float, default=1.1,
                        help="divides the logits of already generated tokens, 1.0 = off (default: 1.1)")
    parser.add_argument("--history_turns", type=int, default=8,
                        help="earlier user/assistant exchanges kept in the context (default: 8)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling (default: none)")
    parser.add_argument("--device", default=None,
                        help="cuda, mps or cpu (default: the first available in that order)")
    return parser.parse_args(argv)


def stream_reply(model, tokenizer, text: str, args) -> str:
    """Generate a continuation of `text`, print it as it streams, and return it."""
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else \
        dict(do_sample=False)
    generation = dict(
        **inputs, streamer=streamer, max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], **sampling,
    )
    thread = Thread(target=model.generate, kwargs=generation)
    thread.start()
    pieces = []
    for piece in streamer:
        print(piece, end="", flush=True)
        pieces.append(piece)
    thread.join()
    print(flush=True)
    return "".join(pieces)


def render_prompt(tokenizer, history: list[dict], args) -> str:
    """The text the model continues: the chat template over the kept history, or the raw last message."""
    if args.raw:
        return history[-1]["content"]
    kept = history[-(2 * args.history_turns + 1):]
    messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else []) + kept
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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
    model, tokenizer = load_checkpoint(args.model_path, args.device, args.base_model_path)
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

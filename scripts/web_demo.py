"""Chat with a trained checkpoint in the browser (Streamlit): replies streamed token by token, multi-turn.

    python scripts/web_demo.py --model_path out/full_sft_256           # then open http://127.0.0.1:8501
    python scripts/web_demo.py --host 0.0.0.0 --port 8000              # open to other machines, on purpose
    streamlit run scripts/web_demo.py -- --model_path out/full_sft_256 --device cpu --temperature 0.7

The demo listens on 127.0.0.1 (this machine only) and sends Streamlit no usage statistics: `python
scripts/web_demo.py` passes --host and --port to `streamlit run`, and `streamlit run` itself reads
scripts/.streamlit/config.toml, which says the same (open it with `streamlit run --server.address 0.0.0.0`).

The sidebar picks the checkpoint (a directory under --save_dir, alias --out_dir, that holds config.json or a LoRA
adapter's adapter_config.json, or any checkpoint path typed in) and sets the system prompt, temperature (0: greedy),
top_p, max_new_tokens, repetition penalty (1: off, the default), the earlier turns kept, whether the model's
<think> reasoning is shown, and whether it may use tools; the flags give their starting values (upstream MiniMind's
--load_from, --weight, --lora_weight work too). "Clear history" starts a new conversation. Flags go after `--` when
the app is started with `streamlit run`.

"Use tools" offers the model the tools of dataset/tools.py (a calculator, a unit converter, a lookup table), as
trainer/train_agent.py trains it to call them: each <tool_call> of a reply is run, shown with its result, and the
result goes back to the model as a tool message; the model then writes its next reply, for at most MAX_TOOL_TURNS
replies per message (dataset/tools.py's converse_with_tools, as eval/eval_toolcall.py runs it).
"""

import argparse
import sys
from pathlib import Path
from threading import Lock

from dataset.tools import TOOL_SCHEMAS, converse_with_tools
from model.loading import load_checkpoint
from scripts.generation import (ReplyStream, add_chat_flags, add_checkpoint_flags, build_messages, prompt_ids,
                                resolve_checkpoint_flags, serve_extra_missing)

CURSOR = "▌"  # shown at the end of a reply while it streams
LOCALHOST, DEFAULT_PORT = "127.0.0.1", 8501
MAX_TOOL_TURNS = 5  # replies per user message with tools on: calls, then the answer (trainer/train_agent.py's default)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(parser, save_dir_names=("--save_dir", "--out_dir"))  # its directories: the sidebar's list
    add_chat_flags(parser)
    parser.add_argument("--host", default=None,
                        help=f"address to listen on, with `python scripts/web_demo.py`; 0.0.0.0 opens the demo to "
                             f"other machines (default: {LOCALHOST}; under `streamlit run` use --server.address)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"TCP port, with `python scripts/web_demo.py` (default: {DEFAULT_PORT}; under "
                             "`streamlit run` use --server.port)")
    return resolve_checkpoint_flags(parser.parse_args(argv))


try:  # imported after the flags are defined, so that --help works without the serve extra
    import streamlit as st
    from streamlit import runtime
    from streamlit.web import cli as streamlit_cli
except ModuleNotFoundError as missing:
    serve_extra_missing(missing, parse_args, __name__)


def checkpoint_dirs(out_dir: str | Path) -> list[str]:
    """The checkpoints in `out_dir`, sorted: its subdirectories holding config.json (weights) or
    adapter_config.json (a LoRA adapter)."""
    directory = Path(out_dir)
    if not directory.is_dir():
        return []
    return sorted(str(path) for path in directory.iterdir()
                  if (path / "config.json").is_file() or (path / "adapter_config.json").is_file())


@st.cache_resource(max_entries=2, show_spinner="Loading the checkpoint...")
def load_model(path: str, device: str | None, base_model_path: str | None, dtype: str):
    """The checkpoint's model and tokenizer, loaded once for every browser session, and the lock that makes the
    sessions take turns on the model."""
    model, tokenizer = load_checkpoint(path, device, base_model_path, dtype)
    return model, tokenizer, Lock()


def sidebar(args) -> dict:
    """The sidebar's widgets, started from the flags; returns the chosen checkpoint path and settings."""
    bar = st.sidebar
    bar.title("MiniMind")
    choices, flagged = checkpoint_dirs(args.save_dir), str(Path(args.model_path))
    if Path(flagged).is_dir() and flagged not in choices:
        choices.insert(0, flagged)
    first = choices.index(flagged) if flagged in choices else 0 if choices else None
    selected = bar.selectbox("Checkpoint", choices, index=first, format_func=lambda path: Path(path).name,
                             placeholder=f"no checkpoint in {args.save_dir}")
    typed = bar.text_input("...or a checkpoint directory", placeholder="path/to/checkpoint").strip()
    settings = {
        "model_path": typed or selected,
        "system_prompt": bar.text_area("System prompt", value=args.system_prompt or "").strip() or None,
        "temperature": bar.slider("Temperature (0: greedy)", 0.0, 2.0, args.temperature, step=0.05),
        "top_p": bar.slider("Top-p", 0.05, 1.0, args.top_p, step=0.05),
        "max_new_tokens": bar.number_input("Max new tokens", 1, 8192, args.max_new_tokens),
        "repetition_penalty": bar.slider("Repetition penalty (1: off)", 1.0, 2.0, args.repetition_penalty, step=0.05),
        "history_turns": bar.slider("Earlier exchanges kept", 0, 16, args.history_turns),
        "show_thinking": bar.toggle("Show thinking", value=bool(args.show_thinking)),
        "use_tools": bar.toggle("Use tools", help="calculator, unit converter, lookup table (dataset/tools.py)"),
    }
    if bar.button("Clear history"):
        st.session_state.history = []
    return settings


def show_message(message: dict, show_thinking: bool) -> None:
    with st.chat_message(message["role"]):
        # the same two slots as a streamed reply, so that on the next run Streamlit updates them in place rather
        # than leave the streamed reply's answer under the new one until the run ends
        thinking = st.empty()
        if show_thinking and message.get("reasoning"):
            thinking.caption(message["reasoning"])
        if message["role"] == "tool":  # a tool's result, as it went back to the model
            st.code(message["content"], language=None)
        else:
            st.markdown(message["content"])
        show_tool_calls(message)


def show_tool_calls(message: dict) -> None:
    """An assistant's tool calls as code: name(arguments)."""
    for call in message.get("tool_calls") or []:
        st.code(f"{call['name']}({call['arguments']})", language=None)


def stream_answer(model, tokenizer, lock: Lock, history: list[dict], settings: dict,
                  tools: list[dict] | None = None) -> dict:
    """Generate the reply to the last message of `history`, showing it as it streams; return it as a message
    (with its parsed tool calls when `tools`, the schemas offered, are given)."""
    # reasoning is not sent back (Qwen3); tool calls and results are
    earlier = [{key: m[key] for key in ("role", "content", "tool_calls") if key in m} for m in history]
    messages = build_messages(earlier, settings["system_prompt"], settings["history_turns"])
    reply = ReplyStream(model, tokenizer, prompt_ids(tokenizer, messages, tools),
                        max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                        top_p=settings["top_p"], repetition_penalty=settings["repetition_penalty"], lock=lock,
                        parse_tools=tools is not None)
    with st.chat_message("assistant"):
        thinking, answer = st.empty(), st.empty()
        for _ in reply:  # the cursor follows the part still being written: the reasoning, then the answer
            if settings["show_thinking"] and reply.reasoning:
                thinking.caption(reply.reasoning + ("" if reply.content else CURSOR))
            if reply.content:
                answer.markdown(reply.content + CURSOR)
        if settings["show_thinking"] and reply.reasoning:
            thinking.caption(reply.reasoning)
        answer.markdown(reply.content)
        message = {"role": "assistant", "content": reply.content.strip(), "reasoning": reply.reasoning}
        if reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
            show_tool_calls(message)
    return message


def answer(model, tokenizer, lock: Lock, history: list[dict], settings: dict) -> list[dict]:
    """Answer the last message of `history`: one streamed reply, or with "Use tools" on, replies and the results
    of the tools they call (each shown as it comes), for at most MAX_TOOL_TURNS replies. Returns the conversation
    with the new messages."""
    shown = len(history)

    def reply_fn(requests: list[tuple[list[dict], list[dict] | None]]) -> list[dict]:
        nonlocal shown
        [(messages, tools)] = requests  # one conversation: this one
        for message in messages[shown:]:  # the results of the calls of the reply before
            show_message(message, settings["show_thinking"])
        shown = len(messages) + 1  # and this reply, shown as it streams
        return [stream_answer(model, tokenizer, lock, messages, settings, tools)]

    tools = TOOL_SCHEMAS if settings["use_tools"] else None
    [conversation] = converse_with_tools(reply_fn, [(history, tools)], MAX_TOOL_TURNS)
    for message in conversation.messages[shown:]:  # the results of calls in the last reply allowed
        show_message(message, settings["show_thinking"])
    return conversation.messages


def main() -> None:
    args = parse_args(sys.argv[1:])
    st.set_page_config(page_title="MiniMind chat")
    bound = st.get_option("server.address"), st.get_option("server.port")
    if (args.host or bound[0], args.port or bound[1]) != bound:  # given after `streamlit run ... --`: too late
        st.error("--host and --port are flags of `python scripts/web_demo.py`; with `streamlit run`, give "
                 "--server.address and --server.port before the `--`.")
        st.stop()
    settings = sidebar(args)
    if not settings["model_path"]:
        st.info(f"No checkpoint in {args.save_dir}: train one (python trainer/train_full_sft.py) or type a path "
                "in the sidebar.")
        st.stop()
    try:
        model, tokenizer, lock = load_model(settings["model_path"], args.device, args.base_model_path, args.dtype)
    except SystemExit as error:  # load_checkpoint's one-line message for a directory that is no checkpoint
        st.error(str(error))
        st.stop()
    except (OSError, ValueError) as error:  # what transformers raises for files it cannot read: one line of it
        st.error(f"{settings['model_path']} could not be loaded as a checkpoint: {str(error).splitlines()[0]}")
        st.stop()
    history = st.session_state.setdefault("history", [])
    for message in history:
        show_message(message, settings["show_thinking"])
    if prompt := st.chat_input("Message MiniMind"):
        history.append({"role": "user", "content": prompt})
        show_message(history[-1], settings["show_thinking"])
        st.session_state.history = answer(model, tokenizer, lock, history, settings)


def launch(argv: list[str]) -> None:
    """`python scripts/web_demo.py [flags]`: check the flags, then run `streamlit run` on this file, listening on
    --host and --port, with the flags passed on to the app (scripts/.streamlit/config.toml turns Streamlit's usage
    statistics off). Exits when Streamlit does."""
    args = parse_args(argv)
    host, port = args.host or LOCALHOST, args.port or DEFAULT_PORT
    if host not in (LOCALHOST, "localhost"):
        print(f"warning: the web demo listens on {host}:{port}, so whoever can reach this machine there can use "
              "the model", file=sys.stderr)
    sys.argv = ["streamlit", "run", __file__, "--server.address", host, "--server.port", str(port), "--", *argv]
    sys.exit(streamlit_cli.main())


if __name__ == "__main__":
    if runtime.exists():  # started by `streamlit run`
        main()
    else:
        launch(sys.argv[1:])

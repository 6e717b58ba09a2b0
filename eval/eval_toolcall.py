"""Tool-use accuracy of a checkpoint: held-out tasks answered with the tools and without, and how well it calls them.

    python eval/eval_toolcall.py --model_path out/agent_256                    # the shipped 100 held-out tasks
    python eval/eval_toolcall.py --model_path out/tool_sft_256 --limit 20 --output tool_sft.json
    python scripts/serve_openai_api.py --model_path out/agent_256 &            # the same through the OpenAI API
    python eval/eval_toolcall.py --base_url http://127.0.0.1:8998/v1

Each task ({"conversations", "tools", "answer"}: dataset/data/agent/tasks_test.jsonl, 100 GSM8K test questions
with the calculator) is answered twice, with greedy decoding:

    with tools     the tools' schemas in the system turn; each reply's <tool_call> blocks are parsed (as the OpenAI
                   server parses them), run (dataset/tools.py) and their results appended as tool messages, for at
                   most --max_turns assistant turns (dataset/tools.py's converse_with_tools)
    without tools  the same question without the tools: one reply

The conversations advance a turn at a time, --batch_size of them in one left-padded `generate` call. The final
reply is right when its final number (read after any </think>: the first number after "####", else the last
number) equals the task's answer (GSM8K's exact match, dataset/qa_format.py; Cobbe et al. 2021).

Reported: accuracy with and without tools; the share of the calls that are well-formed (a JSON object naming a tool,
with arguments that fit its schema; a <tool_call> block the reply could not parse counts as a malformed call); the
share of tasks with at least one call; calls per task; the share of tasks answered (a final reply, not turns
running out); the share of calls the tool refused (well-formed, but e.g. not arithmetic).

--base_url runs the same conversations against an OpenAI-compatible server (scripts/serve_openai_api.py): POST
/v1/chat/completions with the messages, the tools, temperature 0 and max_tokens; the reply's tool_calls are run
here and sent back as tool messages, one request at a time. On the same checkpoint both modes give the same replies:
the server renders, decodes and parses as this script does (a batch's padding is masked, so it changes no greedy
choice but through float rounding).
"""

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from dataset.lm_dataset import DataFormatError, read_jsonl
from dataset.qa_format import extract_answer, normalize_number
from dataset.rl_dataset import check_prompt_record, prompt_messages_and_tools
from dataset.tools import converse_with_tools
from model.loading import load_checkpoint
from scripts.generation import THINK_CLOSE, generation_config, parse_tool_calls, prompt_ids, split_reasoning

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TASKS = REPO_ROOT / "dataset" / "data" / "agent" / "tasks_test.jsonl"
HTTP_TIMEOUT_S = 600


# ----------------------------------------------------------------------------------------------------------------
# One assistant turn: from the checkpoint here, or from a server


@torch.no_grad()
def local_reply_fn(model, tokenizer, max_new_tokens: int, batch_size: int):
    """reply_fn([(messages, tools), ...]) -> the checkpoint's next assistant message {"content", "tool_calls"} for
    each, greedy, --batch_size conversations per left-padded `generate` call: the reply the server gives (the same
    decoding setup, scripts/generation.py's generation_config at temperature 0, and the same parsing: the
    <think> block split off, the tool calls parsed when tools are offered)."""
    pad_id = tokenizer.pad_token_id
    greedy = generation_config(temperature=0, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                               eos_token_id=[tokenizer.eos_token_id, pad_id])
    device = next(model.parameters()).device

    def reply(requests: list[tuple[list[dict], list[dict] | None]]) -> list[dict]:
        replies = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            prompts = [prompt_ids(tokenizer, messages, tools) for messages, tools in chunk]
            width = max(map(len, prompts))
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompts], device=device)
            attention_mask = (torch.arange(width, device=device)[None] >= torch.tensor(
                [width - len(ids) for ids in prompts], device=device)[:, None]).long()
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=greedy)
            for (_, tools), text in zip(chunk, tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)):
                _, content = split_reasoning(text)
                content, calls = parse_tool_calls(content) if tools else (content, [])
                replies.append({"content": content, "tool_calls": calls})
        return replies

    return reply


def openai_messages(messages: list[dict]) -> list[dict]:
    """Messages in the OpenAI API's form: an assistant's calls as {"id", "type": "function", "function": {"name",
    "arguments"}}, each tool message citing the id of the call it answers."""
    converted, pending = [], []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = [{"id": f"call_{len(converted)}_{i}", "type": "function", "function": call}
                     for i, call in enumerate(message["tool_calls"])]
            converted.append({"role": "assistant", "content": message["content"] or None, "tool_calls": calls})
            pending = [call["id"] for call in calls]
        elif message["role"] == "tool":
            converted.append({"role": "tool", "content": message["content"],
                              "tool_call_id": pending.pop(0) if pending else "call_unknown"})
        else:
            converted.append({"role": message["role"], "content": message["content"]})
    return converted


def read_url(url: str, body: dict | None = None) -> dict:
    """GET `url` (or POST `body` as JSON); the JSON answer. Raises SystemExit with the server's error message, or
    when no server answers at `url`."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = json.loads(error.read() or b"{}").get("error", {}).get("message", error.reason)
        raise SystemExit(f"error: {url} answered {error.code}: {detail}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        raise SystemExit(f"error: --base_url: no server answers at {url} ({getattr(error, 'reason', error)}); start "
                         "one with python scripts/serve_openai_api.py") from None
    except json.JSONDecodeError:
        raise SystemExit(f"error: --base_url: {url} did not answer JSON; is it an OpenAI-compatible server?") from None


def served_model_name(base_url: str) -> str:
    """The one model the server at base_url serves (GET /v1/models)."""
    models = read_url(f"{base_url}/models").get("data") or []
    if not models:
        raise SystemExit(f"error: --base_url {base_url}: GET /models lists no model; pass --model")
    return models[0]["id"]


def server_reply_fn(base_url: str, model_name: str, max_new_tokens: int):
    """reply_fn([(messages, tools), ...]) -> the next assistant message {"content", "tool_calls"} of each, from
    POST <base_url>/chat/completions at temperature 0, one request after the other."""

    def one_reply(messages: list[dict], tools: list[dict] | None) -> dict:
        body = {"model": model_name, "messages": openai_messages(messages), "temperature": 0,
                "max_tokens": max_new_tokens, **({"tools": tools} if tools else {})}
        message = read_url(f"{base_url}/chat/completions", body)["choices"][0]["message"]
        return {"content": message.get("content") or "",
                "tool_calls": [call["function"] for call in message.get("tool_calls") or []]}

    return lambda requests: [one_reply(messages, tools) for messages, tools in tqdm(requests, leave=False)]


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def check_task_record(record: dict) -> None:
    """A task line: a prompt record (dataset/rl_dataset.py) with an "answer"."""
    check_prompt_record(record)
    if "answer" not in record:
        raise DataFormatError(f'missing key "answer" (keys: {sorted(record)})')


def is_correct(reply: str, answer: str) -> bool:
    """GSM8K's exact match of the reply's final number (after any </think>) with the reference answer."""
    return extract_answer(reply.rsplit(THINK_CLOSE, 1)[-1]) == normalize_number(str(answer))


def evaluate_tasks(reply_fn, records: list[dict], max_turns: int) -> list[dict]:
    """Answer every task with its tools (at most max_turns turns) and without; one result per task.

    Returns:
        [{"id", "answer", "with_tools": {"reply", "correct", "answered", "turns", "calls": [{"name", "arguments",
        "well_formed", "error", "result"}]}, "without_tools": {"reply", "correct"}}]
    """
    asked = [prompt_messages_and_tools(record) for record in records]
    with_tools = converse_with_tools(reply_fn, asked, max_turns)
    without_tools = converse_with_tools(reply_fn, [(messages, None) for messages, _ in asked], 1)
    return [{"id": record.get("id"), "answer": record["answer"],
             "with_tools": {"reply": tools.reply, "correct": is_correct(tools.reply, record["answer"]),
                            "answered": tools.answered, "turns": tools.turns,
                            "calls": [vars(call) for call in tools.calls]},
             "without_tools": {"reply": alone.reply, "correct": is_correct(alone.reply, record["answer"])}}
            for record, tools, alone in zip(records, with_tools, without_tools)]


def summarize(results: list[dict]) -> dict:
    """The figures of evaluate_tasks' results: shares over tasks (accuracy, tasks with a call, answered) and over
    calls (well-formed, refused by the tool); None where there is nothing to share out (no calls)."""
    n = len(results)
    calls = [call for result in results for call in result["with_tools"]["calls"]]
    refused = [call for call in calls if call["well_formed"] and call["error"] is not None]
    return {
        "tasks": n,
        "accuracy_with_tools": sum(r["with_tools"]["correct"] for r in results) / n,
        "accuracy_without_tools": sum(r["without_tools"]["correct"] for r in results) / n,
        "well_formed_calls": sum(c["well_formed"] for c in calls) / len(calls) if calls else None,
        "refused_calls": len(refused) / len(calls) if calls else None,
        "tasks_with_a_call": sum(bool(r["with_tools"]["calls"]) for r in results) / n,
        "calls_per_task": len(calls) / n,
        "answered": sum(r["with_tools"]["answered"] for r in results) / n,
    }


def format_summary(summary: dict) -> str:
    """The figures as a few aligned lines."""
    def share(value):
        return "-" if value is None else f"{value:.3f}"
    n = summary["tasks"]
    return "\n".join([
        f"accuracy with tools      {share(summary['accuracy_with_tools'])}  "
        f"({round(summary['accuracy_with_tools'] * n)}/{n})",
        f"accuracy without tools   {share(summary['accuracy_without_tools'])}  "
        f"({round(summary['accuracy_without_tools'] * n)}/{n})",
        f"well-formed calls        {share(summary['well_formed_calls'])}  (of {round(summary['calls_per_task'] * n)} "
        f"calls; refused by the tool: {share(summary['refused_calls'])})",
        f"tasks with a call        {share(summary['tasks_with_a_call'])}",
        f"calls per task           {summary['calls_per_task']:.2f}",
        f"answered                 {share(summary['answered'])}"])


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(REPO_ROOT / "out" / "agent_256"),
                        help="checkpoint directory (or LoRA adapter directory) (default: %(default)s)")
    parser.add_argument("--base_url", default=None,
                        help="evaluate through an OpenAI-compatible server instead, e.g. http://127.0.0.1:8998/v1 "
                             "(scripts/serve_openai_api.py); --model_path, --device and --dtype are then unused")
    parser.add_argument("--model", default=None,
                        help="with --base_url: the model name to request (default: the one /v1/models lists)")
    parser.add_argument("--data_path", default=str(DEFAULT_TASKS),
                        help="tasks jsonl: {\"conversations\" or \"prompt\", \"tools\", \"answer\"} per line "
                             "(default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N tasks (default: all)")
    parser.add_argument("--max_turns", type=int, default=5,
                        help="most assistant turns per task with tools, as trainer/train_agent.py (default: 5)")
    parser.add_argument("--max_new_tokens", type=int, default=64,
                        help="most tokens of each assistant turn, as trainer/train_agent.py (default: 64)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="conversations per generate call, in a turn (default: 16; --base_url: one at a time)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="dtype the model runs in (model/loading.py; default: auto)")
    parser.add_argument("--output", default=None, help="also write the figures and every task's replies and calls "
                                                       "to this JSON file")
    args = parser.parse_args(argv)
    if min(args.limit or 1, args.max_turns, args.max_new_tokens, args.batch_size) < 1:
        parser.error("--limit, --max_turns, --max_new_tokens and --batch_size must be >= 1")
    args.base_url = args.base_url.rstrip("/") if args.base_url else None
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        records = read_jsonl(args.data_path, check_task_record)[:args.limit]
    except DataFormatError as error:
        raise SystemExit(f"error: {error}") from None
    if args.base_url:
        source = args.base_url
        reply_fn = server_reply_fn(args.base_url, args.model or served_model_name(args.base_url), args.max_new_tokens)
    else:
        source = args.model_path
        model, tokenizer = load_checkpoint(args.model_path, args.device, dtype=args.dtype)
        reply_fn = local_reply_fn(model, tokenizer, args.max_new_tokens, args.batch_size)
    results = evaluate_tasks(reply_fn, records, args.max_turns)
    summary = {"source": source, "data_path": args.data_path, "max_turns": args.max_turns,
               "max_new_tokens": args.max_new_tokens, **summarize(results)}
    print(f"tool use: {len(records)} tasks from {args.data_path}, {source}, greedy, at most {args.max_turns} turns "
          f"of {args.max_new_tokens} tokens")
    print(format_summary(summary))
    if args.output:
        Path(args.output).write_text(json.dumps({**summary, "results": results}, indent=2, ensure_ascii=False) + "\n")
    return summary


if __name__ == "__main__":
    main()

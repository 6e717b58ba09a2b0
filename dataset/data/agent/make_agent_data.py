"""Regenerate the GSM8K-derived tool-use files in dataset/data/agent/ from the staged GSM8K copy.

    tasks_train.jsonl   tool-use RL tasks {"id", "conversations", "tools", "answer"}: train records 0-399
    tasks_test.jsonl    held-out tasks, the same form: test records 0-99 (eval/data/gsm8k_test.jsonl's questions)
    tool_sft.jsonl      SFT demonstrations {"id", "conversations", "tools"}: the first 300 train records from 600 on
                        whose calculator annotations the calculator reproduces (see below)

Every task offers the calculator (dataset/tools.py's schema, rendered by the chat template in the system turn) and
asks the GSM8K question in eval/eval_bench.py's zero-shot form ("Question: <q>\\nAnswer:"); `answer` is the final
number of the reference solution. A demonstration is the multi-turn conversation an agent would have: GSM8K's own
calculator annotations, "<<48/2=24>>" in the solution, become one calculator call per assistant turn
({"expression": "48/2"}), each followed by the `tool` message the calculator returns ("24"), and the last assistant
turn answers with the final number. A record is used as a demonstration only when the calculator, run on each
annotated expression, gives the annotated value, the last result is the final answer, and there are at most
MAX_DEMO_CALLS calls (so a demonstration fits trainer/train_agent.py's default --max_turns 5); of the 7,473 train
records, 6,991 pass all but the last test. Records are taken in file order (no sampling): running this twice gives
identical files.

    python dataset/data/agent/make_agent_data.py                    # reads <repo>/../shared/data
    python dataset/data/agent/make_agent_data.py --shared_dir /path/to/data --out_dir /tmp/agent
"""

import argparse
import json
import re
from pathlib import Path

from dataset.qa_format import build_prompt, normalize_number
from dataset.tools import TOOLS, ToolError, calculator

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]

ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")  # GSM8K's calculator calls: <<expression=value>>
MAX_DEMO_CALLS = 4
DEMO_START, DEMO_COUNT = 600, 300  # after the GRPO slices of dataset/data/grpo/ (train records 0-599)
TASK_TOOLS = [TOOLS["calculator"][1]]


def to_task_record(record: dict) -> dict:
    """A staged GSM8K record {"id", "question", "answer", "solution"} -> a tool-use task: the question as the user
    message, the calculator's schema as "tools", and the reference "answer"."""
    return {"id": record["id"], "conversations": [{"role": "user", "content": build_prompt([], record["question"])}],
            "tools": TASK_TOOLS, "answer": record["answer"]}


def calculator_calls(record: dict) -> list[tuple[str, str]] | None:
    """(expression, calculator result) of each annotation of the solution, or None when the record is not a usable
    demonstration: no annotation, more than MAX_DEMO_CALLS, an expression the calculator refuses or computes to
    another value than annotated, or a last result that is not the final answer."""
    annotations = ANNOTATION.findall(record["solution"])
    if not 1 <= len(annotations) <= MAX_DEMO_CALLS:
        return None
    calls = []
    for expression, annotated in annotations:
        try:
            result = calculator(expression)
        except ToolError:
            return None
        if not same_number(result, annotated):
            return None
        calls.append((expression.strip(), result))
    return calls if normalize_number(calls[-1][1]) == normalize_number(record["answer"]) else None


def same_number(result: str, annotated: str) -> bool:
    """Whether the calculator's result is the annotated value (as written in GSM8K: "0.2", "1,200", "$5")."""
    try:
        expected = float(normalize_number(annotated))
    except ValueError:
        return False
    return abs(float(result) - expected) <= 1e-6 * max(1.0, abs(expected))


def to_demo_record(record: dict, calls: list[tuple[str, str]]) -> dict:
    """A task and its solution as a conversation: one calculator call per assistant turn, each answered by a tool
    message, then the final number."""
    messages = to_task_record(record)["conversations"]
    for expression, result in calls:
        messages.append({"role": "assistant", "content": "",
                         "tool_calls": [{"name": "calculator", "arguments": {"expression": expression}}]})
        messages.append({"role": "tool", "content": result})
    messages.append({"role": "assistant", "content": record["answer"]})
    return {"id": record["id"], "conversations": messages, "tools": TASK_TOOLS}


def demo_records(records: list[dict]) -> list[dict]:
    """The first DEMO_COUNT usable demonstrations among records DEMO_START on, in file order."""
    demos = []
    for record in records[DEMO_START:]:
        if (calls := calculator_calls(record)) is not None:
            demos.append(to_demo_record(record, calls))
        if len(demos) == DEMO_COUNT:
            break
    return demos


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared_dir", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="the staged public data (default: %(default)s)")
    parser.add_argument("--out_dir", default=str(HERE), help="where the files go (default: %(default)s)")
    args = parser.parse_args(argv)

    def read(name: str) -> list[dict]:
        with open(Path(args.shared_dir) / "eval" / "gsm8k" / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    train, test = read("gsm8k_train.jsonl"), read("gsm8k_test.jsonl")
    outputs = {"tasks_train.jsonl": [to_task_record(r) for r in train[:400]],
               "tasks_test.jsonl": [to_task_record(r) for r in test[:100]],
               "tool_sft.jsonl": demo_records(train)}
    for name, rows in outputs.items():
        out = Path(args.out_dir) / name
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{out}: {len(rows)} records, {out.stat().st_size / 1000:.1f} kB")


if __name__ == "__main__":
    main()

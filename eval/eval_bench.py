"""Benchmark accuracy of a checkpoint: multiple choice by log-likelihood, and GSM8K by exact match.

    python eval/eval_bench.py --model_path out/full_sft_256 --task mmlu                      # 0-shot, shipped slice
    python eval/eval_bench.py --model_path out/full_sft_256 --task arc_easy --num_fewshot 5
    python eval/eval_bench.py --model_path out/full_sft_256 --task ceval --chat_template 1
    python eval/eval_bench.py --model_path out/full_sft_256 --task gsm8k --num_fewshot 4 --limit 20
    python eval/eval_bench.py --model_path out/full_sft_256 --task arc_easy --per_question arc_easy.jsonl
    python eval/eval_bench.py --model_path out/full_sft_256 --task mmlu --num_fewshot 5 --output mmlu.json \
        --data_path ../shared/data/eval/mmlu/mmlu_test.jsonl --fewshot_path ../shared/data/eval/mmlu/mmlu_dev.jsonl

Multiple choice (MMLU, C-Eval, CMMLU, ARC-Easy/Challenge, TruthfulQA mc1), scored as lm-evaluation-harness scores
its cloze-style tasks (Gao et al., EleutherAI lm-evaluation-harness):

    prompt    = k solved examples "Question: <q>\\nAnswer: <correct choice>\\n\\n" + "Question: <q>\\nAnswer:"
    score(c)  = sum over the tokens of " " + c of log p(token | prompt, the earlier tokens of c)   (nats)
    acc       = fraction of questions where argmax_c score(c) is the answer
    acc_norm  = the same with score(c) / len(c), c's length in characters (lm-eval's length normalization,
                which keeps long choices from losing only for having more tokens)
    chance    = mean over questions of 1 / number of choices (the accuracy of guessing)

The solved examples come from the few-shot file (the dev or train split), same subject first. Each question is
scored once per choice, all (question, choice) pairs batched.

GSM8K: greedy generation after k solved examples whose solutions end in "#### <answer>"; the reply is cut at
the next "Question:", its final answer is the number after "####" (else its last number), and it counts as
correct when it equals the reference answer after normalization (no commas, no $, no trailing ".0").
Chance is 0.

For error analysis, --per_question PATH writes one JSON line per question beside the summary: the question, its
choices and gold answer, the model's choice and the log-likelihood of every choice (GSM8K: the reply, the
extracted and the gold answer), and whether it was right (per_question_rows).

Data: the slices shipped in eval/data/ by default (see eval/data/ATTRIBUTION.md; C-Eval and CMMLU are
non-commercial), any file of the same format with --data_path / --fewshot_path. Sources: Hendrycks et al. 2021
(MMLU), Huang et al. 2023 (C-Eval), Li et al. 2023 (CMMLU), Clark et al. 2018 (ARC), Lin et al. 2022
(TruthfulQA), Cobbe et al. 2021 (GSM8K).
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
from tqdm import tqdm

from dataset.lm_dataset import DataFormatError, pad_collate, read_jsonl
from dataset.qa_format import build_prompt, extract_answer, normalize_number
from model.loading import load_checkpoint
from model.model_minimind import IGNORE_INDEX, token_logprobs
from scripts.generation import generation_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "eval" / "data"

# task -> (evaluation file, few-shot file or None), under eval/data/ unless --data_path / --fewshot_path
TASKS = {
    "mmlu": ("mmlu_test.jsonl", "mmlu_dev.jsonl"),
    "ceval": ("ceval_val.jsonl", "ceval_dev.jsonl"),
    "cmmlu": ("cmmlu_test.jsonl", "cmmlu_dev.jsonl"),
    "arc_easy": ("arc_easy_dev.jsonl", "arc_easy_train.jsonl"),
    "arc_challenge": ("arc_challenge_dev.jsonl", "arc_challenge_train.jsonl"),
    "truthfulqa": ("truthfulqa_mc.jsonl", None),
    "gsm8k": ("gsm8k_test.jsonl", "gsm8k_train.jsonl"),
}
GENERATIVE_TASKS = {"gsm8k"}
STOP_STRING = "Question:"  # a few-shot prompt makes the model go on with a next question: the reply ends there


# ----------------------------------------------------------------------------------------------------------------
# Data


def check_choice_record(record: dict) -> None:
    """A multiple-choice line: "question" a non-empty string, "choices" a list of >= 2 non-empty strings,
    "answer" the 0-based index of the correct choice; "subject", when present, a string.

    Raises:
        DataFormatError: naming the key that is missing or wrong (read_jsonl adds file:line).
    """
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise DataFormatError(f'"question" must be a non-empty string, got {question!r:.40}')
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise DataFormatError(f'"choices" must be a list of at least 2 non-empty strings, got {choices!r:.60}')
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise DataFormatError(f'"answer" must be the 0-based index of a choice (0..{len(choices) - 1}), '
                              f"got {answer!r}")
    if not isinstance(record.get("subject", ""), str):
        raise DataFormatError(f'"subject" must be a string, got {record["subject"]!r:.40}')


def check_math_record(record: dict) -> None:
    """A GSM8K line: "question" and "answer" (the final answer, e.g. "72") strings; "solution", the worked
    solution ending in "#### <answer>", a string when present (few-shot examples need it)."""
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise DataFormatError(f'"{key}" must be a non-empty string, got {record.get(key)!r:.40}')
    if not isinstance(record.get("solution", ""), str):
        raise DataFormatError(f'"solution" must be a string, got {record["solution"]!r:.40}')


def check_math_example(record: dict) -> None:
    """A GSM8K few-shot line: a check_math_record with its "solution"."""
    check_math_record(record)
    if "solution" not in record:
        raise DataFormatError(f'missing key "solution" (keys: {sorted(record)}); few-shot examples show it')


def fewshot_examples(pool: list[dict], by_subject: dict[str, list[dict]], record: dict, k: int) -> list[dict]:
    """The k solved examples shown before `record`: the first ones of its subject in the few-shot file, topped
    up with the file's first examples of other subjects; never the question itself."""
    chosen = []
    for example in itertools.chain(by_subject.get(record.get("subject"), []), pool):
        if len(chosen) == k:
            break
        if example["question"] != record["question"] and all(example is not c for c in chosen):
            chosen.append(example)
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice: log-likelihood of each choice


@torch.no_grad()
def continuation_log_likelihoods(model, requests: list[tuple[list[int], list[int]]], max_len: int,
                                 batch_size: int = 16, pad_token_id: int = 0, progress: bool = False) -> list[float]:
    """log p(continuation | context) = the sum of the log-probabilities of the continuation's tokens, in nats.

    Each request is the token ids of a context and of a continuation, tokenized apart so that exactly the
    continuation's tokens are scored (as lm-evaluation-harness does). The model reads context + continuation,
    cut from the left to max_len tokens when longer; the logits at position t predict token t + 1. Requests
    are sorted by length and batched, right-padded with an attention mask; log-softmax runs in float32.

    Args:
        model: a causal LM called as model(input_ids=..., attention_mask=...) returning `.logits`
            (batch, seq, vocab).
        requests: (context ids, continuation ids) pairs; the context non-empty, the continuation 1 to
            max_len - 1 tokens.
        max_len: the most tokens one forward pass may read (the model's context length).
    Returns:
        one float per request, in the order of `requests`.
    Raises:
        ValueError: a continuation that leaves no room for context in max_len, or an empty context.
    """
    rows = []
    for context, continuation in requests:
        if not context or not 0 < len(continuation) < max_len:
            raise ValueError(f"cannot score a continuation of {len(continuation)} tokens after {len(context)} "
                             f"context tokens within {max_len} tokens; raise --max_seq_len")
        tokens = (context + continuation)[-max_len:]
        labels = [IGNORE_INDEX] * (len(tokens) - len(continuation)) + continuation
        rows.append({"input_ids": torch.tensor(tokens), "labels": torch.tensor(labels)})
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))  # similar lengths: little padding
    device = next(model.parameters()).device
    scores = [0.0] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress):
        indices = order[start:start + batch_size]
        batch = pad_collate([rows[i] for i in indices], pad_token_id)
        attention_mask = batch.get("attention_mask")
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=None if attention_mask is None else attention_mask.to(device)).logits
        per_row = token_logprobs(logits, batch["labels"].to(device)).sum(dim=1)  # (batch,): the continuations'
        for i, score in zip(indices, per_row.tolist()):
            scores[i] = score
    return scores


def evaluate_multiple_choice(model, tokenizer, records: list[dict], pool: list[dict], num_fewshot: int,
                             max_len: int, batch_size: int = 16, chat_template: bool = False,
                             progress: bool = False) -> list[dict]:
    """Score every choice of every question and pick the most likely one (see the module docstring).

    With chat_template the choice follows the assistant prompt directly; in raw text it follows "Answer:"
    after a space.

    Returns:
        per question {"id", "subject", "scores": [nats per choice], "prediction", "prediction_norm",
        "correct", "correct_norm", "chance"}.
    """
    by_subject = {}
    for example in pool:
        by_subject.setdefault(example.get("subject"), []).append(example)
    separator = "" if chat_template else " "
    requests = []
    for record in records:
        shots = [(e["question"], e["choices"][e["answer"]])
                 for e in fewshot_examples(pool, by_subject, record, num_fewshot)]
        prompt = build_prompt(shots, record["question"], tokenizer if chat_template else None)
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        continuations = tokenizer([separator + c for c in record["choices"]], add_special_tokens=False)["input_ids"]
        requests += [(context, continuation) for continuation in continuations]
    scores = continuation_log_likelihoods(model, requests, max_len, batch_size, tokenizer.pad_token_id or 0,
                                          progress)
    results, start = [], 0
    for record in records:
        choices = record["choices"]
        question_scores, start = scores[start:start + len(choices)], start + len(choices)
        prediction = max(range(len(choices)), key=lambda j: question_scores[j])
        prediction_norm = max(range(len(choices)), key=lambda j: question_scores[j] / len(choices[j]))
        results.append({"id": record.get("id"), "subject": record.get("subject"), "scores": question_scores,
                        "prediction": prediction, "prediction_norm": prediction_norm,
                        "correct": prediction == record["answer"], "correct_norm": prediction_norm == record["answer"],
                        "chance": 1 / len(choices)})
    return results


# ----------------------------------------------------------------------------------------------------------------
# GSM8K: generate, extract the final number, exact match


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[str], max_new_tokens: int, max_len: int,
                     batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy continuations of the prompts (scripts.generation.generation_config at temperature 0: the decoding
    of chat and the server at temperature 0), each cut at the first STOP_STRING.

    Prompts are cut from the left so prompt + reply fits max_len tokens, left-padded into batches (the model
    masks the padding), and generation stops at the end-of-turn / end-of-text token or STOP_STRING.
    """
    keep = max(1, max_len - max_new_tokens)
    encoded = [ids[-keep:] for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    pad_id = tokenizer.pad_token_id or 0
    greedy = generation_config(temperature=0, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                               eos_token_id=[tokenizer.eos_token_id, pad_id], stop_strings=[STOP_STRING])
    device = next(model.parameters()).device
    replies = []
    for start in tqdm(range(0, len(encoded), batch_size), desc="generating", unit="batch", disable=not progress):
        batch = encoded[start:start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, tokenizer=tokenizer,
                                generation_config=greedy)
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        replies += [text.split(STOP_STRING, 1)[0] for text in texts]
    return replies


def evaluate_gsm8k(model, tokenizer, records: list[dict], pool: list[dict], num_fewshot: int, max_len: int,
                   max_new_tokens: int = 256, batch_size: int = 16, chat_template: bool = False,
                   progress: bool = False) -> list[dict]:
    """Generate a solution per question and compare its final number with the reference answer.

    Returns:
        per question {"id", "subject" (None unless the record has one), "reply", "prediction", "answer",
        "correct", "chance": 0.0}.
    """
    prompts = []
    for record in records:
        shots = [(e["question"], e["solution"]) for e in fewshot_examples(pool, {}, record, num_fewshot)]
        prompts.append(build_prompt(shots, record["question"], tokenizer if chat_template else None))
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens, max_len, batch_size, progress)
    results = []
    for record, reply in zip(records, replies):
        prediction, answer = extract_answer(reply), normalize_number(record["answer"])
        results.append({"id": record.get("id"), "subject": record.get("subject"), "reply": reply,
                        "prediction": prediction, "answer": answer, "correct": prediction == answer, "chance": 0.0})
    return results


# ----------------------------------------------------------------------------------------------------------------
# Report


def summarize(results: list[dict], default_subject: str = "all") -> dict:
    """Accuracy (and acc_norm for multiple choice) with the chance baseline, overall and per subject.

    Args:
        results: per-question dicts from evaluate_multiple_choice or evaluate_gsm8k.
        default_subject: the subject of questions that have none (TruthfulQA, GSM8K): the task's name.
    Returns:
        {"n", "accuracy", ["acc_norm",] "chance", "subjects": {subject: {same keys without "subjects"}}}, as
        fractions in [0, 1]; subjects in the order they first appear; the overall figures weigh every
        question alike (a micro average).
    """
    def figures(rows: list[dict]) -> dict:
        summary = {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows)}
        if "correct_norm" in rows[0]:
            summary["acc_norm"] = sum(r["correct_norm"] for r in rows) / len(rows)
        return {**summary, "chance": sum(r["chance"] for r in rows) / len(rows)}

    by_subject = {}
    for row in results:
        by_subject.setdefault(row["subject"] or default_subject, []).append(row)
    return {**figures(results), "subjects": {subject: figures(rows) for subject, rows in by_subject.items()}}


def per_question_rows(records: list[dict], results: list[dict]) -> list[dict]:
    """One row per question for error analysis (--per_question): what was asked, what the model answered, the
    gold answer and whether they agree. The rows' "correct" flags average to the summary's accuracy (and
    "correct_norm" to its acc_norm).

    Args:
        records: the evaluated lines of the data file, in order; results: evaluate_multiple_choice's or
            evaluate_gsm8k's dicts for them, in the same order.
    Returns:
        multiple choice: {"index" (0-based line among the evaluated ones), "id", "subject", "question", "choices",
        "answer" (gold index), "prediction" (argmax of the log-likelihoods), "prediction_norm" (argmax of the
        normalized ones), "log_likelihoods" (nats per choice: the sum over its tokens), "log_likelihoods_norm"
        (nats per character of the choice, acc_norm's score), "correct", "correct_norm"};
        GSM8K: {"index", "id", "subject", "question", "reply", "prediction" (the extracted final answer or None),
        "answer" (the gold answer, normalized), "correct"}.
    """
    rows = []
    for index, (record, result) in enumerate(zip(records, results)):
        row = {"index": index, "id": result["id"], "subject": result["subject"], "question": record["question"]}
        if "scores" in result:
            row.update(choices=record["choices"], answer=record["answer"], prediction=result["prediction"],
                       prediction_norm=result["prediction_norm"], log_likelihoods=result["scores"],
                       log_likelihoods_norm=[score / len(choice)
                                             for score, choice in zip(result["scores"], record["choices"])],
                       correct=result["correct"], correct_norm=result["correct_norm"])
        else:
            row.update(reply=result["reply"], prediction=result["prediction"], answer=result["answer"],
                       correct=result["correct"])
        rows.append(row)
    return rows


def format_table(summary: dict) -> str:
    """The per-subject table and the overall line, as printed."""
    norm = "acc_norm" in summary
    width = max(len("overall"), *(len(str(s)) for s in summary["subjects"]))
    header = f"{'subject':<{width}} {'n':>6} {'acc':>7}" + (f" {'acc_norm':>8}" if norm else "") + f" {'chance':>7}"

    def line(name: str, f: dict) -> str:
        return (f"{name:<{width}} {f['n']:>6} {f['accuracy']:>7.3f}" + (f" {f['acc_norm']:>8.3f}" if norm else "")
                + f" {f['chance']:>7.3f}")

    rows = [line(str(subject), f) for subject, f in summary["subjects"].items()]
    return "\n".join([header, *rows, "-" * len(header), line("overall", summary)])


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(REPO_ROOT / "out" / "full_sft_256"),
                        help="checkpoint directory (or LoRA adapter directory) (default: %(default)s)")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="the benchmark")
    parser.add_argument("--num_fewshot", type=int, default=0,
                        help="solved examples before each question, from the few-shot file (default: 0)")
    parser.add_argument("--data_path", default=None,
                        help="evaluation jsonl (default: the task's shipped slice in eval/data/)")
    parser.add_argument("--fewshot_path", default=None,
                        help="jsonl of solved examples (default: the task's shipped dev/train slice; "
                             "truthfulqa has none)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions (default: all)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="(question, choice) pairs per forward pass; prompts per generate call for gsm8k "
                             "(default: 16)")
    parser.add_argument("--max_seq_len", type=int, default=None,
                        help="most tokens the model reads, e.g. the length it was trained at; longer prompts "
                             "lose their beginning (default: the checkpoint's max_position_embeddings)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="gsm8k: reply length in tokens at most "
                                                                        "(default: 256)")
    parser.add_argument("--chat_template", type=int, default=0, choices=[0, 1],
                        help="1: render the prompt as a user turn of the chat template (for SFT checkpoints); "
                             "0: raw text (default: 0)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--per_question", default=None, metavar="PATH",
                        help="also write one JSON line per question to this file, for error analysis: the "
                             "question, its choices or the reply, the gold answer, the model's answer, the "
                             "log-likelihood of each choice, correct or not (per_question_rows)")
    args = parser.parse_args(argv)
    data_file, fewshot_file = TASKS[args.task]
    args.data_path = args.data_path or str(DATA_DIR / data_file)
    args.fewshot_path = args.fewshot_path or (fewshot_file and str(DATA_DIR / fewshot_file))
    if args.num_fewshot < 0 or min(args.limit or 1, args.batch_size, args.max_new_tokens) < 1:
        parser.error("--num_fewshot must be >= 0; --limit, --batch_size and --max_new_tokens >= 1")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        parser.error(f"--max_seq_len must be >= 2 tokens, got {args.max_seq_len}")
    if args.num_fewshot > 0 and args.fewshot_path is None:
        parser.error(f"--task {args.task} has no few-shot split; pass --fewshot_path FILE or --num_fewshot 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    generative = args.task in GENERATIVE_TASKS
    check = check_math_record if generative else check_choice_record
    try:
        records = read_jsonl(args.data_path, check)[:args.limit]
        pool = read_jsonl(args.fewshot_path, check_math_example if generative else check) if args.num_fewshot else []
    except DataFormatError as error:
        raise SystemExit(f"error: {error}") from None
    model, tokenizer = load_checkpoint(args.model_path, args.device)
    max_len = args.max_seq_len or model.config.max_position_embeddings
    evaluate = evaluate_gsm8k if generative else evaluate_multiple_choice
    options = dict(max_new_tokens=args.max_new_tokens) if generative else {}
    try:
        results = evaluate(model, tokenizer, records, pool, args.num_fewshot, max_len, batch_size=args.batch_size,
                           chat_template=bool(args.chat_template), progress=True, **options)
    except ValueError as error:  # a choice too long for --max_seq_len
        raise SystemExit(f"error: {error}") from None
    summary = {"task": args.task, "model_path": args.model_path, "data_path": args.data_path,
               "fewshot_path": args.fewshot_path if args.num_fewshot else None, "num_fewshot": args.num_fewshot,
               "chat_template": bool(args.chat_template), "max_seq_len": max_len, **summarize(results, args.task)}
    print(f"{args.task}: {summary['n']} questions from {args.data_path}, {args.num_fewshot}-shot")
    print(format_table(summary))
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if args.per_question:
        Path(args.per_question).parent.mkdir(parents=True, exist_ok=True)
        Path(args.per_question).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n"
                                                   for row in per_question_rows(records, results)))
    return summary


if __name__ == "__main__":
    main()

r"""Weight quantization for CPU inference: speed and held-out perplexity of one checkpoint, float32 to 4 bits.

    python bench/bench_quantize.py --model_path out/full_sft_256
    python bench/bench_quantize.py --model_path out/pretrain_256 --threads 2 --output quantize.json

Variants, all made from the same checkpoint:
    torch_f32     MiniMind in PyTorch, float32: the reference (eval/eval_ppl.py computes the same perplexity)
    torch_int8    torch.ao.quantization.quantize_dynamic: every nn.Linear's weight in int8 (one scale per
                  tensor), its input quantized to 8 bits on the fly at every call (fbgemm kernels). The API is
                  deprecated in favour of torchao, whose int8 kernels are not faster than float32 on CPU (see the
                  quantization part of docs/serving.md); the row is skipped when torch no longer has it.
    gguf_f32, gguf_f16, gguf_q8_0, gguf_q4_0, gguf_q4_k_m
                  llama.cpp (through llama-cpp-python) on GGUF files written by scripts/convert_model.py to_gguf:
                  q8_0 stores blocks of 32 weights as int8 with one f16 scale (8.5 bits per weight), q4_0 as
                  4-bit integers with one f16 scale (4.5 bits per weight), q4_k_m is llama.cpp's 4-bit K-quant
                  mix (some tensors at 6 bits); norms stay float32.

Measured for each:
    weights MiB   the model's weight bytes (GGUF: the file)
    perplexity    exp(mean NLL) over the held-out file, through eval/eval_ppl.py's windows (--max_seq_len,
                  --stride): the same tokens, ids from our tokenizer, scored with the same contexts. For llama.cpp
                  the logits of every position come from llama-cpp-python (logits_all=True).
    greedy tokens as torch_f32
                  the share of torch_f32's greedy continuations (--greedy_tokens after the first 24 tokens of
                  --greedy_prompts held-out records) the variant reproduces, each counted up to its first
                  difference (after it the contexts differ)
    prefill tok/s one forward pass over --prefill_tokens tokens (best of --repeats)
    decode tok/s  --decode_tokens greedy tokens one at a time with the KV cache, after a 16-token prompt (the
                  prompt included; best of --repeats)

CPU only: the question is CPU inference (quantize_dynamic and this llama.cpp build run on the CPU). Timings depend
on the machine and on what else runs there; the perplexity does not.
"""

import argparse
import importlib.util
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataset.lm_dataset import IGNORE_INDEX
from eval.eval_ppl import detect_format, evaluate_file, scored_sequences, sliding_windows, summarize
from model.loading import load_checkpoint
from scripts.convert_model import write_gguf

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCH_VARIANTS = ("torch_f32", "torch_int8")
GGUF_VARIANTS = ("gguf_f32", "gguf_f16", "gguf_q8_0", "gguf_q4_0", "gguf_q4_k_m")
DECODE_PROMPT_TOKENS = 16  # the prompt the decode timing starts from
GREEDY_PROMPT_TOKENS = 24  # the prompt of each greedy continuation compared with torch_f32's


def best_rate(run, tokens: int, repeats: int) -> float:
    """tokens / seconds of the fastest of `repeats` calls of run() (the least disturbed by other processes)."""
    fastest = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        fastest = min(fastest, time.perf_counter() - start)
    return tokens / fastest


# ----------------------------------------------------------------------------------------------------------------
# PyTorch variants


def quantize_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model with int8 nn.Linear layers (torch.ao's dynamic quantization), or None where torch lacks it."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the API and its quantized tensors are deprecated (torchao), still in torch 2.13
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


@torch.no_grad()
def torch_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """The greedy continuation (num_tokens ids) of `prompt` by a MiniMind model: one forward pass per token,
    with the KV cache."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(num_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([tokens[-1:]]), cache=out.cache, use_cache=True)
    return tokens


@torch.no_grad()
def torch_speed(model, prompt: list[int], args) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of a MiniMind model on the CPU."""
    prefill_ids = torch.tensor([prompt[:args.prefill_tokens]])
    return (best_rate(lambda: model(prefill_ids), prefill_ids.shape[1], args.repeats),
            best_rate(lambda: torch_greedy(model, prompt[:DECODE_PROMPT_TOKENS], args.decode_tokens),
                      args.decode_tokens, args.repeats))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state dict, tied tensors counted once. torch.ao's quantized layers keep their int8
    weight and bias as a tuple there, not as nn.Parameters."""
    total, seen = 0, set()
    for value in model.state_dict().values():
        if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()
        elif isinstance(value, tuple):  # torch.ao packs (int8 weight, bias) per layer
            total += sum(t.numel() * t.element_size() for t in value if isinstance(t, torch.Tensor))
    return total


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp variants


def llama_cpp_perplexity(llm, sequences, max_seq_len: int, stride: int) -> tuple[float, int]:
    """Summed NLL (nats) and number of scored tokens of `sequences` under a llama-cpp-python model.

    The windows and scored tokens are eval_ppl.sliding_windows', so the figure compares with eval_ppl's; llama.cpp
    runs one window at a time (a fresh context each) and returns every position's logits (logits_all=True).
    """
    total_nll, total_tokens = 0.0, 0
    for ids, targets, _ in sequences:
        for window_ids, window_targets in sliding_windows(ids, targets, max_seq_len, stride):
            llm.reset()
            llm.eval(window_ids)
            logits = torch.from_numpy(np.array(llm.scores[:len(window_ids)], dtype=np.float32))  # (seq, vocab)
            targets_after = torch.tensor(window_targets[1:])  # position t predicts token t + 1
            total_nll += F.cross_entropy(logits[:-1], targets_after, ignore_index=IGNORE_INDEX, reduction="sum").item()
            total_tokens += int((targets_after != IGNORE_INDEX).sum())
    return total_nll, total_tokens


def llama_cpp_greedy(llm, prompt: list[int], num_tokens: int) -> list[int]:
    """The greedy continuation (num_tokens ids) of `prompt` by a llama-cpp-python model: its own generation loop
    (KV cache, llama.cpp's greedy sampler at temperature 0)."""
    return [token for token, _ in zip(llm.generate(prompt, temp=0.0, reset=True), range(num_tokens))]


def llama_cpp_speed(llm, prompt: list[int], args) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of a llama-cpp-python model."""
    prefill_ids = prompt[:args.prefill_tokens]

    def prefill():
        llm.reset()
        llm.eval(prefill_ids)

    return (best_rate(prefill, len(prefill_ids), args.repeats),
            best_rate(lambda: llama_cpp_greedy(llm, prompt[:DECODE_PROMPT_TOKENS], args.decode_tokens),
                      args.decode_tokens, args.repeats))


def greedy_agreement(continuations: list[list[int]], reference: list[list[int]]) -> float:
    """The share of the reference's greedy tokens a variant reproduces: per prompt, the tokens before the first
    difference (after it the contexts differ), summed over prompts, over all reference tokens."""
    matched = sum(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(theirs))
                  for ours, theirs in zip(continuations, reference))
    return matched / sum(len(theirs) for theirs in reference)


def open_llama(path: Path, args, logits_all: bool):
    """A llama-cpp-python model on `path` with a context of --max_seq_len tokens and --threads threads."""
    from llama_cpp import Llama

    context = max(args.max_seq_len, args.prefill_tokens, DECODE_PROMPT_TOKENS + args.decode_tokens)
    return Llama(str(path), n_ctx=context, n_batch=context, n_threads=args.threads, n_threads_batch=args.threads,
                 logits_all=logits_all, verbose=False)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def benchmark(args) -> list[dict]:
    """One row per variant: {"variant", "weights_mib", "perplexity", "mean_nll", "tokens", "greedy_agreement",
    "prefill_tokens_per_s", "decode_tokens_per_s"}; a variant that cannot run here is left out with a note."""
    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.model_path, device="cpu", dtype="float32")  # float32 is the reference row
    data_path = Path(args.data_path)
    sequences = scored_sequences(data_path, tokenizer, detect_format(data_path))[:args.limit]
    text_ids = [token for ids, _, _ in sequences for token in ids]  # real text for the speed runs
    greedy_prompts = [ids[:GREEDY_PROMPT_TOKENS] for ids, _, _ in sequences[:args.greedy_prompts]]
    reference_greedy = [torch_greedy(model, prompt, args.greedy_tokens) for prompt in greedy_prompts]

    def row(variant: str, total_nll: float, tokens: int, size: int, greedy, speed: tuple[float, float]) -> dict:
        figures = summarize(total_nll, tokens, sum(num_bytes for _, _, num_bytes in sequences))
        print(f"{variant}: perplexity {figures['perplexity']:.3f}", flush=True)
        return {"variant": variant, "weights_mib": size / 2**20, "perplexity": figures["perplexity"],
                "mean_nll": figures["mean_nll"], "tokens": tokens,
                "greedy_agreement": greedy_agreement([greedy(prompt) for prompt in greedy_prompts], reference_greedy),
                "prefill_tokens_per_s": speed[0], "decode_tokens_per_s": speed[1]}

    rows = []
    for variant in (v for v in args.variants if v in TORCH_VARIANTS):
        quantized = model if variant == "torch_f32" else quantize_dynamic_int8(model)
        if quantized is None:
            print(f"{variant}: skipped, this torch has no torch.ao.quantization.quantize_dynamic", flush=True)
            continue
        figures = evaluate_file(quantized, tokenizer, data_path, args.max_seq_len, args.stride, limit=args.limit,
                                progress=False)
        rows.append(row(variant, figures["mean_nll"] * figures["tokens"], figures["tokens"], weight_bytes(quantized),
                        lambda prompt: torch_greedy(quantized, prompt, args.greedy_tokens),
                        torch_speed(quantized, text_ids, args)))

    gguf_variants = [v for v in args.variants if v in GGUF_VARIANTS]
    if gguf_variants and importlib.util.find_spec("llama_cpp") is None:  # an optional dependency: the export extra
        print(f"{', '.join(gguf_variants)}: skipped, llama-cpp-python is not installed "
              '(pip install -e ".[export]")', flush=True)
        return rows
    with tempfile.TemporaryDirectory() as scratch:
        gguf_dir = Path(args.gguf_dir or scratch)
        gguf_dir.mkdir(parents=True, exist_ok=True)
        for variant in gguf_variants:
            outtype = variant.removeprefix("gguf_")
            path = write_gguf(model, tokenizer, gguf_dir / f"{Path(args.model_path).name}-{outtype}.gguf", outtype)
            total_nll, tokens = llama_cpp_perplexity(open_llama(path, args, logits_all=True), sequences,
                                                     args.max_seq_len, args.stride)
            llm = open_llama(path, args, logits_all=False)
            rows.append(row(variant, total_nll, tokens, path.stat().st_size,
                            lambda prompt: llama_cpp_greedy(llm, prompt, args.greedy_tokens),
                            llama_cpp_speed(llm, text_ids, args)))
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, perplexity change relative to the first row (torch_f32)."""
    reference = rows[0]["perplexity"]
    lines = [f"| variant | weights (MiB) | perplexity | change vs {rows[0]['variant']} | greedy tokens as torch_f32 "
             "| prefill tok/s | decode tok/s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {row['variant']} | {row['weights_mib']:.1f} | {row['perplexity']:.3f} | "
              f"{100 * (row['perplexity'] / reference - 1):+.2f}% | {100 * row['greedy_agreement']:.0f}% | "
              f"{row['prefill_tokens_per_s']:,.0f} | {row['decode_tokens_per_s']:,.0f} |" for row in rows]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(REPO_ROOT / "out" / "full_sft_256"),
                        help="checkpoint directory (or LoRA adapter directory) (default: %(default)s)")
    parser.add_argument("--data_path", default=str(REPO_ROOT / "dataset" / "data" / "pretrain_test.jsonl"),
                        help="held-out jsonl of {\"text\"} or {\"conversations\"} lines (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(TORCH_VARIANTS + GGUF_VARIANTS),
                        help="comma-separated variants to run (default: %(default)s)")
    parser.add_argument("--max_seq_len", type=int, default=256, help="perplexity window in tokens (default: 256)")
    parser.add_argument("--stride", type=int, default=None, help="tokens between windows (default: max_seq_len // 2)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records (default: all)")
    parser.add_argument("--greedy_prompts", type=int, default=8,
                        help="held-out records whose first 24 tokens are continued greedily (default: 8)")
    parser.add_argument("--greedy_tokens", type=int, default=32,
                        help="tokens of each greedy continuation compared with torch_f32's (default: 32)")
    parser.add_argument("--prefill_tokens", type=int, default=256, help="prompt length of the prefill timing (default: 256)")
    parser.add_argument("--decode_tokens", type=int, default=128, help="tokens generated in the decode timing (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats; the fastest counts (default: 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for PyTorch and llama.cpp alike (default: %(default)s, torch's default)")
    parser.add_argument("--gguf_dir", default=None, help="keep the GGUF files here (default: a temporary directory)")
    parser.add_argument("--output", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.variants = [variant.strip() for variant in args.variants.split(",") if variant.strip()]
    unknown = sorted(set(args.variants) - set(TORCH_VARIANTS + GGUF_VARIANTS))
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(TORCH_VARIANTS + GGUF_VARIANTS)}")
    args.stride = args.stride or max(1, args.max_seq_len // 2)
    if args.max_seq_len < 2 or not 1 <= args.stride <= args.max_seq_len:
        parser.error(f"need --max_seq_len >= 2 and 1 <= --stride <= --max_seq_len, got {args.max_seq_len}, {args.stride}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = benchmark(args)
    result = {"model_path": args.model_path, "data_path": args.data_path, "max_seq_len": args.max_seq_len,
              "stride": args.stride, "threads": args.threads, "rows": rows}
    print(markdown_table(rows))
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

"""Training throughput of the shared loop: step time, tokens/s (all and useful), MFU, peak memory; JSON out.

    python bench/bench_train.py                                   # reference shape, pretrain + SFT, + transformers
    python bench/bench_train.py --shapes quick,moe --modes pretrain --steps 5 --output bench/train.json

Each (shape, mode, implementation) runs in a fresh subprocess, so its peak memory (RSS on CPU,
torch.cuda.max_memory_allocated on CUDA) is its own. A run times `--steps` optimizer steps of the real loop's
`optimizer_step` (trainer/trainer_utils.py: forward, backward, clipping, AdamW) on the shipped data after
`--warmup` untimed steps, and reports the median step time and these rates:

- tokens/s (totals over the measured steps, so batches of different lengths weigh by their time): input
  positions per second, padding included; real tokens/s: non-padding tokens (SFT pads a batch
  to its longest sample after length grouping; pretraining blocks are full); useful tokens/s: real tokens that
  carry a loss (SFT: the assistant's replies).
- model FLOPs per token: 6 N (N = weights that multiply: every linear layer and the tied output head, the
  active experts only for MoE; the embedding lookup is free) + 12 L d_attn T for the attention scores
  (PaLM, Chowdhery et al. 2022, appendix B), T the length of the token's own sequence (padding excluded).
- MFU: model FLOP/s on the real tokens (padding is compute spent on nothing) over a peak measured in the same
  run: the median of square matrix products of `--gemm_size` in the run's dtype on the same device.
- `default` rows: what a user gets without flags: `--dtype auto` (bfloat16 where a timed matmul shows this
  machine runs it clearly faster, model/precision.py; the decision is printed) and `--compile auto`, compiled
  when trainer_utils.compile_pays says a run of `--default_run_s` eager seconds earns the compilation back and
  the batches have one shape (pretraining; SFT's varying lengths stay eager).
- `transformers` rows: stock Qwen3ForCausalLM of the same shape in a plain loop (forward with labels, backward,
  clip, AdamW), the reference our model must not be slower than.
- `upstream_padding` rows (SFT only): upstream MiniMind's SFT batching on our model and loop: the same batches
  as `ours`, but every sample padded to `--sft_max_seq_len` and no attention mask, as upstream's SFTDataset and
  train_full_sft.py do. The ratio of useful tokens/s, ours over this row, is what removing the padding buys.
"""

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
QUIET = {**os.environ, "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
SHAPES = {  # name: flags of the shared loop
    "reference": ["--hidden_size", "512", "--num_hidden_layers", "8", "--num_attention_heads", "8",
                  "--num_key_value_heads", "4"],  # MiniMind2-small, upstream's measured shape
    "quick": [],  # the stage scripts' default (4.6M parameters)
    "moe": ["--hidden_size", "512", "--num_hidden_layers", "8", "--num_attention_heads", "8",
            "--num_key_value_heads", "4", "--use_moe", "1", "--num_experts", "4", "--num_experts_per_tok", "1"],
}
DATA = {mode: REPO_ROOT / "dataset" / "data" / f"{mode}.jsonl" for mode in ("pretrain", "sft")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="reference", help=f"comma-separated of {sorted(SHAPES)}")
    parser.add_argument("--modes", default="pretrain,sft", help="comma-separated of pretrain, sft")
    parser.add_argument("--impls", default="default,ours,transformers,upstream_padding",
                        help="comma-separated of default (--dtype auto --compile auto), ours, transformers, "
                             "upstream_padding (SFT only)")
    parser.add_argument("--default_run_s", type=float, default=600.0,
                        help="the eager run length (s) the default row's --compile auto decides for")
    parser.add_argument("--device", default=None, help="cuda | mps | cpu (default: the first available)")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated of auto, float32, bfloat16, float16 (autocast) for the ours, "
                             "transformers and upstream_padding rows; default: bfloat16 and float32 on CUDA and on "
                             "CPUs where --dtype auto picks bfloat16, else float32 (bfloat16 on a CPU without native "
                             "bf16 is ~100x slower)")
    parser.add_argument("--batch_size", type=int, default=16, help="samples per step")
    parser.add_argument("--max_seq_len", type=int, default=256, help="pretraining block length, tokens")
    parser.add_argument("--sft_max_seq_len", type=int, default=768, help="SFT sample cap, tokens (upstream: 768)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median step time; rates over all of them)")
    parser.add_argument("--gemm_size", type=int, default=2048, help="side of the square GEMM measuring the peak")
    parser.add_argument("--compile", type=int, choices=(0, 1), default=0, help="1: torch.compile the model")
    parser.add_argument("--keep_freed_memory", type=int, choices=(0, 1), default=1,
                        help="CPU: the shared loop's allocator setting (trainer_utils.keep_freed_memory); 0: glibc's "
                             "default, to measure its effect")
    parser.add_argument("--output", help="also write the results as JSON here")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # "shape,mode,impl": run one case in this process
    return parser.parse_args(argv)


def gemm_peak_flops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 20) -> float:
    """Median FLOP/s of (size x size) @ (size x size) in `dtype` on `device` (2 size^3 FLOPs each)."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times[1:])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_flops_per_token(config, seq_len: int) -> float:
    """6 N + 12 L d_attn T (PaLM appendix B); N counts the weights of every matmul, active experts only."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    d_attn = config.num_attention_heads * config.head_dim
    d_kv = config.num_key_value_heads * config.head_dim
    attention = hidden * d_attn * 2 + hidden * d_kv * 2  # q, o and k, v projections
    if config.use_moe:
        mlp = 3 * hidden * config.moe_intermediate_size * config.num_experts_per_tok + hidden * config.num_experts
    else:
        mlp = 3 * hidden * config.intermediate_size
    n = layers * (attention + mlp) + config.vocab_size * hidden  # + the output head
    return 6 * n + 12 * layers * d_attn * seq_len


def pad_like_upstream(batch: dict, length: int, pad_token_id: int) -> dict:
    """A collated SFT batch as upstream MiniMind trains it: every row right-padded to `length`, no attention mask.

    Right padding leaves the real tokens' outputs unchanged under the causal mask, and the padded positions carry
    no loss (labels -100), so the loss is the same; only the compute on padding is added.
    """
    from dataset.lm_dataset import IGNORE_INDEX
    extra = length - batch["input_ids"].shape[1]
    return {"input_ids": torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_token_id),
            "labels": torch.nn.functional.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)}


def run_case(shape: str, mode: str, impl: str, args) -> dict:
    """Time one case in this process; return its figures."""
    from dataset.lm_dataset import IGNORE_INDEX, PretrainDataset, SFTDataset
    from trainer.trainer_utils import (build_optimizer, causal_lm_loss, compile_pays, epoch_batches, keep_freed_memory,
                                       load_model, optimizer_step, setup_run)
    from trainer.trainer_utils import parse_args as parse_train_args

    seq_len = args.max_seq_len if mode == "pretrain" else args.sft_max_seq_len
    flags = [*SHAPES[shape], "--max_seq_len", str(seq_len), "--batch_size", str(args.batch_size),
             "--dtype", args.dtype or "auto", "--data_path", str(DATA[mode]), "--from_weight", "none"]
    if args.device:
        flags += ["--device", args.device]
    train_args = parse_train_args(mode, "bench", argv=flags)
    setup_run(train_args)  # device, dtype (--dtype auto measured), seeds, as a stage script does
    device = torch.device(train_args.device)
    if device.type == "cpu" and args.keep_freed_memory:  # as train() does; for the transformers rows too
        keep_freed_memory()
    model, tokenizer = load_model(train_args)
    dataset = (PretrainDataset(DATA[mode], tokenizer, seq_len) if mode == "pretrain"
               else SFTDataset(DATA[mode], tokenizer, seq_len))
    batches = epoch_batches(len(dataset), args.batch_size, train_args.seed, 0, getattr(dataset, "lengths", None))
    batches = batches[:args.warmup + args.steps]
    collated = [dataset.collate([dataset[i] for i in batch]) for batch in batches]
    useful = [int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in collated]
    tokens = [batch["input_ids"].numel() for batch in collated]
    row_lengths = [batch["attention_mask"].sum(dim=1).tolist() if "attention_mask" in batch
                   else [batch["input_ids"].shape[1]] * len(batch["input_ids"]) for batch in collated]
    real = [sum(lengths) for lengths in row_lengths]
    if impl == "upstream_padding":
        collated = [pad_like_upstream(batch, seq_len, tokenizer.pad_token_id) for batch in collated]
        tokens = [batch["input_ids"].numel() for batch in collated]
    flops = [sum(n * model_flops_per_token(model.config, n) for n in lengths) for lengths in row_lengths]
    autocast = (nullcontext() if train_args.dtype == "float32"
                else torch.autocast(device.type, getattr(torch, train_args.dtype)))

    compiled = bool(args.compile)
    if impl == "default":
        # as the loop's --compile auto decides: SFT's batches vary in length, so it stays eager
        compiled = mode == "pretrain" and compile_pays(args.default_run_s, device.type)
    if impl in ("ours", "upstream_padding", "default"):
        model.to(device)
        net = torch.compile(model) if compiled else model
        optimizer = build_optimizer(model, train_args)
        scaler = torch.amp.GradScaler(device.type, enabled=train_args.dtype == "float16")

        def step(batch):
            optimizer_step(net, [batch], causal_lm_loss, optimizer, scaler, autocast, train_args)
    else:
        from transformers import Qwen3ForCausalLM
        from model.hf_config import qwen3_config_of
        if model.config.use_moe:
            raise SystemExit("the transformers reference runs the dense shapes")
        reference = Qwen3ForCausalLM(qwen3_config_of(model.config)).to(device)
        net = torch.compile(reference) if args.compile else reference
        optimizer = build_optimizer(reference, train_args)

        def step(batch):
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast:
                loss = net(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), train_args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for batch in collated:
        synchronize(device)
        start = time.perf_counter()
        step(batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    first_step_time, times = times[0], times[args.warmup:]  # the first step compiles, when compiling
    step_time = statistics.median(times)
    flops_per_token = sum(flops[args.warmup:]) / sum(real[args.warmup:])  # mean over the measured real tokens
    measured_tokens, measured_real, measured_useful = tokens[args.warmup:], real[args.warmup:], useful[args.warmup:]
    tokens_per_s = sum(measured_tokens) / sum(times)
    real_per_s = sum(measured_real) / sum(times)
    useful_per_s = sum(measured_useful) / sum(times)
    model_flops_per_s = sum(flops[args.warmup:]) / sum(times)
    peak = gemm_peak_flops(device, getattr(torch, train_args.dtype), args.gemm_size)
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"shape": shape, "mode": mode, "impl": impl, "compile": compiled, "device": str(device),
            "dtype": train_args.dtype, "threads": torch.get_num_threads(),
            "keep_freed_memory": bool(args.keep_freed_memory and device.type == "cpu"), "batch_size": args.batch_size,
            "seq_len": seq_len, "parameters": sum(p.numel() for p in model.parameters()),
            "dtype_reason": train_args.dtype_reason, "first_step_s": first_step_time,
            "step_time_s": step_time, "tokens_per_s": tokens_per_s, "real_tokens_per_s": real_per_s,
            "useful_tokens_per_s": useful_per_s, "real_fraction": sum(measured_real) / sum(measured_tokens),
            "useful_fraction": sum(measured_useful) / sum(measured_tokens), "model_flops_per_token": flops_per_token,
            "model_tflops_per_s": model_flops_per_s / 1e12, "gemm_peak_tflops_per_s": peak / 1e12,
            "mfu": model_flops_per_s / peak, "peak_memory_mb": memory / 2 ** 20}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.single:
        print(json.dumps(run_case(*args.single.split(","), args)))
        return
    passed = [arg for arg in (argv if argv is not None else sys.argv[1:])]
    results = []
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    from model.precision import resolve_dtype
    fast_bf16 = cuda or resolve_dtype("auto", args.device or "cpu").dtype == "bfloat16"
    dtypes = (args.dtype or ("bfloat16,float32" if fast_bf16 else "float32")).split(",")
    for shape, mode, impl, dtype in itertools.product(args.shapes.split(","), args.modes.split(","),
                                                      args.impls.split(","), dtypes):
        if (impl == "transformers" and "--use_moe" in SHAPES[shape]) or (
                impl == "upstream_padding" and mode != "sft"):
            continue
        if impl == "default":  # once per shape and mode, in the dtype --dtype auto picks
            if dtype != dtypes[0]:
                continue
            dtype = "auto"
        done = subprocess.run([sys.executable, __file__, *passed, "--dtype", dtype,
                               "--single", f"{shape},{mode},{impl}"],
                              capture_output=True, text=True, env=QUIET)
        if done.returncode != 0:
            raise SystemExit(f"{shape},{mode},{impl},{dtype} failed:\n{done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print_row(results[-1], header=len(results) == 1)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'shape':<10}{'mode':<9}{'impl':<18}{'device':<7}{'dtype':<9}{'params':>8}{'step s':>8}"
              f"{'tok/s':>9}{'real/s':>8}{'useful/s':>10}{'real':>6}{'useful':>8}{'MFU':>7}{'peak TF':>9}{'mem MB':>8}")
    print(f"{r['shape']:<10}{r['mode']:<9}{r['impl'] + ('+c' if r['compile'] else ''):<18}{r['device']:<7}"
          f"{r['dtype']:<9}{r['parameters'] / 1e6:>7.1f}M{r['step_time_s']:>8.2f}{r['tokens_per_s']:>9,.0f}"
          f"{r['real_tokens_per_s']:>8,.0f}{r['useful_tokens_per_s']:>10,.0f}{r['real_fraction']:>6.0%}"
          f"{r['useful_fraction']:>8.0%}{r['mfu']:>7.1%}"
          f"{r['gemm_peak_tflops_per_s']:>9.3f}{r['peak_memory_mb']:>8,.0f}", flush=True)
    if r["impl"] == "default":
        print(f"  default dtype: {r['dtype_reason']}", flush=True)


if __name__ == "__main__":
    main()

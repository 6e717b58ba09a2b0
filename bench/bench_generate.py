"""Generation speed with the KV cache: prefill and decode tokens/s, ours against transformers' Qwen3; JSON out.

    python bench/bench_generate.py                               # quick and reference shapes, batch 1 and 8
    python bench/bench_generate.py --shapes reference --batch_sizes 1 --output bench/generate.json

Both models get the same random weights (ours saved, then opened by Qwen3ForCausalLM.from_pretrained through
the stock Qwen3 config of model/hf_config.py) and run `generate` greedily with the same prompt tokens:
- prefill tokens/s: batch x prompt tokens / the time of a `generate` that makes 1 new token;
- decode tokens/s: batch x (N - 1) / (time to make N new tokens - time to make 1), the cached steps only.
Medians over `--repeats` runs after one untimed run. The end-of-sequence token is disabled so every run makes
exactly N tokens.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen3ForCausalLM

from model.hf_config import qwen3_config_of
from model.loading import default_device
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

SHAPES = {
    "quick": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "reference": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="quick,reference", help=f"comma-separated of {sorted(SHAPES)}")
    parser.add_argument("--batch_sizes", default="1,8", help="comma-separated prompts per generate call")
    parser.add_argument("--prompt_len", type=int, default=128, help="prompt tokens per sequence")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    parser.add_argument("--device", default=default_device(), help="cuda | mps | cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights dtype (float32 on CPUs without native bf16)")
    parser.add_argument("--output", help="also write the results as JSON here")
    return parser.parse_args(argv)


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Median seconds of a greedy `generate` making exactly `new_tokens` tokens per sequence (one untimed run)."""
    times = []
    for _ in range(repeats + 1):
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(model, batch_size: int, args) -> dict:
    """Prefill and decode tokens/s of `model` for `batch_size` prompts of args.prompt_len random tokens."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(9, model.config.vocab_size, (batch_size, args.prompt_len), generator=generator)
    input_ids = input_ids.to(args.device)
    first = timed_generate(model, input_ids, 1, args.repeats)
    full = timed_generate(model, input_ids, args.new_tokens, args.repeats)
    return {"prefill_tokens_per_s": batch_size * args.prompt_len / first,
            "decode_tokens_per_s": batch_size * (args.new_tokens - 1) / (full - first)}


def main(argv=None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype)
    results = []
    print(f"{'shape':<10}{'batch':>6}  {'impl':<13}{'prefill tok/s':>14}{'decode tok/s':>14}")
    for shape in args.shapes.split(","):
        torch.manual_seed(0)
        ours = MiniMindForCausalLM(MiniMindConfig(**SHAPES[shape]))
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            ours.save_pretrained(tmp)
            reference = Qwen3ForCausalLM.from_pretrained(tmp, config=qwen3_config_of(ours.config))
            models = {"ours": ours.to(args.device, dtype).eval(),
                      "transformers": reference.to(args.device, dtype).eval()}
            for batch_size in map(int, args.batch_sizes.split(",")):
                for impl, model in models.items():
                    row = {"shape": shape, "batch_size": batch_size, "impl": impl, "device": args.device,
                           "dtype": args.dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                           **measure(model, batch_size, args)}
                    results.append(row)
                    print(f"{shape:<10}{batch_size:>6}  {impl:<13}{row['prefill_tokens_per_s']:>14,.0f}"
                          f"{row['decode_tokens_per_s']:>14,.0f}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

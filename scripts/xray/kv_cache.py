"""What the KV cache saves: decode time per token with and without it, against the length of the text so far.

    python scripts/xray/kv_cache.py                       # the trainer's default shape: hidden 256, 4 layers
    python scripts/xray/kv_cache.py --lengths 128 512 2048 --hidden_size 512 --num_hidden_layers 8

Without a cache, choosing the token after T tokens means a forward over all T of them: the keys and values of every
earlier token are computed again at every step, so the time per token grows with T (the attention part with T^2).
With the cache (model/inference.py: KVCache, prefill, decode_step) a step is a forward over one token plus one row
of attention against T cached keys: nearly flat in T until that row dominates. The price is the cache's memory,
printed in the last column: 2 * layers * num_key_value_heads * T * head_dim numbers per sequence.

The model has random weights (the time of a forward does not depend on their values). Each figure is the median
wall-clock time of --steps steps after one warm-up step; on a machine shared with other work, read them as
indicative.
"""

import argparse
import statistics
import time

import torch

from model.inference import KVCache, decode_step, prefill
from model.loading import default_device
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.precision import resolve_dtype


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024],
                        help="numbers of tokens already in the text (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="decode steps timed per length (default: %(default)s)")
    parser.add_argument("--hidden_size", type=int, default=256, help="model width (default: %(default)s)")
    parser.add_argument("--num_hidden_layers", type=int, default=4, help="decoder layers (default: %(default)s)")
    parser.add_argument("--num_attention_heads", type=int, default=8, help="query heads (default: %(default)s)")
    parser.add_argument("--num_key_value_heads", type=int, default=4,
                        help="key/value heads, the cache's width (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available in that order)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="dtype the model runs in; auto: what this device runs fastest, as chat picks it "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if min([*args.lengths, args.steps, args.hidden_size, args.num_hidden_layers, args.num_attention_heads,
            args.num_key_value_heads]) < 1:
        parser.error("--lengths, --steps and the shape flags must be at least 1")
    return args


def median_ms(step, steps: int, device: torch.device) -> float:
    """Median wall-clock milliseconds of step(0), ..., step(steps - 1), GPU work included."""
    times = []
    for i in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@torch.no_grad()
def time_length(model, length: int, steps: int) -> tuple[float, float]:
    """(ms per token with the cache, ms per token without) when `length` tokens are already in the text."""
    device = model.device
    ids = torch.randint(3, model.config.vocab_size, (1, length + steps + 1), device=device)

    def uncached(i):  # the whole text again: T + i tokens in, the next token's logits out
        model(input_ids=ids[:, :length + i], logits_to_keep=1)

    uncached(0)  # warm-up
    without = median_ms(uncached, steps, device)

    cache = KVCache(model.config, 1, length + steps + 1, model.dtype, device)
    mask = torch.ones(1, length, dtype=torch.long, device=device)
    prefill(model, ids[:, :length], mask, cache)
    masks = [torch.ones(1, length + i + 1, dtype=torch.long, device=device) for i in range(steps + 1)]

    def cached(i):  # one token in, against the length + i cached ones
        decode_step(model, ids[:, length + i], masks[i], torch.tensor([length + i], device=device), cache)

    cached(0)  # warm-up: position `length`
    with_cache = median_ms(lambda i: cached(i + 1), steps, device)
    return with_cache, without


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or default_device())
    dtype = getattr(torch, resolve_dtype(args.dtype, device.type).dtype)
    torch.manual_seed(0)
    try:
        config = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                num_attention_heads=args.num_attention_heads,
                                num_key_value_heads=args.num_key_value_heads)
    except ValueError as error:  # a shape the model cannot have
        raise SystemExit(f"error: {error}; change --hidden_size, --num_attention_heads or --num_key_value_heads")
    model = MiniMindForCausalLM(config).to(device=device, dtype=dtype).eval()
    bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize
    print(f"device {device}, {dtype}, {torch.get_num_threads()} threads; hidden_size {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, {config.num_attention_heads} query / {config.num_key_value_heads} "
          f"key-value heads of {config.head_dim}; median of {args.steps} steps")
    print(f"{'tokens so far':>13} | {'with cache ms/token':>19} | {'without ms/token':>16} | {'speed-up':>8} | "
          f"{'KV cache MB':>11}")
    for length in args.lengths:
        with_cache, without = time_length(model, length, args.steps)
        print(f"{length:>13} | {with_cache:>19.2f} | {without:>16.2f} | {without / with_cache:>7.1f}x | "
              f"{length * bytes_per_token / 2**20:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

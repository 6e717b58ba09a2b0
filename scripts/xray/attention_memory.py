"""What flash attention saves: peak memory of attention written out against F.scaled_dot_product_attention.

    python scripts/xray/attention_memory.py                       # the trainer's default heads: 8 x 32, 4 key/value
    python scripts/xray/attention_memory.py --lengths 1024 4096 --batch_size 4 --device cuda

Written out (model/model_minimind.py: eager_attention), softmax(Q K^T / sqrt(d)) V makes the whole
(batch, heads, T, T) score matrix, then a masked copy and its softmax: memory grows as T^2 (the third column gives
one such matrix, computed from its shape). SDPA's flash kernel computes the same output walking the keys block by
block with a running maximum and sum (the online softmax), so besides the output it holds a few tiles of scores:
memory grows as T. Both run causal, as in a prefill, on random q, k, v (which exist before and are not counted;
the output is).

How memory is measured. CUDA: torch.cuda.max_memory_allocated during the call, above what was held before:
everything the allocator handed out, kernel workspace included. CPU: torch.profiler with profile_memory=True,
which records the bytes each operation allocates and frees; summed in time order over the top-level operations,
they give what is held after each operation returns, and the peak of that is printed. Workspace an operation
frees before it returns is netted out there (for the CPU flash kernel, tiles of q-block x kv-block scores per
thread: a fixed size, not T^2). Memory figures do not depend on the load of the machine.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from model.loading import default_device
from model.model_minimind import eager_attention


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                        help="sequence lengths T (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=1, help="sequences (default: %(default)s)")
    parser.add_argument("--num_attention_heads", type=int, default=8, help="query heads (default: %(default)s)")
    parser.add_argument("--num_key_value_heads", type=int, default=4, help="key/value heads (default: %(default)s)")
    parser.add_argument("--head_dim", type=int, default=32, help="width of a head (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of q, k, v (default: %(default)s)")
    args = parser.parse_args(argv)
    if min([*args.lengths, args.batch_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim]) < 1:
        parser.error("--lengths, --batch_size, --num_attention_heads, --num_key_value_heads and --head_dim must be "
                     "at least 1")
    if args.num_attention_heads % args.num_key_value_heads:
        parser.error("--num_attention_heads must be a multiple of --num_key_value_heads")
    return args


def peak_bytes_cpu(attend) -> int:
    """Peak bytes held after each top-level operation of attend() (its output included), from torch.profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        output = attend()
        del output
    top_level = sorted((event for event in prof.events() if event.cpu_parent is None),
                       key=lambda event: event.time_range.start)
    held = peak = 0
    for event in top_level:  # an operation's allocations minus its frees ("[memory]" events: frees between ops)
        held += event.cpu_memory_usage
        peak = max(peak, held)
    return peak


def peak_bytes_cuda(attend, device: torch.device) -> int:
    """Peak bytes the CUDA allocator handed out during attend(), above what was held before."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    output = attend()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del output
    return peak


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {device}: memory is measured on cpu or cuda only")
    dtype = getattr(torch, args.dtype)
    measure = peak_bytes_cpu if device.type == "cpu" else lambda attend: peak_bytes_cuda(attend, device)
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    print(f"device {device}, {dtype}, batch {args.batch_size}, {heads} query / {kv_heads} key-value heads of "
          f"{args.head_dim}, causal; memory by {'torch.profiler' if device.type == 'cpu' else 'the CUDA allocator'}")
    print(f"{'T':>6} | {'one (B,H,T,T) MB':>16} | {'written out MB':>14} | {'SDPA MB':>8} | {'ratio':>7}")
    torch.manual_seed(0)
    for length in args.lengths:
        q = torch.randn(args.batch_size, heads, length, args.head_dim, device=device, dtype=dtype)
        k = torch.randn(args.batch_size, kv_heads, length, args.head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        with torch.no_grad():
            written_out = measure(lambda: eager_attention(q, k, v, is_causal=True))
            sdpa = measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        scores = args.batch_size * heads * length * length * dtype.itemsize
        print(f"{length:>6} | {scores / 2**20:>16.1f} | {written_out / 2**20:>14.1f} | {sdpa / 2**20:>8.2f} | "
              f"{written_out / sdpa:>6.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""X-ray of weight quantization: int8 absmax and 4-bit block quantization of real weights, by hand.

    python scripts/xray/quantize.py                                   # out/full_sft_256, after README command 1
    python scripts/xray/quantize.py --model_path out/pretrain_256 --weight model.layers.1.self_attn.q_proj.weight

Both schemes store each weight as a small integer q and a float scale s, and use s * q in its place:

    int8 absmax, one scale per output row (LLM.int8's vector-wise quantization, Dettmers et al. 2022, sec. 3):
        s_row = max_j |W_row,j| / 127,   q = round(W / s_row) in [-127, 127]                   8 bits + 1 scale a row
    4-bit blocks of 32 weights along a row, one scale a block (llama.cpp's q4_0 idea, symmetric here):
        s_blk = max |W_blk| / 7,         q = round(W / s_blk) in [-8, 7]             4 bits + 16 bits / 32 = 4.5 bits

The error of a weight is at most s / 2, so one large weight (an outlier) in a row or block makes the scale, and so
the error, of all its neighbours large: smaller groups (blocks of 32) follow the weights more closely, which is
how 4 bits stay usable. The script prints, for one weight matrix, the error of each scheme; then it replaces every
linear layer's weight of the model by its dequantized copy (the embedding, tied to the output head, and the norms
stay float32) and measures the held-out perplexity (eval/eval_ppl.py) of each.
"""

import argparse
import math
from pathlib import Path

import torch

from eval.eval_ppl import evaluate_file
from model.loading import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32  # weights per 4-bit block, as llama.cpp's q4_0


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 absmax quantization with one scale per row (Dettmers et al. 2022, vector-wise):

        scale_i = max_j |W_ij| / 127,    q_ij = round(W_ij / scale_i) in [-127, 127],    W_ij ~= q_ij * scale_i

    Args:
        weight: (out_features, in_features) float tensor.
    Returns:
        (q: (out, in) int8 in [-127, 127], scale: (out, 1) float32), so that weight ~= q * scale.
    """
    scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 127
    return torch.round(weight.float() / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_4bit_blocks(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit quantization in blocks of `block` consecutive weights of a row, one scale per block:

        scale_b = max_{j in b} |W_j| / 7,    q_j = clamp(round(W_j / scale_b), -8, 7),    W_j ~= q_j * scale_b

    Args:
        weight: (out_features, in_features) float tensor, in_features divisible by `block`.
    Returns:
        (q: (out, in / block, block) int8 holding values in [-8, 7], scale: (out, in / block, 1) float16), so that
        weight ~= (q * scale).reshape(out, in). The scale is float16 as llama.cpp stores it.
    Raises:
        ValueError: in_features is not a multiple of `block`.
    """
    rows, columns = weight.shape
    if columns % block:
        raise ValueError(f"a row of {columns} weights does not split into blocks of {block}")
    blocks = weight.float().reshape(rows, columns // block, block)
    scale = (blocks.abs().amax(dim=2, keepdim=True).clamp(min=1e-12) / 7).half()
    return torch.round(blocks / scale.float()).clamp(-8, 7).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """s * q in float32, reshaped to the weight's shape."""
    return (q.float() * scale.float()).reshape(shape)


SCHEMES = {  # name: (quantize, bits per weight of a (out, in) matrix)
    "int8 absmax per row": (quantize_int8_rows, lambda rows, columns: 8 + 32 / columns),
    f"4-bit blocks of {BLOCK}": (quantize_4bit_blocks, lambda rows, columns: 4 + 16 / BLOCK),
}


def errors(weight: torch.Tensor, approximation: torch.Tensor) -> dict:
    """{"relative": ||W - W'||_F / ||W||_F, "max_abs": max |W - W'|} in float32."""
    difference = (weight.float() - approximation).flatten()
    return {"relative": float(difference.norm() / weight.float().norm()), "max_abs": float(difference.abs().max())}


@torch.no_grad()
def quantize_linear_layers(model, quantize) -> int:
    """Replace every nn.Linear weight of `model` with its quantized-then-dequantized copy, in place.

    The embedding (which the output head shares) and the norms are not linear layers and stay as they are.
    Returns the number of matrices replaced.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not model.get_input_embeddings().weight:
            q, scale = quantize(module.weight)
            module.weight.copy_(dequantize(q, scale, module.weight.shape))
            count += 1
    return count


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(REPO_ROOT / "out" / "full_sft_256"),
                        help="checkpoint directory (default: out/full_sft_256)")
    parser.add_argument("--weight", default="model.layers.0.mlp.gate_proj.weight",
                        help="the weight matrix to show (default: model.layers.0.mlp.gate_proj.weight)")
    parser.add_argument("--data_path", default=str(REPO_ROOT / "dataset" / "data" / "pretrain_quick_test.jsonl"),
                        help="held-out file for the perplexity (default: dataset/data/pretrain_quick_test.jsonl)")
    parser.add_argument("--limit", type=int, default=20, help="score the first N records (default: 20)")
    parser.add_argument("--max_seq_len", type=int, default=256, help="eval window in tokens (default: 256)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tokenizer = load_checkpoint(args.model_path, "cpu", dtype="float32")
    weights = dict(model.named_parameters())
    if args.weight not in weights or weights[args.weight].dim() != 2:
        matrices = [name for name, p in weights.items() if p.dim() == 2]
        raise SystemExit(f"--weight {args.weight}: no such weight matrix in {args.model_path}; for example "
                         + ", ".join(matrices[:4]))
    weight = weights[args.weight].detach()
    print(f"{args.weight}: {tuple(weight.shape)}, |w| mean {weight.abs().mean():.4f}, max {weight.abs().max():.4f} "
          f"({weight.abs().max() / weight.abs().mean():.1f}x the mean)")
    print(f"{'scheme':<24}{'bits/weight':>12}{'relative error':>16}{'max abs error':>15}   first 4 weights")
    print(f"{'float32':<24}{32:>12.2f}{0:>16.4f}{0:>15.5f}   {[round(x, 4) for x in weight[0, :4].tolist()]}")
    result = {"weight": args.weight, "schemes": {}}
    for name, (quantize, bits) in SCHEMES.items():
        q, scale = quantize(weight)
        approximation = dequantize(q, scale, weight.shape)
        figures = {"bits_per_weight": bits(*weight.shape), **errors(weight, approximation)}
        result["schemes"][name] = figures
        print(f"{name:<24}{figures['bits_per_weight']:>12.2f}{figures['relative']:>16.4f}{figures['max_abs']:>15.5f}"
              f"   {[round(x, 4) for x in approximation[0, :4].tolist()]}")

    path = Path(args.data_path)
    print(f"\nheld-out perplexity on the first {args.limit} records of {path.name}, every linear layer quantized:")
    stride = max(1, args.max_seq_len // 2)
    base = evaluate_file(model, tokenizer, path, args.max_seq_len, stride, limit=args.limit, progress=False)
    result["perplexity"] = {"float32": base["perplexity"]}
    print(f"{'float32':<24}{base['perplexity']:>10.3f}")
    for name, (quantize, _) in SCHEMES.items():
        quantized, _ = load_checkpoint(args.model_path, "cpu", dtype="float32")
        count = quantize_linear_layers(quantized, quantize)
        perplexity = evaluate_file(quantized, tokenizer, path, args.max_seq_len, stride, limit=args.limit,
                                   progress=False)["perplexity"]
        result["perplexity"][name] = perplexity
        print(f"{name:<24}{perplexity:>10.3f}  ({100 * (perplexity / base['perplexity'] - 1):+.2f}%, "
              f"{count} matrices)")
    if not all(math.isfinite(value) for value in result["perplexity"].values()):
        raise SystemExit("a perplexity is not finite: the checkpoint's weights may be damaged")
    return result


if __name__ == "__main__":
    main()

"""The benchmarks' arithmetic (bench/): model FLOPs per token against the model's own weights, and one real case."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def matmul_weights(model: nn.Module, top_k_of: int | None = None) -> int:
    """Weights of every nn.Linear a token passes through (an MoE layer: top_k of its experts, plus the router)."""
    total = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))
    if top_k_of is not None:  # every expert was counted: keep top_k of num_experts
        num_experts, top_k = top_k_of
        experts = sum(module.weight.numel() for name, module in model.named_modules()
                      if isinstance(module, nn.Linear) and ".experts." in name)
        total -= experts - experts * top_k // num_experts
    return total


def test_flops_per_token_is_six_times_the_matmul_weights_plus_attention():
    bench = load_bench("bench_train")
    for moe in (False, True):
        config = MiniMindConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=160, vocab_size=300, use_moe=moe, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=96)
        model = MiniMindForCausalLM(config)
        n = matmul_weights(model, (4, 2) if moe else None)
        seq_len = 50
        expected = 6 * n + 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
        assert bench.model_flops_per_token(config, seq_len) == expected


def test_one_case_runs_the_shared_loop_and_reports_consistent_figures():
    bench = load_bench("bench_train")
    args = bench.parse_args(["--device", "cpu", "--warmup", "0", "--steps", "2", "--batch_size", "2",
                             "--max_seq_len", "64", "--gemm_size", "256"])
    result = bench.run_case("quick", "pretrain", "ours", args)
    assert result["useful_fraction"] == (64 - 1) / 64  # full blocks: every position but the last predicts a token
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1.5
    # full blocks: every step has the same real tokens, so the FLOP rate is the token rate times FLOPs per token
    assert result["real_fraction"] == 1 and result["real_tokens_per_s"] == result["tokens_per_s"]
    flops = result["real_tokens_per_s"] * result["model_flops_per_token"]
    assert flops / 1e12 == pytest.approx(result["model_tflops_per_s"], rel=1e-6)


def test_upstream_padding_changes_the_compute_not_the_loss():
    """Upstream's SFT batching (every row padded to max_seq_len, no attention mask) gives the same loss as ours."""
    from dataset.lm_dataset import SFTDataset
    from trainer.trainer_utils import causal_lm_loss, load_model, parse_args
    bench = load_bench("bench_train")
    args = parse_args("sft", "test", argv=["--from_weight", "none", "--device", "cpu", "--max_seq_len", "256"])
    model, tokenizer = load_model(args)
    dataset = SFTDataset(bench.DATA["sft"], tokenizer, 256)
    ours = dataset.collate([dataset[i] for i in range(4)])
    padded = bench.pad_like_upstream(ours, 256, tokenizer.pad_token_id)
    assert "attention_mask" in ours and not bool(ours["attention_mask"].all())  # rows of different lengths
    assert padded.keys() == {"input_ids", "labels"} and padded["input_ids"].shape == (4, 256)
    model.eval()
    with torch.no_grad():
        assert causal_lm_loss(model, padded)[0].item() == pytest.approx(causal_lm_loss(model, ours)[0].item(),
                                                                        rel=1e-5)

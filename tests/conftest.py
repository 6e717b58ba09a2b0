"""Fixtures and helpers shared by the test files: the shipped tokenizer, a tiny random model, jsonl files.

Test files import the helpers (`from conftest import tiny_model, write_jsonl`) and take the fixtures by name.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

DATA = Path(__file__).resolve().parents[1] / "dataset" / "data"
TOKENIZER = Path(__file__).resolve().parents[1] / "model" / "tokenizer"


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped tokenizer (model/tokenizer): 6,400 tokens, <|endoftext|> 0 (padding), <|im_end|> 2 (end)."""
    return AutoTokenizer.from_pretrained(TOKENIZER)


def tiny_model(vocab_size: int = 6400, seed: int = 0, use_moe: bool = False,
               hidden_size: int = 64) -> MiniMindForCausalLM:
    """A 2-layer MiniMind (4 query heads, 2 key/value heads) with seeded random weights, in training mode; its
    pad/bos/eos ids (the config's defaults 0/1/2) are the shipped tokenizer's."""
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, use_moe=use_moe))


def write_jsonl(path: Path, records: list) -> Path:
    """Write `records` as one JSON object per line (UTF-8, non-ASCII kept) and return the path."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    """The first lines of each shipped jsonl file: real text, few enough for runs of a few seconds."""
    directory = tmp_path_factory.mktemp("data")
    files = {}
    for name, lines in {"pretrain": 12, "pretrain_test": 4, "sft": 24, "sft_test": 8}.items():
        files[name] = directory / f"{name}.jsonl"
        files[name].write_text("".join((DATA / f"{name}.jsonl").read_text().splitlines(keepends=True)[:lines]))
    return files

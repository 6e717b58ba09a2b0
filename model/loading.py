"""Opening a trained checkpoint for inference: a weights directory, or a LoRA adapter on its base model.

Used by scripts/chat.py and the eval/ scripts, so every tool opens checkpoints the same way.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer

from model.model_lora import load_lora, merge_lora, read_adapter_config
from model.model_minimind import MiniMindForCausalLM


def default_device() -> str:
    """cuda if a GPU is visible, else mps (Apple silicon), else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_checkpoint(path: str | Path, device: str | None = None, base_model_path: str | None = None):
    """Load a checkpoint directory for inference (chat, eval): its model, in eval mode on `device`
    (default: default_device()), and its tokenizer.

    A LoRA adapter directory (adapter_config.json) is put on its base model (the one named in the adapter's
    config, or base_model_path) and merged into it, so it runs at the base model's speed. The model runs in
    bfloat16 on CUDA GPUs that support it, else in float32.

    Returns:
        (MiniMindForCausalLM, tokenizer)
    Raises:
        SystemExit: with a one-line message when there is no checkpoint or the adapter does not fit its base.
    """
    path, device = str(path), device or default_device()
    directory = Path(path)
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    adapter = None
    if (directory / "adapter_config.json").is_file():
        try:
            adapter = read_adapter_config(directory)
        except ValueError as error:
            raise SystemExit(f"error: --model_path {path}: {error}") from None
        base = base_model_path or adapter.get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise SystemExit(f"error: the LoRA adapter in {path} names base model {base!r}, which is not a "
                             "checkpoint directory here; pass --base_model_path")
        directory = Path(base)
    if not (directory / "config.json").is_file():
        raise SystemExit(f"error: --model_path {path}: no checkpoint there (config.json missing); "
                         "train one first, e.g. python trainer/train_full_sft.py")
    tokenizer_dir = path if (Path(path) / "tokenizer_config.json").is_file() else directory
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = MiniMindForCausalLM.from_pretrained(directory)
    if adapter is not None:
        try:
            load_lora(model, path)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        merge_lora(model)
    return model.to(device=device, dtype=dtype).eval(), tokenizer

"""Opening a trained checkpoint: strictly (load_pretrained), and for inference with its tokenizer, a LoRA adapter
put on its base model (load_checkpoint).

Every tool opens checkpoints through here, the same strict way: the trainer's --from_weight, chat, the server,
the web demo, eval/ and scripts/convert_model.py. A checkpoint missing a tensor is refused, never filled with
random values.
"""

from pathlib import Path

import torch
from transformers import AutoTokenizer

from model.model_lora import load_lora, merge_lora, read_adapter_config
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.precision import resolve_dtype


def default_device() -> str:
    """cuda if a GPU is visible, else mps (Apple silicon), else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_pretrained(directory: str | Path, flag: str = "--from_weight", config: MiniMindConfig | None = None,
                    dtype: torch.dtype | None = torch.float32) -> MiniMindForCausalLM:
    """Load a checkpoint directory's model strictly, in float32 by default (the master weights; callers cast for
    inference).

    Strict: every tensor the directory's config.json asks for must be in its model.safetensors, with its shape, and
    nothing else may be there (transformers' from_pretrained would fill a missing one with random values).
    Safetensors only: no pickle is ever read.

    Args:
        directory: a checkpoint directory (config.json, model.safetensors).
        flag: the command-line flag that named it, for the error message.
        config: the model to build, when not the directory's own config.json (a stock Qwen3 directory read as
            MiniMind); dtype: the dtype to load in (None: the stored one).
    Raises:
        SystemExit: one sentence naming the directory and the missing, unexpected or mismatched tensors.
    """
    directory = Path(directory)
    if not any((directory / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise SystemExit(f"{flag}: {directory} holds no weights (model.safetensors); not a checkpoint")
    if config is None and "MiniMindRewardModel" in (MiniMindConfig.from_pretrained(directory).architectures or []):
        raise SystemExit(f"{flag}: {directory} holds a reward model (trainer/train_reward.py), which scores text "
                         "but writes none; give a chat model here, and the reward model to --reward_model")
    return load_strictly(MiniMindForCausalLM, directory, flag, config, dtype)


def load_strictly(model_class: type, directory: Path, flag: str, config: MiniMindConfig | None = None,
                  dtype: torch.dtype | None = torch.float32):
    """model_class.from_pretrained(directory), refused unless every tensor of the model is in the safetensors with
    its shape and nothing else is there (load_pretrained's rule; model/model_reward.py's loader uses it too).

    Raises:
        SystemExit: one sentence naming `flag`, the directory and the missing, unexpected or mismatched tensors.
    """
    # ignore_mismatched_sizes only makes transformers report a wrong shape instead of raising: we raise below
    model, info = model_class.from_pretrained(directory, config=config, dtype=dtype, output_loading_info=True,
                                              ignore_mismatched_sizes=True, use_safetensors=True)
    problems = "; ".join(f"{kind.removesuffix('_keys')}: {', '.join(sorted(map(tensor_name, keys)))}"
                         for kind, keys in info.items() if keys)
    if problems:
        raise SystemExit(f"{flag}: the weights in {directory} do not fit the model its config.json describes "
                         f"({problems})")
    return model


def tensor_name(key) -> str:
    """A key of transformers' loading info as text: a name, or (name, checkpoint shape, model shape) for a mismatch."""
    if isinstance(key, tuple):
        name, *shapes = key
        return f"{name} {' vs '.join(str(tuple(shape)) for shape in shapes)}" if shapes else str(name)
    return str(key)


def load_checkpoint(path: str | Path, device: str | None = None, base_model_path: str | None = None,
                    dtype: str = "auto"):
    """Load a checkpoint directory for inference (chat, eval): its model, in eval mode on `device`
    (default: default_device()), and its tokenizer. The weights load strictly (load_pretrained).

    A LoRA adapter directory (adapter_config.json) is put on its base model (the one named in the adapter's
    config, or base_model_path) and merged into it, so it runs at the base model's speed. The weights are cast to
    `dtype`; auto is the training runs' choice for this device (model/precision.py: bfloat16 on CUDA GPUs that
    have it and on CPUs whose timed bfloat16 matmul is clearly faster, float32 elsewhere; float16 is not used for
    inference).

    Returns:
        (MiniMindForCausalLM, tokenizer)
    Raises:
        SystemExit: with a one-line message when there is no checkpoint, its weights do not fit its config, or the
            adapter does not fit its base.
    """
    path, device = str(path), device or default_device()
    directory = Path(path)
    choice = resolve_dtype(dtype, device).dtype
    dtype = torch.bfloat16 if choice == "bfloat16" else torch.float32
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
    model = load_pretrained(directory, "--base_model_path" if adapter is not None else "--model_path")
    if adapter is not None:
        try:
            load_lora(model, path)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        merge_lora(model)
    return model.to(device=device, dtype=dtype).eval(), tokenizer

"""LoRA: low-rank adapters on a frozen model, written out by hand, saved in PEFT's format.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3) keeps a pretrained
weight W (out x in) frozen and learns a low-rank update next to it:

    h = W x + (alpha / r) * B A x        A: (r x in), B: (out x r), r << min(in, out)

A starts random and B at zero, so training starts exactly at the pretrained model; alpha / r keeps the size of
the update comparable when r changes. Only A and B are trained: for a 256-wide layer and r = 8 that is
2 * 8 * 256 = 4k parameters instead of 65k. After training, W + (alpha / r) B A can be merged into one matrix,
so the adapted model runs exactly as fast as the base one.

Read top to bottom: one adapted layer (LoRALinear) -> putting adapters into a model (apply_lora) -> merging
them back (merge_lora) -> files on disk (save_lora, load_lora).

On disk an adapter is a PEFT directory: `adapter_config.json` + `adapter_model.safetensors` whose tensors
are named `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, so that
`peft.PeftModel.from_pretrained(base_model, directory)` opens what we save, and `load_lora` opens what PEFT
saves (plain LoRA; DoRA and per-layer ranks are refused with a clear error).
"""

import json
import math
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT names every saved tensor from its PeftModel wrapper down
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = base_layer(x) + scaling * lora_B(lora_A(dropout(x))).

    Submodule names are PEFT's (base_layer, lora_A, lora_B, lora_dropout), so state dict keys match PEFT's.

    Args:
        base_layer: the pretrained layer, weight (out_features, in_features); its parameters are frozen here.
        rank: r, the inner dimension of the update.
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora, Kalajdzievski 2023).
        dropout: dropout probability on the adapter's input (not on the base path).
    Shapes: x (..., in_features) -> (..., out_features).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {rank}")
        self.base_layer = base_layer.requires_grad_(False)
        weight = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        # PEFT's default initialization: A as nn.Linear's own (Kaiming uniform), B zero, so B A = 0 at the start
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with weight W + scaling * B A (and the base bias): the same function, one matmul."""
        base = self.base_layer
        layer = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                          device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
            layer.weight.copy_(base.weight.float() + delta)
            if base.bias is not None:
                layer.bias.copy_(base.bias)
        return layer


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES, use_rslora: bool = False) -> list[str]:
    """Freeze every parameter of `model` and wrap each targeted nn.Linear in a LoRALinear, in place.

    A module is targeted when the last part of its name is in target_modules (PEFT's rule for a list of
    names), e.g. "q_proj" matches model.layers.3.self_attn.q_proj. The settings are kept on the model as
    `model.lora_config` (PEFT's adapter_config.json keys) for save_lora.

    Returns:
        the names of the wrapped modules.
    Raises:
        ValueError: when no nn.Linear matches target_modules, or when the model already has adapters.
    """
    if hasattr(model, "lora_config"):
        raise ValueError("the model already has LoRA adapters; merge_lora() them first")
    model.requires_grad_(False)
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]
    if not names:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules {list(target_modules)} match no linear layer; the model has {linear}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout, use_rslora))
    model.lora_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted(set(target_modules)), "use_rslora": use_rslora, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear of `model` by its merged nn.Linear (W + scaling B A), in place; return `model`.

    The result has the base model's own parameter names again (q_proj.weight, ...), so save_pretrained writes
    an ordinary checkpoint that any loader opens without knowing about LoRA. Its parameters stay frozen.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged().requires_grad_(False))
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` under PEFT's saved names: base_model.model.<path>.lora_{A,B}.weight."""
    return {PEFT_PREFIX + name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()
            if ".lora_A." in name or ".lora_B." in name}


def save_lora(model: nn.Module, directory: str | Path) -> None:
    """Write the adapter of `model` (made by apply_lora) as a PEFT directory: adapter_config.json + safetensors.

    Raises:
        ValueError: when the model has no adapters.
    """
    if not hasattr(model, "lora_config"):
        raise ValueError("the model has no LoRA adapters to save (apply_lora first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(model.lora_config, indent=2) + "\n")
    safetensors.torch.save_file(lora_state_dict(model), str(directory / ADAPTER_WEIGHTS_FILE),
                                metadata={"format": "pt"})


def read_adapter_config(directory: str | Path) -> dict:
    """adapter_config.json of a LoRA directory, checked for what LoRALinear implements.

    Raises:
        ValueError: no adapter_config.json, not a LoRA adapter, or a LoRA variant this module does not implement
            (DoRA, per-layer ranks or alphas, biases, fan_in_fan_out, extra trained modules).
    """
    path = Path(directory) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: no {ADAPTER_CONFIG_FILE}; not a LoRA adapter directory")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = {key: config[key] for key in ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
                                                 "modules_to_save", "layers_to_transform")
                   if config.get(key)}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise ValueError(f"{path}: LoRA options not supported here: {unsupported}")
    if not isinstance(config.get("target_modules"), list):
        raise ValueError(f"{path}: target_modules must be a list of module names, got {config.get('target_modules')!r}")
    return config


def load_lora(model: nn.Module, directory: str | Path) -> list[str]:
    """Put the adapter saved in `directory` (by save_lora or by PEFT) into `model`, in place.

    Returns:
        the names of the wrapped modules.
    Raises:
        ValueError: a directory that is not a supported LoRA adapter (read_adapter_config), or an adapter that
            does not fit this base model (missing or unexpected adapter tensors, wrong shapes: the adapter
            was trained on another base).
    """
    config = read_adapter_config(directory)
    names = apply_lora(model, rank=config["r"], alpha=config["lora_alpha"], dropout=0.0,
                       target_modules=tuple(config["target_modules"]), use_rslora=bool(config.get("use_rslora")))
    model.lora_config.update(base_model_name_or_path=config.get("base_model_name_or_path"))
    saved = safetensors.torch.load_file(str(Path(directory) / ADAPTER_WEIGHTS_FILE))
    expected = lora_state_dict(model)
    problems = []
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors, e.g. {unexpected[0]}")
    problems += [f"{key}: saved {tuple(saved[key].shape)}, model needs {tuple(expected[key].shape)}"
                 for key in sorted(expected.keys() & saved.keys()) if saved[key].shape != expected[key].shape][:3]
    if problems:
        raise ValueError(f"{directory}: the adapter does not fit this base model ({'; '.join(problems)}); "
                         "was it trained on another base model?")
    model.load_state_dict({key.removeprefix(PEFT_PREFIX): value for key, value in saved.items()}, strict=False)
    return names

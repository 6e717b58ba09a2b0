r"""Convert a MiniMind checkpoint for other tools: stock transformers (Qwen3) and back, LoRA merged, GGUF, and
read upstream MiniMind's own .pth weights.

    python scripts/convert_model.py to_hf --model_path out/full_sft_256 --output_dir out/full_sft_256_hf
    python scripts/convert_model.py from_hf --model_path path/to/Qwen3-dir --output_dir out/qwen3_minimind
    python scripts/convert_model.py merge_lora --model_path out/lora_identity_256 --output_dir out/lora_merged_256
    python scripts/convert_model.py to_gguf --model_path out/full_sft_256 --outtype q8_0   # out/full_sft_256-q8_0.gguf
    python scripts/convert_model.py from_minimind --input path/full_sft_768.pth --tokenizer path/minimind/model \
        --output out/full_sft_768

to_hf      MiniMind's architecture and parameter names are Qwen3's (Qwen3-MoE's for MoE; model/model_minimind.py),
           so the weights, tokenizer, chat template and generation config are copied byte for byte and only
           config.json is rewritten as a Qwen3 config with the same shapes. The copy needs nothing of this
           repository: `AutoModelForCausalLM.from_pretrained(dir)` in plain transformers, vLLM, lm_eval open it.
from_hf    the way back: a stock Qwen3 / Qwen3-MoE directory (e.g. one written by to_hf, or a published Qwen3
           whose options MiniMind implements) becomes a MiniMind checkpoint that the training stages continue.
merge_lora a LoRA adapter directory (trainer/train_lora.py, or PEFT) merged into its base: W + (alpha / r) B A
           in every adapted layer, saved as an ordinary weights directory (float32).
to_gguf    one GGUF file for llama.cpp, llama-cpp-python and ollama: Qwen3 architecture, the tokenizer (byte-level
           BPE with its merges, special tokens, chat template) and the weights in f32, f16, bf16, q8_0, q4_0
           or q4_k_m (llama.cpp's quantizer).
from_minimind a state dict saved by upstream MiniMind's trainers (jingyaogong/minimind, MiniMind-3: the same
           parameter names as ours), e.g. full_sft_768.pth in float16, becomes a checkpoint directory (float32):
           the shape is read off the tensors, the load is strict (a missing or unexpected tensor is named), and
           the tokenizer is upstream's (--tokenizer): it is not the one shipped here.

After to_hf, from_hf, merge_lora and from_minimind the result is opened again (strictly) and its logits are compared
with the original's (float32, one random sequence); a difference above 1e-4 stops with an error. GGUF files are
checked by tests/test_convert_model.py in llama-cpp-python (same greedy tokens as MiniMind).
"""

import argparse
import ctypes
import json
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from model.hf_config import minimind_config_of, qwen3_config_of
from model.loading import default_device, load_checkpoint, load_pretrained
from model.model_lora import load_lora, read_adapter_config
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
LOGIT_TOLERANCE = 1e-4  # max |logit difference| accepted in float32: rounding, not a different computation
CHECK_TOKENS = 32  # length of the random sequence the logits are compared on


def copy_files(source: Path, target: Path, skip) -> None:
    """Copy the files of `source` (not its folders) into `target`, except those whose name `skip(name)` is true."""
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not skip(file.name):
            shutil.copy2(file, target / file.name)


def is_weights_file(name: str) -> bool:
    """model.safetensors, its shards and index, and pickled weights (pytorch_model.bin, ...)."""
    return name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth"))


def check_paths(source: Path, target: Path) -> None:
    """Raises SystemExit: no config.json in source (a LoRA adapter: merge it first), or target is source."""
    if not (source / "config.json").is_file():
        raise SystemExit(f"error: --model_path {source}: no config.json there; pass a weights directory "
                         "(a LoRA adapter: merge it first with the merge_lora subcommand)")
    if target.resolve() == source.resolve():
        raise SystemExit(f"error: --output_dir {target} is the checkpoint itself; choose a new directory")


def export_hf(model_path: str | Path, output_dir: str | Path) -> Path:
    """Write a stock transformers (Qwen3) copy of the MiniMind checkpoint `model_path` to `output_dir`.

    Every file but config.json is copied as it is; config.json becomes `qwen3_config_of` the checkpoint's config.
    The checkpoint is loaded strictly first, so one missing a tensor is refused rather than exported.
    Returns:
        the output directory (created; files there are overwritten)
    Raises:
        SystemExit: model_path is not a weights directory, its weights do not fit its config (load_pretrained),
            or output_dir is model_path.
    """
    source, target = Path(model_path), Path(output_dir)
    check_paths(source, target)
    config = load_pretrained(source, "--model_path").config
    copy_files(source, target, skip=lambda name: name == "config.json")
    qwen3_config_of(config).save_pretrained(target)
    return target


def import_hf(model_path: str | Path, output_dir: str | Path) -> Path:
    """Write the stock Qwen3 / Qwen3-MoE directory `model_path` as a MiniMind checkpoint in `output_dir`.

    The weights are loaded with MiniMind's config (their names are the same; sharded files and tied embeddings
    are handled by from_pretrained) and saved as MiniMind saves them, in their stored dtype; the other files
    (tokenizer, chat template, generation config, ...) are copied. import_hf(export_hf(x)) equals x.
    Raises:
        SystemExit: not a weights directory, a config MiniMind cannot represent (minimind_config_of), or weights
            that do not match the config (missing, unexpected or misshapen tensors).
    """
    source, target = Path(model_path), Path(output_dir)
    check_paths(source, target)
    try:
        config = minimind_config_of(AutoConfig.from_pretrained(source))
    except ValueError as error:
        raise SystemExit(f"error: --model_path {source}: {error}") from None
    model = load_pretrained(source, "--model_path", config=config, dtype=config.dtype)
    copy_files(source, target, skip=lambda name: name == "config.json" or is_weights_file(name))
    model.save_pretrained(target)
    return target


def merge_adapter(adapter_path: str | Path, output_dir: str | Path, base_model_path: str | None = None) -> Path:
    """Merge the LoRA adapter in `adapter_path` into its base model and save the result in `output_dir`.

    The base is the one named in adapter_config.json, or base_model_path (model.loading.load_checkpoint, which
    merges W + scaling * B A in float32, model.model_lora.merge_lora). Saved in float32 with the adapter's
    tokenizer: an ordinary weights directory that every loader opens without knowing about LoRA.
    Raises:
        SystemExit: not an adapter directory, its base missing, or an adapter that does not fit the base.
    """
    source, target = Path(adapter_path), Path(output_dir)
    if not (source / "adapter_config.json").is_file():
        raise SystemExit(f"error: --model_path {source}: no adapter_config.json there; pass a LoRA adapter directory")
    if target.resolve() == source.resolve():
        raise SystemExit(f"error: --output_dir {target} is the adapter itself; choose a new directory")
    model, tokenizer = load_checkpoint(source, device="cpu", base_model_path=base_model_path, dtype="float32")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def adapted_model(adapter_path: str | Path, base_model_path: str | None = None) -> MiniMindForCausalLM:
    """The base model with the adapter's LoRALinear layers in place, not merged: the reference for merge_adapter."""
    base = base_model_path or read_adapter_config(adapter_path)["base_model_name_or_path"]
    model = load_pretrained(base, "--base_model_path")
    load_lora(model, adapter_path)
    return model


@torch.no_grad()
def max_logit_difference(reference, converted, device: str = "cpu", seed: int = 0) -> float:
    """Largest |logit| difference between two causal LMs over one random sequence of CHECK_TOKENS token ids.

    Both run in float32 on `device`. A MoE model opened by transformers' Auto classes fuses its per-expert
    weights in memory; comparing through from_pretrained covers that step too.
    """
    reference, converted = (model.to(device=device, dtype=torch.float32).eval() for model in (reference, converted))
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, reference.config.vocab_size, (1, CHECK_TOKENS), generator=generator).to(device)
    return (reference(input_ids).logits - converted(input_ids).logits).abs().max().item()


def require_same_logits(reference, converted, output: Path, device: str) -> float:
    """max_logit_difference, or SystemExit when it exceeds LOGIT_TOLERANCE (the written model is not usable)."""
    difference = max_logit_difference(reference, converted, device)
    if difference > LOGIT_TOLERANCE:
        raise SystemExit(f"error: {output} computes different logits (max |difference| {difference:.2e} > "
                         f"{LOGIT_TOLERANCE:.0e}); do not use it")
    return difference


# ----------------------------------------------------------------------------------------------------------------
# Upstream MiniMind's .pth state dicts
#
# jingyaogong/minimind's trainers save `torch.save({k: v.half() for k, v in model.state_dict().items()},
# f"{save_dir}/{save_weight}_{hidden_size}[_moe].pth")`, e.g. full_sft_768.pth. Its model/model_minimind.py
# (MiniMind-3, since 2026-03) names the parameters as Qwen3 does, as ours are named:
#   model.embed_tokens.weight, model.norm.weight, lm_head.weight (tied to the embedding: both keys, equal values)
#   model.layers.N.{input_layernorm,post_attention_layernorm}.weight
#   model.layers.N.self_attn.{q,k,v,o}_proj.weight, model.layers.N.self_attn.{q,k}_norm.weight (one head wide)
#   dense: model.layers.N.mlp.{gate,up,down}_proj.weight
#   MoE:   model.layers.N.mlp.gate.weight (the router), model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight
# So the tensors load under their own names and the config is read off their shapes. Only what no shape shows
# comes from flags, with upstream's defaults: rope_theta 1e6, max_position_embeddings 32768, num_experts_per_tok 1
# (rms_norm_eps 1e-6, norm_topk_prob and silu are both projects' defaults). MiniMind2 checkpoints (2025) are
# another network (no q_norm / k_norm, MoE shared experts); the strict load refuses them by name.

LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
UPSTREAM_LAYOUT = ("the layout is that of model/model_minimind.py in jingyaogong/minimind since 2026-03 "
                   "(MiniMind-3); MiniMind2 checkpoints, without q_norm/k_norm, are another network")
NAMES_SHOWN = 8  # a refusal names this many tensors of each kind, then counts the rest


def read_minimind_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in an upstream MiniMind .pth file, read with weights_only=True (no pickled code runs).

    Raises:
        SystemExit: no such file, not a torch.save file of tensors, or a resume state rather than weights.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: --input {path}: no such file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError, RuntimeError (not a zip file), EOFError, ...
        raise SystemExit(f"error: --input {path}: not a state dict written by torch.save "
                         f"({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("model"), dict):
        raise SystemExit(f"error: --input {path}: a resume state (model, optimizer, ...); pass the weights file "
                         "the trainer saves beside it, <save_weight>_<hidden_size>[_moe].pth")
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise SystemExit(f"error: --input {path}: not a state dict (a dict of tensors)")
    return state_dict


def tensor_list(names) -> str:
    """The first NAMES_SHOWN of `names`, sorted, and how many more there are."""
    names = sorted(names)
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more


def minimind_config_of_state_dict(state_dict: dict[str, torch.Tensor], **fields) -> MiniMindConfig:
    """The MiniMind config an upstream state dict's shapes describe: vocabulary and width from the embedding,
    head width from q_norm, query and key/value heads from q_proj and k_proj over it, layers from the layer
    indices, the MLP (or, when a router mlp.gate is there, the experts') width, tied embeddings when lm_head
    is absent or equals the embedding. `fields`: what the shapes cannot tell (rope_theta, ...).

    Raises:
        ValueError: a tensor the shapes are read from is missing (naming it).
    """
    def rows(name: str) -> int:
        if name not in state_dict:
            raise ValueError(f"missing: {name}")
        return state_dict[name].shape[0]

    embedding = "model.embed_tokens.weight"
    vocab_size, hidden_size = rows(embedding), state_dict[embedding].shape[1]
    head_dim = rows("model.layers.0.self_attn.q_norm.weight")
    use_moe = "model.layers.0.mlp.gate.weight" in state_dict
    if use_moe:
        intermediate_size = rows("model.layers.0.mlp.experts.0.gate_proj.weight")
        moe = dict(num_experts=rows("model.layers.0.mlp.gate.weight"), moe_intermediate_size=intermediate_size)
    else:
        intermediate_size, moe = rows("model.layers.0.mlp.gate_proj.weight"), {}
    lm_head = state_dict.get("lm_head.weight")
    return MiniMindConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=1 + max(int(found[1]) for key in state_dict if (found := LAYER_KEY.match(key))),
        num_attention_heads=rows("model.layers.0.self_attn.q_proj.weight") // head_dim,
        num_key_value_heads=rows("model.layers.0.self_attn.k_proj.weight") // head_dim, head_dim=head_dim,
        use_moe=use_moe, tie_word_embeddings=lm_head is None or torch.equal(lm_head, state_dict[embedding]),
        **moe, **fields)


def load_minimind_state_dict(state_dict: dict[str, torch.Tensor], config: MiniMindConfig) -> MiniMindForCausalLM:
    """A float32 MiniMindForCausalLM(config) holding `state_dict`, loaded strictly: every tensor the model has,
    with its shape, and nothing else (a tied lm_head may be left out: it is the embedding).

    Raises:
        ValueError: naming the missing, unexpected and misshapen tensors.
    """
    model = MiniMindForCausalLM(config)
    if config.tie_word_embeddings and "lm_head.weight" not in state_dict:
        state_dict = {**state_dict, "lm_head.weight": state_dict["model.embed_tokens.weight"]}
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    misshapen = [f"{name} {tuple(state_dict[name].shape)} vs {tuple(shape)}" for name, shape in expected.items()
                 if name in state_dict and state_dict[name].shape != shape]
    problems = [f"{kind}: {tensor_list(names)}" for kind, names in (
        ("missing", expected.keys() - state_dict.keys()), ("unexpected", state_dict.keys() - expected.keys()),
        ("mismatched shapes", misshapen)) if names]
    if problems:
        raise ValueError("; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    return model


def import_minimind(pth_path: str | Path, output_dir: str | Path, tokenizer_dir: str | Path,
                    **fields) -> MiniMindForCausalLM:
    """Write upstream MiniMind's state dict `pth_path` as a MiniMind checkpoint directory in `output_dir`.

    The config comes from the tensors' shapes (minimind_config_of_state_dict) and `fields`; the weights load
    strictly and are saved in float32, as the training stages save theirs (float16 values are exact there),
    with the tokenizer of `tokenizer_dir`.
    Returns:
        the model written, in float32: the reference the written directory is checked against.
    Raises:
        SystemExit: an unreadable file (read_minimind_pth), tensors that are not upstream MiniMind-3's, or a
            tokenizer that cannot be read or is larger than the embedding.
    """
    if Path(output_dir).is_file():
        raise SystemExit(f"error: --output_dir {output_dir} is a file; choose a directory")
    state_dict = read_minimind_pth(pth_path)
    try:
        model = load_minimind_state_dict(state_dict, minimind_config_of_state_dict(state_dict, **fields))
    except ValueError as error:
        raise SystemExit(f"error: --input {pth_path}: not the tensors of an upstream MiniMind-3 model ({error}); "
                         f"{UPSTREAM_LAYOUT}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --tokenizer {tokenizer_dir}: no tokenizer there "
                         f"({str(error).splitlines()[0]})") from None
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(f"error: --tokenizer {tokenizer_dir}: {len(tokenizer)} tokens, more than the model's "
                         f"{model.config.vocab_size} embeddings; pass the tokenizer the checkpoint was trained with")
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return model


# ----------------------------------------------------------------------------------------------------------------
# GGUF
#
# Why GGUFWriter (the `gguf` package, maintained in llama.cpp's repository) and not llama.cpp's
# convert_hf_to_gguf.py on the to_hf directory: that script is not installable (it lives in a llama.cpp checkout)
# and it identifies a BPE tokenizer's pre-tokenizer by the hash of a test string's tokens, so it stops at our
# tokenizer ("BPE pre-tokenizer was not recognized") unless its table is patched. Our tokenizer is the GPT-2
# kind (byte-level BPE, GPT-2's split regex), which llama.cpp knows as tokenizer "gpt2" with pre-tokenizer
# "gpt-2"; writing those keys ourselves takes a few lines and needs only `pip install gguf`. The tensor names
# come from gguf's own TensorNameMap, and the hyperparameters are the ones convert_hf_to_gguf.py writes for
# Qwen3ForCausalLM / Qwen3MoeForCausalLM.

GGUF_PACKAGE_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # written by GGUFWriter (gguf.quants)
# K-quants come from llama.cpp's own quantizer (what its llama-quantize tool runs), applied to the f16 file: q4_k_m
# stores 4-bit weights in super-blocks of 256 with 6-bit scales, and keeps the tensors that suffer most from 4 bits
# (half the attention values and FFN down projections, the output) at 6 bits; rows that are not whole super-blocks
# fall back to q5_0 / q8_0. Needs llama-cpp-python.
LLAMA_CPP_OUTTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
OUTTYPES = GGUF_PACKAGE_OUTTYPES + tuple(LLAMA_CPP_OUTTYPES)
EXPERT_WEIGHT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")
# transformers renders {% generation %} (it marks the assistant's tokens for training masks); plain Jinja, which
# llama-cpp-python uses, does not know the tag. It prints nothing, so dropping it changes no rendering.
GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


def import_gguf():
    """The gguf package, an optional dependency (the `export` extra), or SystemExit saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise SystemExit('error: writing GGUF needs the gguf package: pip install -e ".[export]"') from None
    return gguf


def gguf_hf_tensors(state_dict: dict[str, torch.Tensor], config: MiniMindConfig):
    """(transformers name, tensor) in the layout llama.cpp reads.

    The tied lm_head is left out (llama.cpp reuses token_embd when there is no output tensor); the experts of
    a MoE layer are stacked into one (num_experts, out, in) tensor per projection, named
    model.layers.N.mlp.experts.<proj>.weight as convert_hf_to_gguf.py names them.
    """
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if match := EXPERT_WEIGHT.fullmatch(name):
            layer, expert, projection = match.groups()
            experts.setdefault((int(layer), projection), {})[int(expert)] = tensor
            continue
        yield name, tensor
    for (layer, projection), by_expert in experts.items():
        stacked = torch.stack([by_expert[e] for e in range(config.num_experts)])  # (num_experts, out, in)
        yield f"model.layers.{layer}.mlp.experts.{projection}.weight", stacked


def gguf_tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str):
    """The GGML type a tensor is stored in, following llama.cpp's converter.

    Norm weights (1-D) and the MoE router stay float32: tiny, and precision-sensitive. A block-quantized type
    needs rows that are a whole number of blocks (32 values for q8_0 and q4_0); other tensors fall back to f16.
    """
    gguf = import_gguf()
    if len(shape) == 1 or gguf_name.endswith("ffn_gate_inp.weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16


def gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """The tokenizer as GGUF stores a "gpt2" tokenizer: tokens by id, their types, the BPE merges ("a b").

    Added tokens marked special (<|im_end|>, ...) are CONTROL: llama.cpp matches them in text only when asked
    (parse_special) and hides them from output unless asked, as transformers' skip_special_tokens does; the other
    added tokens (<think>, <tool_call>, ...) are USER_DEFINED: always matched as one token and printed as text.
    Ids past the tokenizer's vocabulary up to the model's vocab_size are UNUSED "[PAD<id>]" tokens.
    Raises:
        ValueError: a tokenizer that is not byte-level BPE with GPT-2's pre-tokenization.
    """
    gguf = import_gguf()
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre_tokenizer = spec.get("pre_tokenizer") or {}
    if spec["model"]["type"] != "BPE" or pre_tokenizer.get("type") != "ByteLevel" or not pre_tokenizer.get("use_regex"):
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers with GPT-2's pre-tokenization (as the "
                         f"shipped one); this one is {spec['model']['type']} with pre-tokenizer {pre_tokenizer}")
    tokens = {index: token for token, index in spec["model"]["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in tokens}
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    ids = range(max(vocab_size, len(tokens)))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]]
    return ([tokens.get(index, f"[PAD{index}]") for index in ids],
            [types.get(index, gguf.TokenType.UNUSED) for index in ids], merges)


def write_gguf(model: MiniMindForCausalLM, tokenizer, outfile: str | Path, outtype: str = "f16",
               name: str = "MiniMind") -> Path:
    """Write `model` and `tokenizer` to one GGUF file (llama.cpp's "qwen3" / "qwen3moe" architecture).

    Args:
        model: a MiniMind model (any dtype; tensors are converted from float32).
        tokenizer: its transformers tokenizer (byte-level BPE); its chat template is stored for llama.cpp's chat.
        outtype: the type of the 2-D weights (norms and the MoE router stay float32): "f32", "f16", "bf16",
            "q8_0" or "q4_0" (the gguf package), or "q4_k_m" (llama.cpp's quantizer, from an f16 file).
    Returns:
        the path of the file
    Raises:
        ValueError: an unknown outtype, a tokenizer gguf_vocab cannot write, a MoE model without norm_topk_prob
            (llama.cpp's qwen3moe always renormalizes the chosen experts' weights), or a rope type other than
            default and yarn.
        SystemExit: q4_k_m without llama-cpp-python.
    """
    outfile = Path(outfile)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if outtype in GGUF_PACKAGE_OUTTYPES:
        return write_gguf_with_gguf_package(model, tokenizer, outfile, outtype, name)
    f16_file = outfile.with_name(outfile.name + ".f16.tmp")
    try:
        quantize_with_llama_cpp(write_gguf_with_gguf_package(model, tokenizer, f16_file, "f16", name), outfile, outtype)
    finally:
        f16_file.unlink(missing_ok=True)
    return outfile


def quantize_with_llama_cpp(source: Path, outfile: Path, outtype: str) -> None:
    """llama.cpp's quantizer (llama_model_quantize, as its llama-quantize tool) from the GGUF `source` to `outfile`.

    Raises:
        SystemExit: llama-cpp-python is not installed. RuntimeError: llama.cpp reports a failure.
    """
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(f'error: --outtype {outtype} needs llama-cpp-python: pip install -e ".[export]"') from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_OUTTYPES[outtype])
    if llama_cpp.llama_model_quantize(str(source).encode(), str(outfile).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {outtype}")


def write_gguf_with_gguf_package(model: MiniMindForCausalLM, tokenizer, outfile: Path, outtype: str,
                                 name: str) -> Path:
    """write_gguf for the types the gguf package writes itself (GGUF_PACKAGE_OUTTYPES)."""
    gguf = import_gguf()
    config = model.config
    if config.use_moe and not config.norm_topk_prob:
        raise ValueError("llama.cpp's qwen3moe renormalizes the top-k router weights; this model has norm_topk_prob=False")
    arch = gguf.MODEL_ARCH.QWEN3MOE if config.use_moe else gguf.MODEL_ARCH.QWEN3
    writer = gguf.GGUFWriter(str(outfile), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType[f"MOSTLY_{outtype.upper()}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # the hyperparameters: the same as convert_hf_to_gguf.py's for Qwen3ForCausalLM / Qwen3MoeForCausalLM
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings", config.max_position_embeddings))
    elif rope["rope_type"] != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} has no GGUF export here; default and yarn do")
    if config.use_moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)

    tokens, token_types, merges = gguf_vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, which our ByteLevel(use_regex=True) pre-tokenizer uses
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)  # our tokenizer adds no BOS: prompts start as the chat template writes them
    if tokenizer.chat_template:
        writer.add_chat_template(GENERATION_TAG.sub("", tokenizer.chat_template))

    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state_dict = {key: value.detach().float().cpu() for key, value in model.state_dict().items()}
    for hf_name, tensor in gguf_hf_tensors(state_dict, config):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name}")
        qtype = gguf_tensor_type(gguf_name, tuple(tensor.shape), outtype)
        writer.add_tensor(gguf_name, gguf.quants.quantize(tensor.numpy(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return outfile


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{to_hf,from_hf,merge_lora,to_gguf,from_minimind}")

    def command(name: str, help: str, model_path_help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--model_path", required=True, help=model_path_help)
        return sub

    def add_output_dir(sub: argparse.ArgumentParser, default: str) -> None:
        sub.add_argument("--output_dir", "--output", default=None, help=f"where the result goes (default: {default})")
        sub.add_argument("--device", default=None,
                         help="where the result's logits are checked against the original's, in float32: "
                              "cuda, mps or cpu (default: the first available in that order)")

    add_output_dir(command("to_hf", "export a MiniMind checkpoint as a stock transformers Qwen3 directory",
                           "MiniMind checkpoint directory written by a training stage"), "<model_path>_hf")
    add_output_dir(command("from_hf", "import a stock transformers Qwen3 / Qwen3-MoE directory as a MiniMind checkpoint",
                           "Qwen3 or Qwen3-MoE directory (config.json, safetensors weights, tokenizer)"),
                   "<model_path>_minimind")
    merge = command("merge_lora", "merge a LoRA adapter into its base model; write an ordinary weights directory",
                    "LoRA adapter directory (adapter_config.json, adapter_model.safetensors)")
    merge.add_argument("--base_model_path", default=None,
                       help="the base checkpoint (default: the one named in the adapter's adapter_config.json)")
    add_output_dir(merge, "<model_path>_merged")
    gguf_command = command("to_gguf", "write a GGUF file for llama.cpp, llama-cpp-python and ollama",
                           "MiniMind checkpoint directory, or a LoRA adapter directory (merged first)")
    gguf_command.add_argument("--base_model_path", default=None,
                              help="for a LoRA adapter: the base checkpoint (default: from adapter_config.json)")
    gguf_command.add_argument("--outtype", default="f16", choices=OUTTYPES,
                              help="weight type: f32, f16, bf16 (16-bit floats), q8_0 (8-bit, blocks of 32 with "
                                   "an f16 scale), q4_0 (4-bit, the same blocks), q4_k_m (llama.cpp's 4-bit "
                                   "K-quant mix, needs llama-cpp-python); norms stay f32 (default: %(default)s)")
    gguf_command.add_argument("--outfile", default=None, help="the .gguf file (default: <model_path>-<outtype>.gguf)")
    upstream = commands.add_parser("from_minimind", help="import a .pth state dict of upstream MiniMind's trainers "
                                   "(jingyaogong/minimind) as a MiniMind checkpoint directory",
                                   description="import a .pth state dict of upstream MiniMind's trainers "
                                               "(jingyaogong/minimind, MiniMind-3) as a MiniMind checkpoint directory; "
                                               "the model's shape is read off the tensors")
    upstream.add_argument("--input", required=True,
                          help="the .pth file, e.g. out/full_sft_768.pth (read with torch.load(weights_only=True): "
                               "tensors only, no pickled code runs)")
    upstream.add_argument("--tokenizer", required=True,
                          help="upstream MiniMind's tokenizer directory (tokenizer.json, tokenizer_config.json: the "
                               "model/ folder of its repository, or of a published MiniMind model); the tokenizer "
                               "shipped here is another 6400-token vocabulary")
    upstream.add_argument("--rope_theta", type=float, default=1e6,
                          help="RoPE base the model was trained with (default: %(default)s, upstream's)")
    upstream.add_argument("--max_position_embeddings", type=int, default=32768,
                          help="context length in tokens the config records (default: %(default)s, upstream's)")
    upstream.add_argument("--num_experts_per_tok", type=int, default=1,
                          help="MoE: experts each token is routed to (default: %(default)s, upstream's)")
    add_output_dir(upstream, "the --input path without .pth, e.g. out/full_sft_768")
    args = parser.parse_args(argv)
    if args.command != "from_minimind":
        args.model_path = args.model_path.rstrip("/")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "to_gguf":
        outfile = Path(args.outfile or f"{args.model_path}-{args.outtype}.gguf")
        model, tokenizer = load_checkpoint(args.model_path, device="cpu", base_model_path=args.base_model_path,
                                           dtype="float32")  # the stored weights, not bfloat16-rounded ones
        try:
            write_gguf(model, tokenizer, outfile, args.outtype, name=Path(args.model_path).name)
        except ValueError as error:
            raise SystemExit(f"error: --model_path {args.model_path}: {error}") from None
        print(f"wrote {outfile} ({outfile.stat().st_size / 2**20:.1f} MiB, {args.outtype})")
        return
    if args.command == "from_minimind":
        output = Path(args.output_dir or Path(args.input).with_suffix(""))
    else:
        suffix = {"to_hf": "hf", "from_hf": "minimind", "merge_lora": "merged"}[args.command]
        output = Path(args.output_dir or f"{args.model_path}_{suffix}")
    device = args.device or default_device()
    if args.command == "to_hf":
        export_hf(args.model_path, output)
        reference = load_pretrained(args.model_path, "--model_path")
        converted = AutoModelForCausalLM.from_pretrained(output)
    elif args.command == "from_hf":
        import_hf(args.model_path, output)
        reference = AutoModelForCausalLM.from_pretrained(args.model_path)
        converted = load_pretrained(output, "--output_dir")
    elif args.command == "from_minimind":
        reference = import_minimind(args.input, output, args.tokenizer, rope_theta=args.rope_theta,
                                    max_position_embeddings=args.max_position_embeddings,
                                    num_experts_per_tok=args.num_experts_per_tok)
        converted = load_pretrained(output, "--output_dir")
    else:
        merge_adapter(args.model_path, output, args.base_model_path)
        reference = adapted_model(args.model_path, args.base_model_path)
        converted = load_pretrained(output, "--output_dir")
    difference = require_same_logits(reference, converted, output, device)
    print(f"wrote {output} ({type(converted).__name__}); its logits equal the original's "
          f"(max |difference| {difference:.2e})")


if __name__ == "__main__":
    main()

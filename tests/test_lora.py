"""LoRA (model/model_lora.py, trainer/train_lora.py) against the reference implementation, peft.

Tiny models (hidden 32-64) on CPU in float32; every file goes under pytest's tmp_path.
"""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoTokenizer

from model.model_lora import LoRALinear, apply_lora, load_lora, merge_lora, save_lora
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer import train_lora
from trainer.checkpoint import resume_states, save_weights
from trainer.trainer_utils import load_pretrained

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dataset" / "data"
TARGETS = ("q_proj", "v_proj", "down_proj")


def tiny_model(seed: int = 0, hidden_size: int = 32, use_moe: bool = False) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    config = MiniMindConfig(vocab_size=96, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, use_moe=use_moe)
    return MiniMindForCausalLM(config).eval()


def randomize_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """B starts at zero (the adapted model equals the base); give it values so the adapter does something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


INPUT_IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))


def test_lora_linear_is_the_base_layer_at_init_and_adds_scaled_low_rank_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: exactly the pretrained model
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    expected = base(x) + (8.0 / 4) * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T  # W x + (alpha/r) B A x
    torch.testing.assert_close(layer(x), expected)
    assert not base.weight.requires_grad and layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, use_moe):
    ours = tiny_model(use_moe=use_moe)
    wrapped = apply_lora(ours, rank=4, alpha=8.0, target_modules=TARGETS)
    assert len(wrapped) == 2 * (2 + (4 if use_moe else 1))  # 2 layers x (q, v + down_proj in each expert)
    randomize_lora_b(ours)
    save_lora(ours, tmp_path / "adapter")

    peft_model = PeftModel.from_pretrained(tiny_model(use_moe=use_moe), tmp_path / "adapter").eval()
    difference = (logits(peft_model, INPUT_IDS) - logits(ours, INPUT_IDS)).abs().max().item()
    assert difference < 1e-4
    assert (logits(peft_model, INPUT_IDS) - logits(tiny_model(use_moe=use_moe), INPUT_IDS)).abs().max() > 1e-3


def test_peft_made_adapter_loads_in_ours_with_the_same_logits(tmp_path):
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=16, target_modules=list(TARGETS),
                                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
    randomize_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path / "peft_adapter")

    ours = tiny_model()
    load_lora(ours, tmp_path / "peft_adapter")
    difference = (logits(ours, INPUT_IDS) - logits(peft_model.eval(), INPUT_IDS)).abs().max().item()
    assert difference < 1e-4


def test_merged_model_equals_base_plus_adapter_and_saves_as_an_ordinary_checkpoint(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8.0, target_modules=TARGETS)
    randomize_lora_b(model)
    with_adapter = logits(model, INPUT_IDS)
    merge_lora(model)
    assert not any(isinstance(module, LoRALinear) for module in model.modules())
    torch.testing.assert_close(logits(model, INPUT_IDS), with_adapter, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path / "merged")
    reloaded = load_pretrained(tmp_path / "merged")  # strict: no lora_* or base_layer names left over
    torch.testing.assert_close(logits(reloaded.eval(), INPUT_IDS), with_adapter, rtol=1e-5, atol=1e-5)


def test_adapter_for_another_base_is_refused_with_a_clear_error(tmp_path):
    small = tiny_model(hidden_size=32)
    apply_lora(small, rank=4, alpha=8.0, target_modules=TARGETS)
    save_lora(small, tmp_path / "adapter")
    with pytest.raises(ValueError, match="does not fit this base model"):
        load_lora(tiny_model(hidden_size=64), tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="not supported.*use_dora"):
        load_lora(tiny_model(), tmp_path / "adapter")
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(tiny_model(), target_modules=("qkv",))


def test_train_lora_changes_only_the_adapters_and_saves_a_peft_adapter(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(REPO / "model" / "tokenizer")
    torch.manual_seed(0)
    base = MiniMindForCausalLM(MiniMindConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2))
    save_weights(base, tokenizer, tmp_path / "out" / "full_sft_64")
    data = tmp_path / "identity.jsonl"
    data.write_text("".join((DATA / "lora_identity.jsonl").read_text().splitlines(keepends=True)[:16]))

    result = train_lora.main([
        "--data_path", str(data), "--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ckpt"),
        "--hidden_size", "64", "--max_seq_len", "64", "--batch_size", "4", "--epochs", "2", "--lora_rank", "4",
        "--device", "cpu", "--dtype", "float32", "--warmup_steps", "1", "--merge", "1",
    ])
    adapter_dir = tmp_path / "out" / "lora_identity_64"
    assert Path(result["weights_dir"]) == adapter_dir
    saved = safetensors.torch.load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in key or ".lora_B." in key for key in saved)
    assert any(saved[key].abs().max() > 0 for key in saved if ".lora_B." in key)  # B moved away from zero

    # the base weights of the trained model (in the resume state) are the pretrained ones, bit for bit
    resume_state = resume_states(tmp_path / "ckpt" / "lora_identity_64_resume")[-1]
    dcp_to_torch_save(resume_state, tmp_path / "resume.pt")
    state = torch.load(tmp_path / "resume.pt", weights_only=True)["model"]
    for name, tensor in base.named_parameters():
        module, _, leaf = name.rpartition(".")
        key = f"{module}.base_layer.{leaf}" if f"{module}.base_layer.{leaf}" in state else name  # wrapped or not
        key = key if key in state else "lm_head.weight"  # the tied embedding is stored once, as the head
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0)

    # peft opens the adapter on the base; the merged checkpoint gives the same logits
    ids = torch.tensor([tokenizer.encode("who are you?")])
    peft_model = PeftModel.from_pretrained(load_pretrained(tmp_path / "out" / "full_sft_64"), adapter_dir).eval()
    merged = load_pretrained(Path(result["merged_dir"])).eval()
    assert (logits(peft_model, ids) - logits(merged, ids)).abs().max() < 1e-4

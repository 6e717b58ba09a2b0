"""Knowledge distillation (trainer/train_distill.py) as specifications: the loss against Hinton et al. (2015)
computed by hand, a frozen teacher, the tokenizer check, and a whole run of the stage.

Tiny models (teacher hidden 64, student hidden 32) on the first lines of dataset/data/sft.jsonl; every run writes
under pytest's tmp_path, never into the repository.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoTokenizer

from conftest import tiny_model
from dataset.lm_dataset import SFTDataset
from model.model_minimind import IGNORE_INDEX
from trainer import train_distill
from trainer.checkpoint import save_weights
from trainer.train_distill import distillation_loss, load_teacher, student_teacher_loss
from trainer.train_tokenizer import iter_training_texts, to_hf_tokenizer, train_bpe
from trainer.trainer_utils import load_pretrained, parse_args

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dataset" / "data"
TOKENIZER = REPO / "model" / "tokenizer"
STUDENT = ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "4",
           "--num_key_value_heads", "2", "--max_seq_len", "128", "--device", "cpu", "--dtype", "float32",
           "--warmup_steps", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The first lines of the shipped SFT files: real conversations, few enough for runs of a few seconds."""
    directory = tmp_path_factory.mktemp("data")
    files = {}
    for name, lines in {"sft": 16, "sft_test": 8}.items():
        files[name] = directory / f"{name}.jsonl"
        files[name].write_text("".join((DATA / f"{name}.jsonl").read_text().splitlines(keepends=True)[:lines]))
    return files


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory, tokenizer) -> Path:
    """A --save_dir holding two teachers with the shipped tokenizer: full_sft_64 (dense) and full_sft_64_moe."""
    directory = tmp_path_factory.mktemp("out")
    save_weights(tiny_model(len(tokenizer)), tokenizer, directory / "full_sft_64")
    save_weights(tiny_model(len(tokenizer), use_moe=True), tokenizer, directory / "full_sft_64_moe")
    return directory


def distill_argv(data, save_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data["sft"]), "--eval_data_path", str(data["sft_test"]), "--save_dir", str(save_dir),
            "--checkpoint_dir", str(tmp_path / "checkpoints"), "--teacher_hidden_size", "64", "--batch_size", "4",
            "--max_steps", "2", "--log_interval", "1", "--eval_interval", "2", *STUDENT, *extra]


def random_example(seed: int = 0, batch: int = 2, seq: int = 6, vocab: int = 11):
    """Random student and teacher logits (batch, seq, vocab) and labels with -100 at some positions."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=generator) * 3
    teacher = torch.randn(batch, seq, vocab, generator=generator) * 3
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[0, :3] = IGNORE_INDEX  # a prompt: positions 0 and 1 predict no label
    labels[1, 4:] = IGNORE_INDEX  # padding: positions 3 and 4 predict no label
    return student, teacher, labels


def test_kl_is_zero_and_loss_is_alpha_times_ce_when_teacher_equals_student():
    student, _, labels = random_example()
    for alpha, temperature in [(0.5, 2.0), (0.0, 1.0), (0.3, 5.0)]:
        loss, ce, kl = distillation_loss(student, student.clone(), labels, alpha, temperature)
        assert kl == 0.0
        assert loss == alpha * ce
        assert ce > 0


def test_distillation_loss_matches_the_formula_computed_by_hand():
    student, teacher, labels = random_example()
    alpha, temperature = 0.3, 2.5

    def softmax(logits: list[float]) -> list[float]:
        exps = [math.exp(value) for value in logits]
        return [value / sum(exps) for value in exps]

    ce_terms, kl_terms = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            s, z = student[b, t].double().tolist(), teacher[b, t].double().tolist()
            ce_terms.append(-math.log(softmax(s)[target]))
            p_teacher, p_student = softmax([v / temperature for v in z]), softmax([v / temperature for v in s])
            kl_terms.append(sum(p * (math.log(p) - math.log(q)) for p, q in zip(p_teacher, p_student)))
    assert len(ce_terms) == 2 * 5 - 2 - 2  # 5 predicting positions per row, 2 + 2 of them unsupervised
    ce, kl = sum(ce_terms) / len(ce_terms), sum(kl_terms) / len(kl_terms)

    got_loss, got_ce, got_kl = distillation_loss(student, teacher, labels, alpha, temperature)
    assert got_ce.item() == pytest.approx(ce, rel=1e-5)
    assert got_kl.item() == pytest.approx(kl, rel=1e-5)
    assert got_loss.item() == pytest.approx(alpha * ce + (1 - alpha) * temperature**2 * kl, rel=1e-5)

    # unsupervised positions do not count, whatever the logits there
    changed = student.clone()
    changed[0, :2], changed[1, 3:] = 100.0, -100.0
    assert torch.allclose(distillation_loss(changed, teacher, labels, alpha, temperature)[0], got_loss)


def test_soft_term_gradient_is_temperature_times_probability_difference():
    # Hinton et al. 2015 eq. 2: d KL / d s_i = (q_i - p_i) / T per position (q student, p teacher); times T^2: T * (...)
    student, teacher, labels = random_example()
    student.requires_grad_(True)
    temperature = 3.0
    loss, _, _ = distillation_loss(student, teacher, labels, alpha=0.0, temperature=temperature)
    loss.backward()
    supervised = torch.zeros_like(labels, dtype=torch.bool)
    supervised[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    difference = torch.softmax(student.detach() / temperature, -1) - torch.softmax(teacher / temperature, -1)
    expected = temperature * difference / supervised.sum() * supervised[..., None]
    assert torch.allclose(student.grad, expected, atol=1e-7)


def test_gradient_reaches_the_student_only_and_the_kl_of_a_model_with_itself_is_zero(data, tokenizer):
    dataset = SFTDataset(data["sft"], tokenizer, max_seq_len=64)
    batch = dataset.collate([dataset[i] for i in range(3)])
    student = tiny_model(len(tokenizer), seed=1)
    teacher = tiny_model(len(tokenizer), seed=2).eval().requires_grad_(False)
    before = copy.deepcopy(teacher.state_dict())

    loss, metrics = student_teacher_loss(student, teacher, batch, alpha=0.5, temperature=2.0)
    loss.backward()
    assert metrics["kl_loss"] > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(value, teacher.state_dict()[key]) for key, value in before.items())

    itself = copy.deepcopy(student).eval().requires_grad_(False)
    loss, metrics = student_teacher_loss(student.eval(), itself, batch, alpha=0.5, temperature=2.0)
    assert metrics["kl_loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(0.5 * metrics["lm_loss"].item(), rel=1e-6)


def test_moe_student_adds_its_router_loss_to_the_distillation_loss(data, tokenizer):
    dataset = SFTDataset(data["sft"], tokenizer, max_seq_len=64)
    batch = dataset.collate([dataset[i] for i in range(3)])
    student = tiny_model(len(tokenizer), seed=1, use_moe=True)
    teacher = tiny_model(len(tokenizer), seed=2).eval().requires_grad_(False)
    loss, metrics = student_teacher_loss(student, teacher, batch, alpha=0.5, temperature=2.0)
    assert metrics["distill_loss"].item() == pytest.approx(0.5 * metrics["lm_loss"].item() +
                                                           0.5 * 2.0**2 * metrics["kl_loss"].item(), rel=1e-6)
    coef = student.config.router_aux_loss_coef
    assert metrics["aux_loss"] > 0
    assert loss.item() == pytest.approx(metrics["distill_loss"].item() + coef * metrics["aux_loss"].item(), rel=1e-6)


@pytest.mark.parametrize("teacher_use_moe", [0, 1])
def test_distill_a_smaller_student_from_scratch(data, save_dir, tokenizer, tmp_path, teacher_use_moe):
    teacher_file = save_dir / f"full_sft_64{'_moe' if teacher_use_moe else ''}" / "model.safetensors"
    teacher_before = safetensors.torch.load_file(teacher_file)
    out = tmp_path / "out"
    out.mkdir()
    argv = distill_argv(data, save_dir, tmp_path, "--teacher_use_moe", str(teacher_use_moe))
    summary = train_distill.main([*argv, "--save_dir", str(out), "--teacher_weight", str(teacher_file.parent)])

    assert summary["step"] == 2 and summary["weights_dir"] == str(out / "distill_32")
    student = load_pretrained(out / "distill_32")
    assert (student.config.hidden_size, student.config.num_hidden_layers, student.config.use_moe) == (32, 1, False)
    assert AutoTokenizer.from_pretrained(out / "distill_32").get_vocab() == tokenizer.get_vocab()
    records = [json.loads(line) for line in (out / "runs" / "distill_32" / "metrics.jsonl").read_text().splitlines()]
    for record in [record for record in records if "loss" in record]:
        assert record["loss"] == pytest.approx(0.5 * record["lm_loss"] + 0.5 * 2.0**2 * record["kl_loss"], rel=1e-5)
    evaluation = summary["eval"]
    assert evaluation["eval_ppl"] == pytest.approx(math.exp(evaluation["eval_lm_loss"]))
    assert evaluation["eval_kl_loss"] > 0
    # the teacher was read, never written
    teacher_after = safetensors.torch.load_file(teacher_file)
    assert all(torch.equal(teacher_before[key], teacher_after[key]) for key in teacher_before)


def test_teacher_is_found_by_stage_name_and_alpha_one_trains_without_it(data, save_dir, tokenizer, tmp_path):
    args = parse_args("distill", "test", add_flags=train_distill.distill_flags,
                      argv=distill_argv(data, save_dir, tmp_path, "--teacher_use_moe", "1"))
    student = tiny_model(6400)
    teacher = load_teacher(args, student, tokenizer)
    assert teacher.config.use_moe and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())

    out = tmp_path / "out"
    summary = train_distill.main([*distill_argv(data, save_dir, tmp_path), "--save_dir", str(out),
                                  "--alpha", "1", "--teacher_weight", "no_such_stage"])
    assert summary["step"] == 2
    assert "eval_kl_loss" not in summary["eval"]


def teacher_with_another_tokenizer(data, directory: Path) -> Path:
    """A teacher of the student's vocab_size whose tokenizer was trained on other text (a different vocabulary)."""
    tokenizer = to_hf_tokenizer(train_bpe(iter_training_texts([data["sft_test"]]), vocab_size=300))
    save_weights(tiny_model(6400), tokenizer, directory)
    return directory


def teacher_with_another_vocab_size(data, directory: Path) -> Path:
    """A teacher with the student's tokenizer but 64 extra rows in its embedding and output layer."""
    save_weights(tiny_model(6464), AutoTokenizer.from_pretrained(TOKENIZER), directory)
    return directory


@pytest.mark.parametrize("make_teacher, message", [
    (teacher_with_another_tokenizer, r"the teacher's tokenizer in .*teacher differs from the student's in .*tokenizer"),
    (teacher_with_another_vocab_size, "the teacher in .*teacher has vocab_size 6464 but the student has 6400"),
])
def test_teacher_that_does_not_share_the_students_vocabulary_fails_clearly(data, tmp_path, make_teacher, message):
    teacher_dir = make_teacher(data, tmp_path / "teacher")
    argv = distill_argv(data, tmp_path / "out", tmp_path, "--teacher_weight", str(teacher_dir))
    with pytest.raises(SystemExit, match=f"--teacher_weight {teacher_dir}: {message}"):
        train_distill.main(argv)


@pytest.mark.parametrize("flag, value", [("--alpha", "1.5"), ("--alpha", "nan"), ("--temperature", "0"),
                                         ("--temperature", "inf")])
def test_alpha_and_temperature_out_of_range_fail_clearly(capsys, flag, value):
    with pytest.raises(SystemExit):
        train_distill.main([flag, value, "--device", "cpu"])
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_missing_teacher_names_the_flag(data, tmp_path):
    with pytest.raises(SystemExit, match="--teacher_weight full_sft: no checkpoint at .*full_sft_64"):
        train_distill.main(distill_argv(data, tmp_path / "out", tmp_path))

"""The defaults that decide speed (issue: fast on the hardware users have): `--dtype auto` picks bfloat16 only where
a timed matmul shows it clearly faster, `--compile auto` compiles only a run long enough to earn it back and
falls back to eager when compilation fails, and the chunked loss equals the plain one.

The decisions are tested on faked timings (no timing test: these machines are noisy); the figures themselves
are bench/bench_train.py's.
"""

import json

import pytest
import torch

from conftest import tiny_model
from model import precision
from model.model_minimind import chunked_next_token_loss, next_token_loss
from test_trainer import pretrain_argv
from trainer import train_pretrain, trainer_utils
from trainer.trainer_utils import Compiler, compile_pays


# ----------------------------------------------------------------------------------------------------------------
# --dtype auto


def test_cpu_without_native_bf16_trains_in_float32():
    choice = precision.choose_cpu_dtype([], None, None)
    assert choice.dtype == "float32" and "without native bfloat16" in choice.reason


@pytest.mark.parametrize("fp32, bf16, expected", [
    (390.0, 2400.0, "bfloat16"),  # Intel AMX host: 6x
    (85.0, 200.0, "bfloat16"),  # AMD Zen 4 host (AVX512-BF16): 2.3x
    (100.0, 120.0, "float32"),  # native but barely faster: not worth bfloat16's rounding
    (70.0, 0.7, "float32"),  # emulated: 100x slower
])
def test_cpu_dtype_follows_the_two_timings(fp32, bf16, expected):
    choice = precision.choose_cpu_dtype(["avx512_bf16"], fp32, bf16)
    assert choice.dtype == expected
    assert f"bfloat16 {bf16:.0f} vs float32 {fp32:.0f} GFLOP/s" in choice.reason  # the figures are printed


def test_no_timing_where_the_cpu_lacks_the_instructions(monkeypatch):
    precision.measure_cpu_dtype.cache_clear()
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    monkeypatch.setattr(precision, "matmul_gflops", lambda *a, **k: pytest.fail("timed a matmul"))
    try:
        assert precision.resolve_dtype("auto", "cpu").dtype == "float32"
    finally:
        precision.measure_cpu_dtype.cache_clear()


def test_explicit_dtype_is_kept_and_cuda_keeps_its_rule():
    assert precision.resolve_dtype("float32", "cpu") == precision.DtypeChoice("float32", "--dtype float32")
    assert precision.resolve_dtype("auto", "mps").dtype == "float32"


def test_a_run_prints_the_decision_and_writes_it_into_the_metrics_header(data, tmp_path, monkeypatch, capsys):
    decided = precision.DtypeChoice("float32", "CPU matmul bfloat16 90 vs float32 100 GFLOP/s: float32 (faked)")
    monkeypatch.setattr(precision, "measure_cpu_dtype", lambda: decided)
    argv = [arg for arg in pretrain_argv(data, tmp_path, "--max_steps", "2") if arg != "float32"]
    argv[argv.index("--dtype") + 1:argv.index("--dtype") + 1] = ["auto"]
    train_pretrain.main(argv)
    printed = capsys.readouterr()
    assert f"dtype: {decided.reason}" in printed.out + printed.err
    header = json.loads((tmp_path / "out" / "runs" / "pretrain_64" / "metrics.jsonl").read_text().splitlines()[0])
    assert header == {"step": 0, "dtype": "float32", "dtype_reason": decided.reason}


# ----------------------------------------------------------------------------------------------------------------
# --compile auto


def test_compile_pays_only_for_runs_long_against_its_cost(monkeypatch):
    monkeypatch.setitem(trainer_utils.COMPILE_COST_S, "cpu", 60.0)
    monkeypatch.setitem(trainer_utils.COMPILE_SPEEDUP, "cpu", 1.25)  # saves 20% of each step
    assert not compile_pays(599.0, "cpu")  # 20% of 599 s < 2 x 60 s
    assert compile_pays(601.0, "cpu")
    assert not compile_pays(1e6, "mps")


class FakeCompile:
    """Stands in for torch.compile: records the calls; the 'compiled' module raises when `fails`."""

    def __init__(self, fails: bool = False):
        self.calls, self.fails = [], fails

    def __call__(self, module):
        self.calls.append(module)
        return "compiled"


def test_auto_compiles_after_timing_the_first_steps_when_the_rest_is_long(monkeypatch):
    fake = FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    monkeypatch.setitem(trainer_utils.COMPILE_COST_S, "cpu", 10.0)
    monkeypatch.setitem(trainer_utils.COMPILE_SPEEDUP, "cpu", 1.5)
    long_run, short_run = Compiler("eager", "auto", "cpu"), Compiler("eager", "auto", "cpu")
    for step_seconds in (5.0, 1.0, 1.0):  # the first step (warm-up) is not counted
        long_run.consider(step_seconds, remaining_steps=100)  # 100 s left: saves 33 s > 2 x 10 s
        short_run.consider(step_seconds, remaining_steps=50)  # 50 s left: saves 17 s
    assert long_run.module == "compiled" and fake.calls == ["eager"]
    assert short_run.module == "eager"
    long_run.consider(1.0, remaining_steps=10_000)  # decided once
    assert fake.calls == ["eager"]
    assert Compiler("eager", 0, "cpu").module == "eager"
    varying = Compiler("eager", "auto", "cpu", fixed_shapes=False)  # SFT: every new batch length would recompile
    for step_seconds in (5.0, 1.0, 1.0):
        varying.consider(step_seconds, remaining_steps=10_000)
    assert varying.module == "eager"


def test_a_failing_compilation_warns_once_and_the_step_runs_eagerly(capsys):
    compiler, resets = Compiler("eager", 0, "cpu"), []
    compiler.module = "compiled"  # as after --compile 1

    def step(module):
        if module == "compiled":
            raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")
        return f"stepped {module}"

    assert compiler.run(step, reset=lambda: resets.append(1)) == "stepped eager"
    assert resets == [1]  # the partial gradients of the failed try are cleared
    assert compiler.run(step, reset=lambda: resets.append(1)) == "stepped eager"
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("warning: torch.compile failed (RuntimeError: InductorError: no working C++ compiler") == 1


def test_compile_flag_accepts_upstream_name_and_auto():
    args = trainer_utils.parse_args("pretrain", "test", argv=["--use_compile", "1", "--device", "cpu"])
    assert args.compile == 1
    assert trainer_utils.parse_args("pretrain", "test", argv=["--device", "cpu"]).compile == "auto"
    with pytest.raises(SystemExit):
        trainer_utils.parse_args("pretrain", "test", argv=["--compile", "yes", "--device", "cpu"])


# ----------------------------------------------------------------------------------------------------------------
# The chunked loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_the_full_logits_loss_and_its_gradients(dtype):
    model = tiny_model(vocab_size=500)
    input_ids = torch.randint(0, 500, (3, 40), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[0, :25] = -100  # a prompt without loss
    labels[2, 30:] = -100  # padding
    results = []
    for chunk in (None, 7):  # 7 positions a chunk: chunks cross row boundaries, the last one is short
        with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            if chunk is None:
                loss = next_token_loss(model(input_ids).logits, labels)
            else:
                hidden = model.model(input_ids)[0]
                loss = chunked_next_token_loss(hidden, model.lm_head.weight, labels, chunk=chunk)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (full, full_grads), (chunked, chunked_grads) = results
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # bfloat16 rounds the head's product either way
    torch.testing.assert_close(chunked, full, rtol=tolerance, atol=tolerance)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=tolerance, atol=tolerance * grad.abs().max(),
                                   msg=name)


def test_training_forward_keeps_no_logits_and_gives_the_same_loss():
    model = tiny_model(vocab_size=500)
    input_ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(input_ids, labels=input_ids, return_logits=False)
    assert out.logits is None
    assert out.loss.item() == pytest.approx(model(input_ids, labels=input_ids).loss.item(), rel=1e-6)
    with torch.no_grad():  # evaluation: the loss only, no gradients computed in the forward
        assert model(input_ids, labels=input_ids, return_logits=False).loss.item() == pytest.approx(out.loss.item())

"""Checkpoints on disk: the weights directory of a stage and the resume state of a run.

Two kinds (DESIGN.md, "Checkpoints"):

- weights: `<save_dir>/<save_weight>_<hidden_size>[_moe]/`, a Hugging Face directory (config.json,
  model.safetensors, generation_config.json, tokenizer files). `--from_weight`, chat, eval and convert open it
  with `from_pretrained`; it knows its own config.
- resume state: `<checkpoint_dir>/<save_weight>_<hidden_size>[_moe]_resume/`: the weights again (safetensors)
  plus `trainer_state.pt` (optimizer, grad scaler, step, epoch, position in the epoch, RNG states, world size,
  wandb run id), so that `--from_resume 1` continues exactly where a run stopped.

Both are written to `<dir>.tmp-<pid>` and then renamed into place, so a kill during a save leaves the previous
checkpoint as it was, never a half-written one. `trainer_state.pt` holds only tensors and plain Python values
and is read with `torch.load(..., weights_only=True)`, which never unpickles code.
"""

import os
import random
import shutil
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
import torch.distributed as dist

from trainer.distributed import log, rank_and_world_size

RESUME_STATE_FILE = "trainer_state.pt"
RESUME_WEIGHTS_FILE = "model.safetensors"


def checkpoint_name(save_weight: str, hidden_size: int, use_moe: bool) -> str:
    """The directory name of a stage's checkpoint, e.g. `pretrain_512` or `full_sft_640_moe`."""
    return f"{save_weight}_{hidden_size}{'_moe' if use_moe else ''}"


def write_dir_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to fill a fresh `<directory>.tmp-<pid>`, then put it in place of `directory`.

    An existing `directory` is renamed aside (`<directory>.old-<pid>`) and deleted only after the new one is in
    place, so at every moment a complete checkpoint is on disk.
    """
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def save_weights(model: torch.nn.Module, tokenizer, directory: Path) -> None:
    """Save a Hugging Face weights directory: config.json, model.safetensors, generation_config.json, tokenizer."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomically(directory, write)


def rng_state(device: torch.device) -> dict:
    """The random number generator states of this process (Python, torch CPU and, on CUDA, the GPU's)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore the states returned by `rng_state`."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_resume_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: dict,
) -> None:
    """Write the resume state: the model's weights and `trainer_state.pt` = `state` + optimizer + scaler.

    Args:
        model: the unwrapped model (not the DDP wrapper), so parameter names carry no `module.` prefix.
        state: plain values and tensors only (step, epoch, batch position, RNG states, ...).
    """

    def write(tmp: Path) -> None:
        safetensors.torch.save_model(model, str(tmp / RESUME_WEIGHTS_FILE))  # handles the tied embedding/head
        trainer_state = {**state, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
        torch.save(trainer_state, tmp / RESUME_STATE_FILE)

    write_dir_atomically(directory, write)


def load_resume_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> dict:
    """Load what `save_resume_state` wrote into `model`, `optimizer` and `scaler`; return the rest of the state.

    Raises:
        SystemExit: when the saved weights do not fit the model (a different --hidden_size, --use_moe, ...).
    """
    directory = Path(directory)
    try:
        safetensors.torch.load_model(model, str(directory / RESUME_WEIGHTS_FILE), strict=True)
    except RuntimeError as error:
        raise SystemExit(
            f"--from_resume 1: the state in {directory} does not fit this model ({str(error).splitlines()[0]}); "
            "pass the flags of the interrupted run or delete that directory"
        ) from None
    state = torch.load(directory / RESUME_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    scaler_state = state.pop("scaler")
    if scaler_state:  # empty when the interrupted run did not use float16
        scaler.load_state_dict(scaler_state)
    return state


def save_checkpoint(model, tokenizer, optimizer, scaler, state: dict, weights_dir: Path, resume_dir: Path,
                    save_weights_fn: Callable = save_weights) -> None:
    """Save the weights dir (with save_weights_fn) and the resume state; every rank calls it, rank 0 writes.

    The resume state also holds every rank's RNG states (gathered here) and the world size.
    """
    rank, world_size = rank_and_world_size()
    device = next(model.parameters()).device
    rngs = [rng_state(device)]
    if world_size > 1:
        rngs = [None] * world_size
        dist.all_gather_object(rngs, rng_state(device))
    if rank == 0:
        save_weights_fn(model, tokenizer, weights_dir)
        save_resume_state(resume_dir, model, optimizer, scaler, {**state, "rng": rngs, "world_size": world_size})
    if world_size > 1:
        dist.barrier()  # no rank runs ahead (or exits) before the files are complete


def restore_checkpoint(resume_dir: Path, model, optimizer, scaler) -> dict:
    """Load the resume state `save_checkpoint` wrote into model, optimizer and scaler; return the loop's state.

    With the same number of processes each rank gets its RNG states back, so the run continues exactly. With a
    different number the position in the epoch is converted to cover the same global batches (rank r reads
    batches r, r + world_size, ...), and the RNG streams restart from the seed.
    """
    rank, world_size = rank_and_world_size()
    state = load_resume_state(resume_dir, model, optimizer, scaler)
    rngs, saved_world_size = state.pop("rng"), state.pop("world_size")
    if saved_world_size == world_size:
        set_rng_state(rngs[rank], next(model.parameters()).device)
    else:
        state["batch_in_epoch"] = -(-state["batch_in_epoch"] * saved_world_size // world_size)  # ceil
        log(f"the interrupted run had {saved_world_size} processes and this one {world_size}: "
            "it continues at the same place in the data, with fresh random number streams")
    return state

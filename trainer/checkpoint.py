"""Checkpoints on disk: the weights directory of a stage and the resume states of a run.

Two kinds (DESIGN.md, "Checkpoints"):

- weights: `<save_dir>/<save_weight>_<hidden_size>[_moe]/`, a Hugging Face directory (config.json,
  model.safetensors, generation_config.json, tokenizer files). `--from_weight`, chat, eval and convert open it
  with `from_pretrained`; it knows its own config. Under FSDP the shards are gathered into it by rank 0.
- resume states: `<checkpoint_dir>/<save_weight>_<hidden_size>[_moe]_resume/step_<step>/`, the last
  `--keep_last` of them. Each holds the model and AdamW state as a `torch.distributed.checkpoint` (DCP) directory,
  keyed by parameter name, so the same state resumes under one process, DDP or FSDP and with another number of
  processes (DCP reshards on load), plus `trainer_state.pt` (step, epoch, position in the epoch, tokens seen,
  grad scaler, every rank's RNG states, world size, wandb run id, and the settings that define the run: batch
  size, accumulation, sequence length, epochs, seed, the data file's size and the hash of its ends, the model's
  shape). `--from_resume 1` continues from the newest intact one and refuses to continue under other settings.

Every resume state ends with `manifest.json` (the sha256 of each file), and the run writing a resume dir holds
a lock on it: the checks a state passes before a run continues from it are in `trainer/resume_checks.py`. A
weights dir saved before its run finished holds `PARTIAL.json` (its step), so that `--from_weight` does not take
a half-trained stage for a finished one.

Every directory is written under a temporary name and renamed into place in one step, so a kill at any moment
(during a save included) leaves the previous checkpoints as they were, never a half-written one; temporary
leftovers of a killed save are removed by the next save. `trainer_state.pt` holds only tensors and plain Python
values and is read with `torch.load(..., weights_only=True)`, which never unpickles code.
"""

import json
import os
import random
import re
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule

from trainer.distributed import is_deepspeed, is_sharded, log, rank_and_world_size
from trainer.resume_checks import check_same_run, newest_intact_state, write_manifest

RESUME_STATE_FILE = "trainer_state.pt"
PARTIAL_FILE = "PARTIAL.json"  # in a weights dir saved before its run reached its last step
DEEPSPEED_TAG = "deepspeed"  # the subdirectory a DeepSpeed engine's resume state is written to
STEP_DIR = re.compile(r"step_(\d+)")  # a complete resume state; temporary names have a suffix
# DCP warns on every single-process save and load that it assumes a single process: it is what we ask for
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def checkpoint_name(save_weight: str, hidden_size: int, use_moe: bool) -> str:
    """The directory name of a stage's checkpoint, e.g. `pretrain_512` or `full_sft_640_moe`."""
    return f"{save_weight}_{hidden_size}{'_moe' if use_moe else ''}"


def write_dir_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to fill a fresh `<directory>.tmp-<pid>`, then put it in place of `directory`.

    An existing `directory` is renamed aside (`<directory>.old-<pid>`) and deleted only after the new one is in
    place, so at every moment a complete checkpoint is on disk (under one of the two names). A save killed
    between the two renames is repaired by the next one, which first moves the set-aside directory back.
    """
    directory = Path(directory)
    leftovers = sorted(directory.parent.glob(f"{directory.name}.old-*")) + sorted(
        directory.parent.glob(f"{directory.name}.tmp-*"))
    if not directory.exists() and leftovers and ".old-" in leftovers[0].name:
        leftovers.pop(0).rename(directory)
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
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


def resume_states(resume_dir: Path) -> list[Path]:
    """The complete resume states under `resume_dir` (`step_<n>` directories), oldest first."""
    found = [(int(m.group(1)), path) for path in Path(resume_dir).glob("step_*")
             if (m := STEP_DIR.fullmatch(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found)]


def save_resume_state(resume_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, state: dict, keep_last: int) -> None:
    """Write `resume_dir/step_<state["step"]>/` (DCP model + optimizer, trainer_state.pt); keep the last `keep_last`.

    Every rank calls it (DCP writes each rank's shards in parallel; unsharded tensors are written once).
    The directory is filled under `step_<n>.tmp` and renamed by rank 0 after every rank has finished.
    Args:
        model: the model with its names as the weights dir has them (not a DDP wrapper); FSDP-sharded or not.
        state: plain values and tensors only (step, epoch, batch position, RNG states, ...).
    """
    rank, world_size = rank_and_world_size()
    final = Path(resume_dir) / f"step_{state['step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        for leftover in Path(resume_dir).glob("step_*.tmp"):  # of a save that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world_size > 1:
        dist.barrier()  # the directory exists before any rank writes into it
    if is_deepspeed(model):  # DeepSpeed writes its own partitioned format (files per rank) under a subdirectory
        model.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False)
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp, no_dist=world_size == 1)
    if world_size > 1:
        dist.barrier()  # every rank's files are written before rank 0 hashes them
    if rank == 0:
        torch.save({**state, "scaler": scaler.state_dict()}, tmp / RESUME_STATE_FILE)
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a resume
        tmp.rename(final)
        for stale in resume_states(resume_dir)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    if world_size > 1:
        dist.barrier()  # no rank runs ahead (or exits) before the files are complete


def load_resume_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler) -> dict:
    """Load what `save_resume_state` wrote into `model`, `optimizer` and `scaler`; return the rest of the state.

    Raises:
        SystemExit: when the saved weights do not fit the model (a different --hidden_size, --use_moe, LoRA...).
    """
    directory = Path(directory)
    saved_by_deepspeed = (directory / DEEPSPEED_TAG).is_dir()
    if is_deepspeed(model) != saved_by_deepspeed:
        saved_with = "deepspeed" if saved_by_deepspeed else "ddp or fsdp"
        raise SystemExit(f"--from_resume 1: {directory} was saved under --parallel {saved_with}, which this run does "
                         "not use; resume with that --parallel, or start from its weights with --from_weight")
    if is_deepspeed(model):
        model.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        return load_trainer_state(directory, scaler)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    saved_shapes = {key.removeprefix("model."): tuple(meta.size) for key, meta in saved.items()
                    if key.startswith("model.") and hasattr(meta, "size")}
    shapes = {key: tuple(value.shape) for key, value in model_state.items()}
    if saved_shapes != shapes:
        difference = sorted(set(saved_shapes.items()) ^ set(shapes.items()))[0][0]
        raise SystemExit(
            f"--from_resume 1: the state in {directory} does not fit this model (first difference: {difference}: "
            f"saved {saved_shapes.get(difference)}, model {shapes.get(difference)}); pass the flags of the "
            "interrupted run or delete that directory")
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory,
             no_dist=rank_and_world_size()[1] == 1)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    return load_trainer_state(directory, scaler)


def load_trainer_state(directory: Path, scaler: torch.amp.GradScaler) -> dict:
    """Read `trainer_state.pt` (plain values and tensors only), restore the scaler, return the loop's state."""
    state = torch.load(Path(directory) / RESUME_STATE_FILE, map_location="cpu", weights_only=True)
    scaler_state = state.pop("scaler")
    if scaler_state:  # empty when the interrupted run did not use float16
        scaler.load_state_dict(scaler_state)
    return state


def marked_unfinished(save_weights_fn: Callable, partial: dict) -> Callable:
    """save_weights_fn that also writes PARTIAL_FILE (`partial`: the step) into the weights dir.

    The marker is written into the temporary directory before the one rename that puts it in place, so at no
    moment do the weights of an unfinished run stand there unmarked.
    """

    def save(model, tokenizer, directory: Path) -> None:
        def write(tmp: Path) -> None:
            save_weights_fn(model, tokenizer, tmp)
            (tmp / PARTIAL_FILE).write_text(json.dumps(partial) + "\n")

        write_dir_atomically(directory, write)

    return save


def unfinished_step(directory: Path) -> str | None:
    """The step a weights dir was saved at when its run had not finished ("3 of 10"); None for a finished one."""
    marker = Path(directory) / PARTIAL_FILE
    if not marker.is_file():
        return None
    try:
        partial = json.loads(marker.read_text())
        return f"{partial['step']} of {partial['total_steps']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "an unknown step"


def save_full_weights(model: torch.nn.Module, tokenizer, directory: Path, save_weights_fn: Callable) -> None:
    """Every rank calls it; rank 0 writes the weights dir with `save_weights_fn(model, tokenizer, directory)`.

    Under FSDP each rank holds a shard of every weight: they are first gathered (on the CPU, into rank 0) and
    loaded into an unsharded copy of the model, which is what gets saved. A DeepSpeed engine saves its module
    (under ZeRO-3 with its weights gathered on every rank for the time of the save).
    """
    rank = rank_and_world_size()[0]
    if is_deepspeed(model):  # ZeRO-3 partitions the weights: gather them for the time of the save
        import deepspeed
        module = model.module
        whole = (deepspeed.zero.GatheredParameters(list(module.parameters()))
                 if model.zero_optimization_stage() == 3 else nullcontext())
        with whole:
            if rank == 0:
                save_weights_fn(module, tokenizer, directory)
    elif is_sharded(model):
        full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            # fully_shard gave the model a subclass of (FSDPModule, its class): build one of its plain class
            plain_class = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
            copy = plain_class(model.config)
            copy.load_state_dict(full_state)
            save_weights_fn(copy, tokenizer, directory)
    elif rank == 0:
        save_weights_fn(model, tokenizer, directory)


def save_checkpoint(model, tokenizer, optimizer, scaler, state: dict, weights_dir: Path, resume_dir: Path,
                    save_weights_fn: Callable = save_weights, keep_last: int = 2,
                    total_steps: int | None = None) -> None:
    """Save the weights dir (with save_weights_fn) and a resume state; every rank calls it.

    The resume state also holds every rank's RNG states (gathered here) and the world size. When `total_steps`
    is given and state["step"] has not reached it, the weights dir is marked unfinished (PARTIAL_FILE), so a
    later stage's --from_weight refuses it; the save at the last step writes it without the marker.
    """
    if total_steps is not None and state["step"] < total_steps:
        save_weights_fn = marked_unfinished(save_weights_fn, {"step": state["step"], "total_steps": total_steps,
                                                              "resume_dir": str(resume_dir)})
    world_size = rank_and_world_size()[1]
    device = next(model.parameters()).device
    rngs = [rng_state(device)]
    if world_size > 1:
        rngs = [None] * world_size
        dist.all_gather_object(rngs, rng_state(device))
    save_full_weights(model, tokenizer, weights_dir, save_weights_fn)
    save_resume_state(resume_dir, model, optimizer, scaler, {**state, "rng": rngs, "world_size": world_size},
                      keep_last)


def restore_checkpoint(resume_dir: Path, model, optimizer, scaler, run: dict | None = None) -> dict | None:
    """Load the newest intact resume state under `resume_dir` into model, optimizer and scaler; return the loop's
    state.

    None when there is none yet. A state whose files do not match its manifest is reported and the one before it
    is used. `run` (run_settings of this run) is compared with the saved run's settings first (check_same_run).
    With the same number of processes each rank gets its RNG states back, so the run continues exactly. With a
    different number the position in the epoch is converted to cover the same global batches (rank r reads
    batches r, r + world_size, ...), and the RNG streams restart from the seed.
    Raises:
        SystemExit: no intact state, other run settings, a DeepSpeed state under another number of processes.
    """
    states = resume_states(resume_dir)
    if not states:
        return None
    rank, world_size = rank_and_world_size()
    chosen = [None, None]  # rank 0 checks the files once and tells every rank which state (or what failed)
    if rank == 0:
        try:
            chosen[0] = newest_intact_state(resume_dir, states)
        except SystemExit as error:
            chosen[1] = str(error)
    if world_size > 1:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[1] is not None:
        raise SystemExit(chosen[1])
    directory = chosen[0]
    saved = torch.load(directory / RESUME_STATE_FILE, map_location="cpu", weights_only=True)
    saved_world_size = saved["world_size"]
    if run is not None and "run" in saved:  # states saved before the settings were kept are not checked
        check_same_run(saved["run"], run, saved_world_size, world_size, directory)
    if is_deepspeed(model) and saved_world_size != world_size:
        raise SystemExit(f"--from_resume 1: {directory} holds DeepSpeed partitions of {saved_world_size} processes, "
                         f"this run has {world_size}; resume with {saved_world_size}, or use --parallel ddp or fsdp, "
                         "whose resume states open under any number of processes")
    state = load_resume_state(directory, model, optimizer, scaler)
    state.pop("run", None)  # this run's settings stay (the accumulation may differ with another world size)
    rngs, saved_world_size = state.pop("rng"), state.pop("world_size")
    if saved_world_size == world_size:
        set_rng_state(rngs[rank], next(model.parameters()).device)
    else:
        state["batch_in_epoch"] = -(-state["batch_in_epoch"] * saved_world_size // world_size)  # ceil
        log(f"the interrupted run had {saved_world_size} processes and this one {world_size}: "
            "it continues at the same place in the data, with fresh random number streams")
    log(f"resumed from {directory} at step {state['step']}")
    return state


def refuse_other_shapes(checkpoint_dir: str | Path, save_weight: str, name: str) -> None:
    """--from_resume 1 found no state for `name`: refuse when states of another width or MoE setting of the same
    --save_weight exist, since starting over under a new name is then almost surely a mistyped shape flag.

    Raises:
        SystemExit: naming those runs and the flags that pick them.
    """
    pattern = re.compile(rf"{re.escape(save_weight)}_(\d+)(_moe)?_resume")
    others = [(found.name.removesuffix("_resume"), found) for found in sorted(Path(checkpoint_dir).glob("*_resume"))
              if pattern.fullmatch(found.name) and found.name != f"{name}_resume" and resume_states(found)]
    if others:
        def flags(found: Path) -> str:  # the flags that give that name
            width, moe = pattern.fullmatch(found.name).groups()
            moe_flag = " --use_moe 1" if moe else " --use_moe 0" if name.endswith("_moe") else ""
            return f"--hidden_size {width}{moe_flag}"

        runs = ", ".join(f"{other} ({flags(found)})" for other, found in others)
        raise SystemExit(f"--from_resume 1: {checkpoint_dir} has no resume state of {name} but has one of {runs}; "
                         f"resume with that run's flags, or start {name} with --from_resume 0")

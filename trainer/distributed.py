"""Where a run computes: device, autocast dtype, the torchrun process group, seeds, how the model is spread over
the processes (DDP or FSDP), and rank-0 output.

Each stage script calls `setup_run(args)` once, right after `parse_args` (as nanochat's scripts call
`compute_init()`), and `train` calls `parallelize`; the rest of the trainer asks `rank_and_world_size()`, moves
batches with `batch_to_device` and prints through `log`. The model itself knows nothing of ranks: the engines are
applied to it from outside, as torchtitan does.
"""

import json
import os
import random
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.precision import resolve_dtype


def setup_distributed(device: str) -> tuple[int, int, int]:
    """Join the process group when started by torchrun; return (rank, local_rank, world_size).

    torchrun starts one process per device and sets RANK, LOCAL_RANK and WORLD_SIZE (plus MASTER_ADDR/PORT)
    in each one's environment; under plain `python` none is set and this returns (0, 0, 1).
    The backend is nccl for CUDA tensors and gloo for CPU tensors.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, local_rank, world_size


def setup_run(args) -> None:
    """Resolve --device and --dtype, join torchrun's process group, seed every generator (seed + rank).

    Sets args.device ("cuda:<local rank>" under torchrun on CUDA), args.dtype (what --dtype auto chose,
    model/precision.py) and args.dtype_reason (why, printed first by `train`).
    Raises:
        SystemExit: --device cuda where no CUDA GPU is visible.
    """
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA GPU is visible; pass --device cpu")
    rank, local_rank, world_size = setup_distributed(args.device)
    if args.device == "cuda" and world_size > 1:
        args.device = f"cuda:{local_rank}"  # one GPU per process
    choice = [resolve_dtype(args.dtype, args.device)]  # auto: measured on CPU (model/precision.py)
    if world_size > 1:  # every rank computes in rank 0's dtype, even where their timings differ
        dist.broadcast_object_list(choice, src=0)
    args.dtype, args.dtype_reason = choice[0].dtype, choice[0].reason
    random.seed(args.seed + rank)  # ranks draw different dropout masks; DDP copies rank 0's initial weights
    torch.manual_seed(args.seed + rank)
    transformers.utils.logging.disable_progress_bar()  # our progress bar is the only one
    transformers.utils.logging.set_verbosity_error()  # load_model checks the weights itself


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def log(message: str) -> None:
    """Print one line from rank 0 only, without breaking the progress bar (before setup_run joins the process
    group too: torchrun's RANK says which process is rank 0)."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if rank == 0:
        tqdm.write(message)


def batch_to_device(batch: dict, device: torch.device, non_blocking: bool = False) -> dict:
    """The batch with its tensors on `device`; other values (e.g. the reward fields of GRPO's prompts, Python
    lists) pass through unchanged."""
    return {key: value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# Spreading the model over the processes


def parallelize(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """Wrap `model` for --parallel `parallel` when more than one process runs; return what the loop calls.

    - ddp: DistributedDataParallel (Li et al. 2020): every rank holds the whole model and optimizer; gradients
      are averaged across ranks by an all-reduce during backward.
    - fsdp: FSDP2 `fully_shard` (Zhao et al. 2023, PyTorch FSDP): each decoder layer, then the rest (embedding,
      final norm, tied head), is sharded over the ranks; parameters are all-gathered for a layer's forward and
      backward, gradients are reduce-scattered, so each rank keeps 1/world_size of the weights, gradients and
      AdamW state. `fully_shard` changes `model` in place, so the returned module is `model` itself.

    Under plain `python` (one process), and for deepspeed (see deepspeed_engine), the model is returned as it is.
    """
    if rank_and_world_size()[1] == 1 or parallel == "deepspeed":  # DeepSpeed wraps model and optimizer together
        return model
    if parallel == "fsdp":
        # ranks initialized their weights from different seeds (seed + rank); start all from rank 0's, as DDP does
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    # MoE experts may get no token in a step: then DDP must expect unused parameters
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=model.config.use_moe)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when `model` was sharded by FSDP (its weights are DTensors spread over the ranks)."""
    return isinstance(model, FSDPModule)


@contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Within it, backward synchronizes gradients across ranks only if `enabled`.

    Gradient accumulation sums the micro-batches' gradients locally and syncs once, on the last micro-batch:
    DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`.
    """
    model = getattr(model, "_orig_mod", model)  # under torch.compile
    if enabled or rank_and_world_size()[1] == 1 or is_deepspeed(model):  # DeepSpeed: its engine.step syncs
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor of `value` (a DTensor under FSDP, e.g. the gradient norm, is gathered)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO (optional: pip install -e ".[deepspeed]")


def is_deepspeed(model) -> bool:
    """True when `model` is a DeepSpeed engine (deepspeed is imported only when --parallel deepspeed asked for it)."""
    deepspeed = sys.modules.get("deepspeed")
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


def deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, args):
    """Wrap model and AdamW in a DeepSpeed ZeRO engine (Rajbhandari et al. 2020) configured by --deepspeed_config.

    ZeRO stage 2 partitions gradients and optimizer state over the ranks, stage 3 the weights too. The shipped
    JSON (trainer/ds_config/zero2.json, zero3.json) sets only the ZeRO options; the batch, clipping and precision
    come from the shared flags, so a run means the same with every --parallel. Gradient accumulation stays ours
    (`managed_gradient_accumulation: false`): each `engine.step()` is one optimizer step over the micro-batches
    whose losses were backpropagated since the last one, as many as the loop decides (fewer at an epoch's end).
    Returns:
        (engine, its optimizer): call the engine like the model; `engine.backward(loss)` then `engine.step()`.
    Raises:
        SystemExit: when deepspeed is not installed or the config file is missing or not JSON.
    """
    try:
        import deepspeed
    except ImportError:
        raise SystemExit('--parallel deepspeed needs DeepSpeed: pip install --no-build-isolation -e ".[deepspeed]"')
    path = Path(args.deepspeed_config)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"--deepspeed_config {path}: {error}") from None
    config.update(
        train_micro_batch_size_per_gpu=args.batch_size,
        gradient_accumulation_steps=args.accumulation_steps,
        managed_gradient_accumulation=False,
        gradient_clipping=args.grad_clip,
        bf16={"enabled": args.dtype == "bfloat16"},
        fp16={"enabled": args.dtype == "float16"},
    )
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer

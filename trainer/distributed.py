"""Where a run computes: device, autocast dtype, the torchrun process group, seeds, and rank-0 output.

`parse_args` in `trainer/trainer_utils.py` calls `setup_run` once; the rest of the trainer asks
`rank_and_world_size()` and prints through `log`.
"""

import os
import random

import torch
import torch.distributed as dist
import transformers
from tqdm import tqdm


def resolve_dtype(name: str, device: str) -> str:
    """The autocast dtype for --dtype `name`: auto picks what the device runs fast.

    bfloat16 on CUDA GPUs that support it (Ampere and newer), float16 on older CUDA GPUs (with a GradScaler),
    float32 on CPU and MPS: CPUs without native bf16 run bf16 matmuls about 100x slower than fp32.
    """
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


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
    """Resolve --device and --dtype, join torchrun's process group, seed every generator (seed + rank)."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA GPU is visible; pass --device cpu")
    rank, local_rank, world_size = setup_distributed(args.device)
    if args.device == "cuda" and world_size > 1:
        args.device = f"cuda:{local_rank}"  # one GPU per process
    args.dtype = resolve_dtype(args.dtype, args.device)
    random.seed(args.seed + rank)  # ranks draw different dropout masks; DDP copies rank 0's initial weights
    torch.manual_seed(args.seed + rank)
    transformers.utils.logging.disable_progress_bar()  # our progress bar is the only one
    transformers.utils.logging.set_verbosity_error()  # load_model checks the weights itself


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def log(message: str) -> None:
    """Print one line from rank 0 only, without breaking the progress bar."""
    if rank_and_world_size()[0] == 0:
        tqdm.write(message)

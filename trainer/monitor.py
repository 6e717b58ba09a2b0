"""Watching a training run: eval loss and perplexity, the metrics log (jsonl, wandb), and stop signals.

Used by the loop in `trainer/trainer_utils.py`; nothing here changes the weights.
"""

import json
import math
import signal
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from trainer.distributed import rank_and_world_size


@torch.no_grad()
def evaluate(model, dataset, batches: list[list[int]], loss_fn, device: torch.device, autocast,
             perplexity: bool = True) -> dict:
    """Mean loss and metrics of loss_fn over `batches` of `dataset` (this rank's share; averaged over ranks).

    Perplexity = exp(mean next-token cross-entropy): the `lm_loss` metric when loss_fn reports one (MoE adds
    the router's balance loss to the loss), else the loss itself; left out when `perplexity` is False and
    there is no `lm_loss` (e.g. DPO, whose loss is not a cross-entropy).
    Returns:
        {"eval_loss": float, "eval_<metric>": float for each metric of loss_fn, "eval_ppl": float (see above)}
    """
    model.eval()
    sums, count = None, 0  # sums of [loss, *metrics] over the batches
    for batch in DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate):
        batch = {key: value.to(device) for key, value in batch.items()}
        with autocast:
            loss, metrics = loss_fn(model, batch)
        values = torch.stack([loss.float(), *(torch.as_tensor(v, device=device).float() for v in metrics.values())])
        sums, count = (values if sums is None else sums + values), count + 1
    model.train()
    totals = torch.cat([sums, torch.tensor([float(count)], device=device)])
    if rank_and_world_size()[1] > 1:
        dist.all_reduce(totals)
    means = (totals[:-1] / totals[-1]).tolist()  # sums / number of batches over all ranks
    result = {"eval_loss": means[0], **{f"eval_{key}": value for key, value in zip(metrics, means[1:])}}
    if "lm_loss" in metrics or perplexity:
        result["eval_ppl"] = math.exp(result.get("eval_lm_loss", result["eval_loss"]))
    return result


class MetricsLog:
    """Appends one JSON object per line to `<save_dir>/runs/<run_name>/metrics.jsonl`, and to wandb if asked.

    A fresh run empties the file; a resumed run keeps the lines up to the step it resumes from, so the file tells
    one history. Only rank 0 writes. The wandb run id is kept in the resume state,
    so a resumed run continues the same wandb run (WANDB_MODE=offline works without network).
    """

    def __init__(self, path: Path, args, resume_step: int | None, wandb_id: str | None):
        self.path, self.wandb_run, self.wandb_id = None, None, wandb_id
        if rank_and_world_size()[0] != 0:
            return
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        if args.use_wandb:
            try:
                import wandb  # optional dependency, imported only when asked for
            except ImportError:
                raise SystemExit("--use_wandb 1 needs wandb: pip install wandb") from None
            self.wandb_run = wandb.init(project=args.wandb_project, name=path.parent.name, id=wandb_id,
                                        resume="allow", config=vars(args))
            self.wandb_id = self.wandb_run.id

    def write(self, record: dict) -> None:
        """Append `record` (which has a "step") to the log."""
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


@contextmanager
def stop_on_signal():
    """While inside, SIGTERM and SIGINT set `flag["stop"]` instead of killing, so the loop can save and exit.

    The previous handlers come back after the first signal, so a second Ctrl-C interrupts at once.
    """
    flag = {"stop": False}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def request_stop(signum, frame):
        flag["stop"] = True
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for sig in previous:
        signal.signal(sig, request_stop)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

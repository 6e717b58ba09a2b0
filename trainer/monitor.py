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

from trainer.distributed import batch_to_device, log, rank_and_world_size


@torch.no_grad()
def evaluate(model, dataset, batches: list[list[int]], loss_fn, device: torch.device, autocast,
             perplexity: bool = True, count_items=None) -> dict:
    """Mean loss and metrics of loss_fn over `batches` of `dataset` (this rank's share; averaged over ranks).

    Each batch weighs by count_items(batch), the items its mean runs over (loss tokens, or rows: see
    trainer_utils.optimizer_step), so the eval loss is the mean over all held-out items; None weighs batches
    equally.

    Perplexity = exp(mean next-token cross-entropy): the `lm_loss` metric when loss_fn reports one (MoE adds
    the router's balance loss to the loss), else the loss itself; left out when `perplexity` is False and
    there is no `lm_loss` (e.g. DPO, whose loss is not a cross-entropy).
    Returns:
        {"eval_loss": float, "eval_<metric>": float for each metric of loss_fn, "eval_ppl": float (see above)}
    """
    model.eval()
    sums, count = None, 0  # item-weighted sums of [loss, *metrics] over the batches, and the items
    for batch in DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate):
        items = count_items(batch) if count_items is not None else 1
        batch = batch_to_device(batch, device)  # tensors; other fields as they are
        with torch.no_grad(), autocast:
            loss, metrics = loss_fn(model, batch)
        values = torch.stack([loss.float(), *(torch.as_tensor(v, device=device).float() for v in metrics.values())])
        sums, count = (values * items if sums is None else sums + values * items), count + items
    model.train()
    totals = torch.cat([sums, torch.tensor([float(count)], device=device)])
    if rank_and_world_size()[1] > 1:
        dist.all_reduce(totals)
    means = (totals[:-1] / totals[-1]).tolist()  # sums / items over all ranks
    result = {"eval_loss": means[0], **{f"eval_{key}": value for key, value in zip(metrics, means[1:])}}
    if "lm_loss" in metrics or perplexity:
        result["eval_ppl"] = math.exp(result.get("eval_lm_loss", result["eval_loss"]))
    return result


class MetricsLog:
    """Appends one JSON object per line to `<save_dir>/runs/<run_name>/metrics.jsonl`, and to wandb if asked.

    A fresh run empties the file; a resumed run keeps the lines up to the step it resumes from, so the file tells
    one history (a line torn by a kill during its append is dropped, with a warning). Only rank 0 writes. The
    wandb run id is kept in the resume state, so a resumed run continues the same wandb run (WANDB_MODE=offline
    works without network).
    """

    def __init__(self, path: Path, args, resume_step: int | None, wandb_id: str | None):
        self.path, self.wandb_run, self.wandb_id = None, None, wandb_id
        if rank_and_world_size()[0] != 0:
            return
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = lines_up_to(path, resume_step) if resume_step is not None and path.exists() else []
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


def lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of a metrics log whose "step" is at most `step`.

    A line that is not JSON can only be one torn by a kill in the middle of its append: it is dropped with a
    warning instead of stopping the resumed run.
    """
    kept = []
    for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log(f"{path}:{line_no}: dropped an incomplete line (written when a run was killed)")
            continue
        if record["step"] <= step:
            kept.append(line)
    return kept


@contextmanager
def stop_on_signal():
    """While inside, SIGTERM and SIGINT set `flag["stop"]` (and `flag["signal"]`, its number) instead of killing,
    so the loop can save and exit.

    The previous handlers come back after the first signal, so a second Ctrl-C interrupts at once.
    """
    flag = {"stop": False, "signal": None}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def request_stop(signum, frame):
        flag["stop"], flag["signal"] = True, signum
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    for sig in previous:
        signal.signal(sig, request_stop)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

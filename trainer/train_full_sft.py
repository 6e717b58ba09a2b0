"""Supervised fine-tuning (SFT): teach a pretrained model to answer in the chat format, all weights trained.

Each conversation is rendered with the tokenizer's ChatML template (<|im_start|>role ... <|im_end|>) and the
loss covers only what the assistant writes, its closing <|im_end|> included (that is what teaches the model
to stop); system, user and tool tokens have label -100. The objective is the next-token cross-entropy over
the N assistant positions of an optimizer step (InstructGPT, Ouyang et al. 2022, step 1), however the step is
split into micro-batches and processes, so a long reply weighs by its tokens (trainer_utils.optimizer_step):

    L = -1/N * sum_{t: x_{t+1} is assistant} log p(x_{t+1} | x_1 .. x_t)

Samples keep their own length; the loop batches samples of similar length together and pads each batch to its
longest sample. Defaults: dataset/data/sft_stories.jsonl (story requests answered by real TinyStories stories,
the MiniMind identity conversations, a few Tang poems; held out: sft_stories_test.jsonl), starting from
out/pretrain_<hidden_size>, 5 epochs (230 steps of the 730 conversations), peak learning rate 1e-3 (half of pretraining's: the model already knows
the language; large models use far lower rates), 16 conversations per step. Alpaca's instructions
(dataset/data/sft.jsonl) are beyond a model of a few million parameters; they are for larger models.

    python trainer/train_full_sft.py                         # after trainer/train_pretrain.py
    python trainer/train_full_sft.py --data_path dataset/data/sft.jsonl --eval_data_path dataset/data/sft_test.jsonl
    torchrun --nproc_per_node 2 trainer/train_full_sft.py    # two processes (two GPUs, or CPU with gloo)

Writes out/full_sft_<hidden_size>/ (chat with it: scripts/chat.py) and out/runs/full_sft_<hidden_size>/metrics.jsonl.
"""

from dataset.lm_dataset import SFTDataset
from trainer.trainer_utils import REPO_ROOT, causal_lm_loss, load_model, parse_args, run_main, setup_run, train


def main(argv: list[str] | None = None) -> dict:
    # 1. Flags: the shared ones with this stage's defaults
    args = parse_args("full_sft", __doc__, argv=argv, defaults={
        "data_path": str(REPO_ROOT / "dataset" / "data" / "sft_stories.jsonl"),
        "eval_data_path": str(REPO_ROOT / "dataset" / "data" / "sft_stories_test.jsonl"),
        "from_weight": "pretrain",
        "learning_rate": 1e-3,
        "epochs": 5,
    })
    setup_run(args)  # device, dtype, torchrun's process group, seeds
    model, tokenizer = load_model(args)

    # 2. Dataset: conversations through the chat template, labels -100 outside the assistant's replies
    train_dataset = SFTDataset(args.data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
    eval_dataset = (SFTDataset(args.eval_data_path, tokenizer, args.max_seq_len, args.skip_bad_lines)
                    if args.eval_data_path else None)

    # 3. Loss: next-token cross-entropy on the labelled tokens (causal_lm_loss), in the shared loop: accumulation,
    #    clipping, schedule, logging, eval, checkpoints, resume
    return train(args, model, tokenizer, train_dataset, causal_lm_loss, eval_dataset=eval_dataset)


if __name__ == "__main__":
    run_main(main)

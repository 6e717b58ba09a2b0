"""Pretraining: next-token prediction on raw text, starting from random weights.

The model learns the language by predicting every next token of documents packed into blocks of --max_seq_len
tokens (GPT-2, Radford et al. 2019). The objective is the mean cross-entropy over all N positions of an
optimizer step (every micro-batch of --accumulation_steps, every process: trainer_utils.optimizer_step):

    L = -1/N * sum_t log p(x_{t+1} | x_1 .. x_t)

With --doc_mask 1 a token attends only to earlier tokens of its own document inside a block (block-diagonal
causal attention), instead of to the end of the previous, unrelated document.
Defaults: dataset/data/pretrain_quick_stories_books_truecased.jsonl (1.5M tokens of English children's stories
and books: TinyStories and Project Gutenberg, see dataset/data/ATTRIBUTION.md), held out
dataset/data/pretrain_quick_test.jsonl, 1 epoch, peak learning rate 2e-3, 16 blocks of 256 tokens per step, the
4.6M-parameter model. With --time_budget MINUTES and no --epochs, passes repeat until the budget is spent (the
README's first command: --time_budget 8).

    python trainer/train_pretrain.py --time_budget 8         # one process: GPU if there is one, else CPU
    python trainer/train_pretrain.py --data_path dataset/data/pretrain.jsonl   # lower-cased stories + Tang poems
    torchrun --nproc_per_node 2 trainer/train_pretrain.py    # two processes (two GPUs, or CPU with gloo)

Writes out/pretrain_<hidden_size>/ (the weights; next: trainer/train_full_sft.py), out/runs/pretrain_<hidden_size>/
metrics.jsonl and the resume state checkpoints/pretrain_<hidden_size>_resume/.
"""

from dataset.lm_dataset import PretrainDataset
from trainer.trainer_utils import REPO_ROOT, causal_lm_loss, load_model, parse_args, run_main, setup_run, train


def add_flags(parser) -> None:
    parser.add_argument("--doc_mask", type=int, choices=(0, 1), default=0,
                        help="1: each token attends only within its own document of a packed block")


def main(argv: list[str] | None = None) -> dict:
    # 1. Flags: the shared ones with this stage's defaults, plus --doc_mask
    args = parse_args("pretrain", __doc__, add_flags, argv=argv, defaults={
        "data_path": str(REPO_ROOT / "dataset" / "data" / "pretrain_quick_stories_books_truecased.jsonl"),
        "eval_data_path": str(REPO_ROOT / "dataset" / "data" / "pretrain_quick_test.jsonl"),
        "from_weight": "none",
        "learning_rate": 2e-3,
        "epochs": 1,
    })
    setup_run(args)  # device, dtype, torchrun's process group, seeds
    model, tokenizer = load_model(args)

    # 2. Dataset: documents tokenized, joined with <|endoftext|> and cut into blocks of max_seq_len tokens
    train_dataset = PretrainDataset(args.data_path, tokenizer, args.max_seq_len, bool(args.doc_mask),
                                    bool(args.skip_bad_lines))
    eval_dataset = None
    if args.eval_data_path:
        eval_dataset = PretrainDataset(args.eval_data_path, tokenizer, args.max_seq_len, bool(args.doc_mask),
                                       bool(args.skip_bad_lines))

    # 3. Loss: next-token cross-entropy on the labelled tokens (causal_lm_loss), in the shared loop: accumulation,
    #    clipping, schedule, logging, eval, checkpoints, resume
    return train(args, model, tokenizer, train_dataset, causal_lm_loss, eval_dataset=eval_dataset)


if __name__ == "__main__":
    run_main(main)

"""MiniMind as a reward model (and as PPO's value model): the transformer trunk and a scalar head on every token.

A reward model reads a prompt and a reply and returns one number, how much a person would prefer that reply.
InstructGPT (Ouyang et al. 2022, section 3.5) builds it from the SFT model: the language-model head is removed and
a linear layer maps the last hidden state to a scalar; the score of a sequence is the output at its last token
(here the reply's closing <|im_end|>), which has attended to the whole prompt and reply. PPO's value model is the
same network read at every token instead of the last one, so `forward` returns the per-token scores and
`sequence_scores` picks the last.

The parameter names are those of transformers' Qwen3ForSequenceClassification with num_labels = 1 (`model.*` as in
MiniMindForCausalLM, then `score.weight`, no bias), so a full_sft checkpoint's trunk loads into it name for name
and a saved reward model opens in stock transformers as a Qwen3 sequence classifier.
"""

import math
from pathlib import Path

import torch
from torch import nn
from transformers import initialization as init

from model.loading import load_strictly
from model.model_minimind import (MiniMindConfig, MiniMindForCausalLM, MiniMindModel, MiniMindPreTrainedModel,
                                  load_balancing_loss)


class MiniMindRewardModel(MiniMindPreTrainedModel):
    """The MiniMind trunk (MiniMindModel, the `model` of MiniMindForCausalLM) and a scalar head `score`.

    forward(input_ids (B, T), attention_mask (B, T) or None, position_ids (B, T) or None) -> (B, T) float32:
    the score head applied to each position's final hidden state, i.e. the reward of the sequence if it ended
    there (sequence_scores takes the last attended position). With return_aux_loss=True it returns
    (scores, aux_loss), aux_loss being the MoE router's load-balancing loss (None for a dense model).

    The head `score` is Linear(hidden_size, 1) without a bias (a constant added to every reward changes no
    Bradley-Terry probability), initialised normal(0, 1 / sqrt(hidden_size + 1)): the reward head init of
    OpenAI's lm-human-preferences and summarize-from-feedback code (Ziegler et al. 2019; Stiennon et al. 2020),
    so the first rewards are of order 1 whatever the width. The head runs in float32 (autocast off), so the small
    differences between two rewards do not drown in bfloat16 rounding.

    Saved with save_pretrained as an HF directory whose config.json lists "MiniMindRewardModel" in architectures;
    open it with load_reward_model (strict). Start one from a chat model with from_causal_lm.
    """

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self.score:
            init.normal_(module.weight, mean=0.0, std=1 / math.sqrt(self.config.hidden_size + 1))

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, return_aux_loss: bool = False):
        hidden, router_logits = self.model(input_ids, attention_mask, position_ids)  # (B, T, hidden_size)
        with torch.autocast(hidden.device.type, enabled=False):
            scores = self.score(hidden.float()).squeeze(-1)  # (B, T) float32
        if not return_aux_loss:
            return scores
        aux_loss = None
        if router_logits:
            aux_loss = load_balancing_loss(router_logits, self.config.num_experts, self.config.num_experts_per_tok,
                                           attention_mask)
        return scores, aux_loss

    @classmethod
    def from_causal_lm(cls, causal_lm: MiniMindForCausalLM) -> "MiniMindRewardModel":
        """A reward model with the trunk of a chat model (its weights copied, every tensor, strictly) and a fresh
        score head (see the class docstring): InstructGPT's reward-model start, "the SFT model with the final
        unembedding layer removed" (Ouyang et al. 2022, section 3.5). The same config, in float32."""
        reward_model = cls(causal_lm.config)
        reward_model.model.load_state_dict(causal_lm.model.state_dict())  # strict: same class, same config
        return reward_model


def sequence_scores(per_token: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The score of each row at its last attended token: the reward of the whole sequence.

    The last position whose attention_mask is 1, so right padding (real tokens, then padding) and left padding
    (padding, then real tokens) both give the sequence's final token, as transformers'
    GenericForSequenceClassification pools (there from input_ids != pad_token_id).

    Args:
        per_token: (B, T) scores (MiniMindRewardModel.forward).
        attention_mask: (B, T), 1 on real tokens, 0 on padding, every row with at least one real token; None: no
            padding, the last column.
    Returns:
        (B,) the scores at those positions, in per_token's dtype.
    """
    if attention_mask is None:
        return per_token[:, -1]
    positions = torch.arange(per_token.shape[1], device=per_token.device).expand_as(per_token)  # (B, T)
    last = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values  # (B,)
    return per_token.gather(1, last[:, None]).squeeze(1)


def load_reward_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      flag: str = "--reward_model") -> MiniMindRewardModel:
    """Open a reward-model directory (written by trainer/train_reward.py) strictly, frozen, in eval mode.

    Strict as model/loading.py's load_pretrained (load_strictly): every tensor the config asks for (the trunk and
    score.weight) must be in model.safetensors with its shape, and nothing else; safetensors only.

    Args:
        path: the directory (config.json with architectures ["MiniMindRewardModel"], model.safetensors).
        device, dtype: where and in what to put the weights (float32: let the caller's autocast cast).
        flag: the command-line flag that named it, for the error messages.
    Returns:
        the model, no parameter requiring gradients.
    Raises:
        SystemExit: one sentence naming the directory and what is wrong: no checkpoint, a checkpoint of another
            kind (a chat model), missing, unexpected or mismatched tensors.
    """
    directory = Path(path)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise SystemExit(f"{flag} {path}: no reward model there (config.json and model.safetensors); make one "
                         "with python trainer/train_reward.py")
    config = MiniMindConfig.from_pretrained(directory)
    if MiniMindRewardModel.__name__ not in (config.architectures or []):
        raise SystemExit(f"{flag} {path}: this checkpoint is a {', '.join(config.architectures or ['?'])}, not a "
                         "reward model; pass a directory written by trainer/train_reward.py (out/reward_<size>)")
    model = load_strictly(MiniMindRewardModel, directory, flag, dtype=dtype)
    return model.requires_grad_(False).eval().to(device)

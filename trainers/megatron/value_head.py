"""The critic's head: a GPTModel whose output layer gives one value per position instead of vocabulary logits.

It takes the place of the model's `output_layer` (so no [s, b, V] logits are ever made) and of
`compute_language_model_loss` (so the model, called with labels as the policy is, returns [b, s] values where the
policy returns log-probs): the trainer's forward, micro-batching, aggregation and pipeline code stay one path for
both. The head is a plain replicated Linear(hidden, 1): the hidden states it reads are whole on every TP rank.
"""

from __future__ import annotations

from typing import Any

import torch

PARAM_PREFIX = "output_layer."  # what the HF checkpoint does not provide (the head starts at zero)


class ValueProjection(torch.nn.Module):
    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.value = torch.nn.Linear(hidden, 1, bias=True, dtype=dtype)
        # zero: every state starts at value 0 (no random baseline on step one); the backbone's gradient follows
        # once the head has moved
        torch.nn.init.zeros_(self.value.weight)
        torch.nn.init.zeros_(self.value.bias)

    def forward(self, hidden: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None, **_: Any):
        return self.value(hidden), None  # [s, b, 1], the (output, bias) pair Megatron's output layers return


class ValueHead:
    """Stands in for `compute_language_model_loss`, as `LogProbHead` does for the policy; the attributes the
    trainer sets on a head before a forward are accepted and unused."""

    temperature = 1.0
    with_entropy = False
    on_logits = None
    entropy = None

    def __call__(self, labels: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return values[..., 0].t().float()  # [b, s]

    @classmethod
    def install(cls, gpt_model: Any, hidden: int, dtype: torch.dtype) -> ValueHead:
        gpt_model.output_layer = ValueProjection(hidden, dtype).to(next(gpt_model.parameters()).device)
        head = cls()
        gpt_model.compute_language_model_loss = head
        return head

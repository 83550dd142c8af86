import torch

from habana_frameworks.torch import record


class FusedAdagrad(torch.optim.Adagrad):
    """Habana's fused Adagrad: torch's math, eps 1e-10 by default."""

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10):
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps)
        record("FusedAdagrad", lr=lr, eps=eps)

    def step(self, closure=None):
        record("FusedAdagrad.step")
        return super().step(closure)

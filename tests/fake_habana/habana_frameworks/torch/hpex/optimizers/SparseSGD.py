"""``sparse_sgd_with_valid_count`` with momentum 0: the moments argument is left alone."""

import torch

from habana_frameworks.torch import record


def forward(
    gradients: torch.Tensor,
    weights: torch.Tensor,
    moments: torch.Tensor,
    indices: torch.Tensor,
    learning_rate: torch.Tensor,
    valid_count: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    record("SparseSGD.forward", valid_count=valid_count.tolist(), lr=learning_rate.tolist(), dtype=indices.dtype)
    count = int(valid_count[0])
    rows = indices[:count].long()
    weights[rows] = weights[rows] - learning_rate * gradients[:count]
    return weights, moments

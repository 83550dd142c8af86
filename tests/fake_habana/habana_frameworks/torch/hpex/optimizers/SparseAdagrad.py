"""``sparse_adagrad_with_valid_count``: rows are assumed distinct; a repeated row keeps one of its updates."""

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
    record("SparseAdagrad.forward", valid_count=valid_count.tolist(), lr=learning_rate.tolist(), dtype=indices.dtype)
    count = int(valid_count[0])
    rows, grads = indices[:count].long(), gradients[:count]
    moments[rows] = moments[rows] + grads * grads
    weights[rows] = weights[rows] - learning_rate * grads / (torch.sqrt(moments[rows]) + 1e-10)
    return weights, moments

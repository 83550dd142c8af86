"""``sparse_sgd_with_valid_count`` with momentum 0: the moments argument is left alone."""

from habana_frameworks.torch import record


def forward(gradients, weights, moments, indices, learning_rate, valid_count):
    record("SparseSGD.forward", valid_count=valid_count.tolist(), lr=learning_rate.tolist(), dtype=indices.dtype)
    count = int(valid_count[0])
    rows = indices[:count].long()
    weights[rows] = weights[rows] - learning_rate * gradients[:count]
    return weights, moments

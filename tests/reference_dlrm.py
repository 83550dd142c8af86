"""A plain-PyTorch DLRM written from SPEC §3 alone, to check the training script against.

nn.EmbeddingBag(mode="sum") tables with dense gradients, nn.Linear MLPs, torch.optim.SGD / Adagrad(eps=1e-10)
over all parameters, and the random data generator re-written from the SPEC's words.
"""

import math

import numpy as np
import torch
from torch import Tensor, nn


def make_layers(widths: list[int], last_sigmoid: bool) -> nn.Sequential:
    layers = []
    for i in range(len(widths) - 1):
        n, m = widths[i], widths[i + 1]
        layer = nn.Linear(n, m)
        layer.weight.data = torch.tensor(np.random.normal(0.0, math.sqrt(2 / (m + n)), size=(m, n)).astype(np.float32))
        layer.bias.data = torch.tensor(np.random.normal(0.0, math.sqrt(1 / m), size=m).astype(np.float32))
        layers.append(layer)
        layers.append(nn.Sigmoid() if last_sigmoid and i == len(widths) - 2 else nn.ReLU())
    return nn.Sequential(*layers)


class ReferenceDLRM(nn.Module):
    def __init__(
        self, tables: list[int], dim: int, bottom: list[int], top: list[int], op: str, itself: bool, threshold: float
    ) -> None:
        super().__init__()
        self.tables = nn.ModuleList()
        for rows in tables:
            table = nn.EmbeddingBag(rows, dim, mode="sum")
            bound = math.sqrt(1 / rows)
            table.weight.data = torch.tensor(np.random.uniform(-bound, bound, size=(rows, dim)).astype(np.float32))
            self.tables.append(table)
        nf = len(tables) + 1
        width = (nf * (nf + 1) // 2 if itself else nf * (nf - 1) // 2) + dim if op == "dot" else nf * dim
        self.bottom = make_layers(bottom, last_sigmoid=False)
        self.top = make_layers([width, *top], last_sigmoid=True)
        self.op, self.itself, self.threshold = op, itself, threshold

    def forward(self, dense: Tensor, offsets: list[Tensor], indices: list[Tensor]) -> Tensor:
        x = self.bottom(dense)
        ly = [table(idx, off) for table, off, idx in zip(self.tables, offsets, indices, strict=True)]
        if self.op == "cat":
            r = torch.cat([x, *ly], dim=1)
        else:
            t = torch.stack([x, *ly], dim=1)
            z = t @ t.transpose(1, 2)
            pairs = [z[:, i, j] for i in range(t.size(1)) for j in range(i + (1 if self.itself else 0))]
            r = torch.cat([x, torch.stack(pairs, dim=1)], dim=1)
        p = self.top(r)
        if 0 < self.threshold < 1:
            p = p.clamp(self.threshold, 1 - self.threshold)
        return p


def random_batch(
    j: int, n: int, dense_features: int, tables: list[int], nipl: int, fixed: bool, round_targets: bool
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    """The run's ``j``-th batch (counted across epochs), ``n`` samples: (dense, offsets, indices, targets).

    ``nipl`` is the largest bag, every bag's size when ``fixed``.
    """
    np.random.seed(987 + j)
    dense = torch.tensor(np.random.rand(n, dense_features).astype(np.float32))
    offsets, indices = [], []
    for rows in tables:
        table_offsets, table_indices = [], []
        for _ in range(n):
            k = nipl if fixed else int(np.round(max(1.0, np.random.random(1)[0] * min(rows, nipl))))
            bag = np.unique(np.round(np.random.random(k) * (rows - 1)).astype(np.int64))
            table_offsets.append(len(table_indices))
            table_indices.extend(bag.tolist())
        offsets.append(torch.tensor(table_offsets))
        indices.append(torch.tensor(table_indices, dtype=torch.int64))
    targets = np.random.rand(n, 1).astype(np.float32)
    if round_targets:
        targets = np.round(targets)
    return dense, offsets, indices, torch.tensor(targets)


def reference_losses(cfg: dict) -> list[tuple[int, int, float, int]]:
    """Per-iteration (epoch, iteration, loss, correct predictions) of a run described by ``cfg``."""
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = ReferenceDLRM(
        cfg["tables"], cfg["dim"], cfg["bottom"], cfg["top"], cfg["op"], cfg["itself"], cfg["threshold"]
    )
    if cfg["optimizer"] == "adagrad":
        opt = torch.optim.Adagrad(model.parameters(), lr=cfg["lr"], eps=1e-10)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    mbs, data_size = cfg["batch"], cfg["data_size"]
    nbatches = math.ceil(data_size / mbs)
    results, j = [], 0
    for epoch in range(cfg["epochs"]):
        for index in range(nbatches):
            n = min(mbs, data_size - index * mbs)
            dense, offsets, indices, targets = random_batch(
                j, n, cfg["bottom"][0], cfg["tables"], cfg["nipl"], cfg["fixed"], cfg["round_targets"]
            )
            j += 1
            if n < mbs:  # the original drew the partial last batch (so it took a seed), then left the epoch
                break
            p = model(dense, offsets, indices)
            if cfg["loss"] == "mse":
                loss = nn.functional.mse_loss(p, targets)
            elif cfg["loss"] == "bce":
                loss = nn.functional.binary_cross_entropy(p, targets)
            else:
                w = torch.tensor(cfg["loss_weights"])[targets.view(-1).long()].view_as(targets)
                loss = (nn.functional.binary_cross_entropy(p, targets, reduction="none") * w).mean()
            if cfg["train"]:
                opt.zero_grad()
                loss.backward()
                opt.step()
            results.append((epoch, index, loss.item(), int((p.detach().round() == targets).sum())))
    return results

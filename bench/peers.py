"""The comparisons of `make bench` that run beside the training script: `python bench/peers.py WHAT` prints JSON.

- `embedding`: the embedding op alone (3,000,000 x 64, batch 512, up to 38 lookups a bag, Adagrad): ours,
  FBGEMM's CPU table-batched embedding (EXACT_ADAGRAD, update fused into backward) and plain PyTorch
  (`nn.EmbeddingBag(sparse=True)` + `torch.optim.Adagrad`), on the same batches, with their results compared.
- `kaggle-torchrec`, `kaggle-plain`: a training step of the Criteo-Kaggle-shaped model on one random batch
  from the script's generator, with TorchRec's DLRM (FusedEmbeddingBagCollection, Adagrad) or plain PyTorch.
- `medium-plain FP`: the medium configuration's training step in plain PyTorch, in fp32 or bf16 (autocast).

Every time is the median of the iterations after a warm-up one; the embedding op first runs every batch once
untimed, so that each implementation has touched the same rows of its (fresh, lazily mapped) memory.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dlrm_s_pytorch  # noqa: E402
from habana_dlrm_ops import ADAGRAD_EPS, EmbeddingBag, preprocess_bags  # noqa: E402

KAGGLE_ROWS = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306, 10, 5652,
    2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
KAGGLE_FLAGS = [
    f"--arch-embedding-size={'-'.join(map(str, KAGGLE_ROWS))}", "--arch-sparse-feature-size=16",
    "--arch-mlp-bot=13-512-256-64-16", "--arch-mlp-top=512-256-1", "--arch-interaction-op=dot",
    "--num-indices-per-lookup=1", "--num-indices-per-lookup-fixed", "--mini-batch-size=2048",
    "--optimizer=adagrad", "--learning-rate=0.01",
]  # fmt: skip
MEDIUM_CONFIG = ROOT / "hb_configs" / "single_node_dlrm_eager_medium_fp32.yaml"
LR = 0.01


def median_ms(step: Callable[[], object], iterations: int) -> float:
    times = []
    for _ in range(iterations + 1):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[1:])


def raw_batches(argv: list[str], count: int) -> tuple[argparse.Namespace, dlrm_s_pytorch.Sizes, list[tuple]]:
    """The script's own random batches: (dense, per-table offsets, per-table indices, targets)."""
    args, sizes, _ = dlrm_s_pytorch.parse_command_line([*argv, f"--num-batches={count}"])
    dataset = dlrm_s_pytorch.RandomDataset(args, sizes)
    return args, sizes, [dataset[i] for i in range(count)]


# ---------------------------------------------------------------------------------------------------------
# The embedding op
# ---------------------------------------------------------------------------------------------------------


def embedding(iterations: int = 10) -> dict:
    args, sizes, batches = raw_batches(["--config", str(MEDIUM_CONFIG)], iterations + 1)
    rows, dim, batch_size = sizes.tables[0], sizes.embedding_dim, args.mini_batch_size
    capacity = args.num_indices_per_lookup * batch_size
    initial = torch.rand(rows, dim) * 0.01
    grads = [torch.randn(batch_size, dim) / batch_size for _ in batches]
    lookups = [(indices[0], offsets[0]) for _, offsets, indices, _ in batches]

    start = time.perf_counter()
    prepared = [preprocess_bags(i, o, batch_size, capacity) for i, o in lookups]
    preprocess_ms = 1000 * (time.perf_counter() - start) / len(prepared)

    ours = EmbeddingBag(initial.clone())
    ours.set_optimizer("adagrad", LR)
    plain = nn.EmbeddingBag.from_pretrained(initial.clone(), freeze=False, mode="sum", sparse=True)
    plain_optimizer = torch.optim.Adagrad(plain.parameters(), lr=LR, eps=ADAGRAD_EPS)
    fbgemm = make_fbgemm(rows, dim, initial)

    def steps(one_step: Callable[[int], object]) -> Callable[[], object]:
        """Every batch once untimed (so each side has touched the same memory), then once more, timed."""
        for k in range(len(batches)):
            one_step(k)
        position = iter(range(len(batches)))
        return lambda: one_step(next(position))

    def ours_step(k: int) -> torch.Tensor:
        out = ours(prepared[k])
        out.backward(grads[k])
        return out

    def plain_step(k: int) -> torch.Tensor:
        out = plain(*lookups[k])
        out.backward(grads[k])
        plain_optimizer.step()
        plain_optimizer.zero_grad()
        return out

    def fbgemm_step(k: int) -> torch.Tensor:
        indices, offsets = lookups[k]
        out = fbgemm(indices, torch.cat([offsets, torch.tensor([indices.numel()])]))
        out.backward(grads[k])
        return out

    result = dict(preprocess_ms=preprocess_ms, ours_ms=median_ms(steps(ours_step), iterations))
    result["plain_ms"] = median_ms(steps(plain_step), iterations)
    if fbgemm is not None:
        result["fbgemm_ms"] = median_ms(steps(fbgemm_step), iterations)
        weight_diff = (ours.weight.detach() - fbgemm.split_embedding_weights()[0]).abs().max().item()
        state_diff = (ours.moments - fbgemm.split_optimizer_states()[0][0]).abs().max().item()
        result.update(max_weight_difference=weight_diff, max_state_difference=state_diff)
    result["max_weight_difference_plain"] = (ours.weight.detach() - plain.weight.detach()).abs().max().item()
    return result


def make_fbgemm(rows: int, dim: int, initial: torch.Tensor) -> nn.Module | None:
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except ImportError:
        return None
    table = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ADAGRAD,
        learning_rate=LR,
        eps=ADAGRAD_EPS,
        pooling_mode=PoolingMode.SUM,
        weights_precision=SparseType.FP32,
    )
    table.split_embedding_weights()[0].copy_(initial)
    return table


# ---------------------------------------------------------------------------------------------------------
# Whole training steps: TorchRec and plain PyTorch
# ---------------------------------------------------------------------------------------------------------


def kaggle_torchrec(iterations: int = 10) -> dict:
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    args, sizes, [(dense, offsets, indices, targets)] = raw_batches(KAGGLE_FLAGS, 1)
    keys = [f"t{t}" for t in range(len(sizes.tables))]
    configs = [
        EmbeddingBagConfig(name=key, embedding_dim=sizes.embedding_dim, num_embeddings=rows, feature_names=[key])
        for key, rows in zip(keys, sizes.tables, strict=True)
    ]
    tables = FusedEmbeddingBagCollection(
        tables=configs,
        optimizer_type=torch.optim.Adagrad,
        optimizer_kwargs=dict(lr=LR, eps=ADAGRAD_EPS),
        device=torch.device("cpu"),
    )
    model = DLRM(
        embedding_bag_collection=tables,
        dense_in_features=sizes.dense_features,
        dense_arch_layer_sizes=sizes.bottom[1:],
        over_arch_layer_sizes=sizes.top[1:],
    )
    dense_params = [p for name, p in model.named_parameters() if "embedding_bag_collection" not in name]
    optimizer = torch.optim.Adagrad(dense_params, lr=LR, eps=ADAGRAD_EPS)
    lengths = torch.cat(
        [torch.diff(o, append=torch.tensor([i.numel()])) for o, i in zip(offsets, indices, strict=True)]
    )
    features = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(indices), lengths=lengths)

    def step() -> None:
        logits = model(dense, features).squeeze(1)
        nn.functional.binary_cross_entropy_with_logits(logits, targets.squeeze(1)).backward()
        optimizer.step()
        optimizer.zero_grad()

    return dict(ms_per_it=median_ms(step, iterations), batch=args.mini_batch_size)


class PlainDLRM(nn.Module):
    """The script's dense path behind plain ``nn.EmbeddingBag(sparse=True)`` tables and ``torch.optim.Adagrad``."""

    def __init__(self, args: argparse.Namespace, sizes: dlrm_s_pytorch.Sizes) -> None:
        super().__init__()
        model = dlrm_s_pytorch.DLRM(args, sizes)  # the same initial weights
        self.tables = nn.ModuleList(
            nn.EmbeddingBag.from_pretrained(t.weight.detach(), freeze=False, mode="sum", sparse=True)
            for t in model.embeddings
        )
        self.dense = model.dense

    def forward(
        self, dense: torch.Tensor, offsets: list[torch.Tensor], indices: list[torch.Tensor], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = [table(i, o) for table, o, i in zip(self.tables, offsets, indices, strict=True)]
        return self.dense(dense, pooled, targets)


def plain_step_ms(argv: list[str], iterations: int) -> dict:
    args, sizes, [(dense, offsets, indices, targets)] = raw_batches(argv, 1)
    model = PlainDLRM(args, sizes)
    sparse = torch.optim.Adagrad(model.tables.parameters(), lr=args.learning_rate, eps=ADAGRAD_EPS)
    dense_opt = torch.optim.Adagrad(model.dense.parameters(), lr=args.learning_rate, eps=ADAGRAD_EPS)

    def step() -> None:
        _, loss, _ = model(dense, offsets, indices, targets)
        loss.backward()
        for optimizer in (sparse, dense_opt):
            optimizer.step()
            optimizer.zero_grad()

    return dict(ms_per_it=median_ms(step, iterations), batch=args.mini_batch_size)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "embedding":
        result = embedding()
    elif what == "kaggle-torchrec":
        result = kaggle_torchrec()
    elif what == "kaggle-plain":
        result = plain_step_ms(KAGGLE_FLAGS, 10)
    else:  # medium-plain fp32|bf16
        result = plain_step_ms(["--config", str(MEDIUM_CONFIG), f"--data_type={sys.argv[2]}"], 5)
    print(json.dumps(result))

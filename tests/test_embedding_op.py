"""The custom embedding op and the in-backward optimizers against plain PyTorch (SPEC §3, §4)."""

import pytest
import torch
from torch import nn

import dlrm_s_pytorch
import habana_dlrm_ops
from distributed_utils import Ranks, plan_tables
from habana_dlrm_ops import (
    BufferedOneDNNKernels,
    DenseOptimizer,
    EmbeddingBag,
    Linear,
    OneDNNKernels,
    TorchKernels,
    WholeBufferKernels,
    adagrad_std,
    preprocess_bags,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# 1e-6, relative for values above 1: a row's gradient sums many occurrences, and float32 sums in another order
# differ by a few ulps (both implementations are equally close to a float64 computation).
TOLERANCE = dict(atol=1e-6, rtol=1e-6)
FLOAT64_TOLERANCE = dict(atol=1e-12, rtol=1e-12)  # 3e-14 (abs), 4e-15 (relative to 1 + |value|) observed


def reference_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=1e-10)
    return torch.optim.SGD(params, lr=lr)


def random_bags(gen: torch.Generator, rows: int, batch: int, largest: int, fixed: bool):
    """Bags with repeated indices inside a bag and across bags, and some empty bags."""
    lengths = torch.full((batch,), largest) if fixed else torch.randint(0, largest + 1, (batch,), generator=gen)
    hot_rows = torch.randint(0, rows, (3,), generator=gen)  # drawn often, so repeats are certain
    indices = torch.where(
        torch.rand(int(lengths.sum()), generator=gen) < 0.3,
        hot_rows[torch.randint(0, 3, (int(lengths.sum()),), generator=gen)],
        torch.randint(0, rows, (int(lengths.sum()),), generator=gen),
    )
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]])
    return indices, offsets


@pytest.mark.parametrize("kernels", [TorchKernels, WholeBufferKernels])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 300, 5000])
def test_op_matches_nn_embedding_bag_over_steps(
    rows: int, fixed: bool, optimizer: str, dtype: torch.dtype, device: str, kernels: type[TorchKernels]
) -> None:
    """Forward, coalesced backward and in-backward update, five steps, against nn.EmbeddingBag + torch.optim.

    Both kernel sets: the valid prefixes, and the whole buffers with their padding. In float64 the comparison
    sees only the algorithm. In float32 a one-row table sums ~100 occurrences a step
    and both sides' summation orders drift apart by more than 1e-6 within five steps, so that case runs in float64.
    """
    if rows == 1 and dtype == torch.float32:
        pytest.skip("float32 summation-order noise on one row exceeds 1e-6; the float64 case covers it")
    gen = torch.Generator().manual_seed(rows * 10 + fixed)
    dim, batch, largest, lr = 8, 16, 6, 0.5
    tolerance = TOLERANCE if dtype == torch.float32 else FLOAT64_TOLERANCE
    initial = torch.randn(rows, dim, generator=gen, dtype=dtype)
    ours = EmbeddingBag(initial.clone(), kernels()).to(device)
    ours.set_optimizer(optimizer, lr)
    reference = nn.EmbeddingBag(rows, dim, mode="sum", dtype=dtype, device=device)
    reference.weight.data.copy_(initial)
    ref_opt = reference_optimizer(optimizer, reference.parameters(), lr)

    for _ in range(5):
        indices, offsets = random_bags(gen, rows, batch, largest, fixed)
        upstream = (torch.randn(batch, dim, generator=gen, dtype=dtype) / batch).to(device)  # a linear loss
        out = ours(preprocess_bags(indices, offsets, batch, largest * batch).to(device))
        expected = reference(indices.to(device), offsets.to(device))
        torch.testing.assert_close(out, expected, **tolerance)
        (out * upstream).sum().backward()
        ref_opt.zero_grad()
        (expected * upstream).sum().backward()
        ref_opt.step()
        assert ours.weight.grad is None
        torch.testing.assert_close(ours.weight.detach(), reference.weight.detach(), **tolerance)
        if optimizer == "adagrad":
            torch.testing.assert_close(ours.moments, ref_opt.state[reference.weight]["sum"], **tolerance)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_same_index_in_two_tables_of_one_batch(optimizer: str) -> None:
    """Two tables in one model see the same row ids in one batch; each gets only its own update."""
    gen = torch.Generator().manual_seed(3)
    rows, dim, batch, lr = 50, 4, 8, 0.05
    starts = [torch.randn(rows, dim, generator=gen) for _ in range(2)]
    ours = [EmbeddingBag(w.clone()) for w in starts]
    refs = [nn.EmbeddingBag(rows, dim, mode="sum") for _ in range(2)]
    for table, ref, w in zip(ours, refs, starts, strict=True):
        table.set_optimizer(optimizer, lr)
        ref.weight.data.copy_(w)
    ref_opt = reference_optimizer(optimizer, [p for r in refs for p in r.parameters()], lr)
    for _ in range(3):
        indices, offsets = random_bags(gen, rows, batch, 5, fixed=False)
        upstream = torch.randn(batch, 2 * dim, generator=gen) / batch
        bags = preprocess_bags(indices, offsets, batch, 5 * batch)
        out = torch.cat([table(bags) for table in ours], dim=1)
        expected = torch.cat([ref(indices, offsets) for ref in refs], dim=1)
        (out * upstream).sum().backward()
        ref_opt.zero_grad()
        (expected * upstream).sum().backward()
        ref_opt.step()
    for table, ref in zip(ours, refs, strict=True):
        torch.testing.assert_close(table.weight.detach(), ref.weight.detach(), **TOLERANCE)


def test_preprocessing_deduplicates_rows_sharing_low_bits() -> None:
    """The original's one-pass radix sort split 5000 into two groups around 5000 - 4096 = 904 (same low 11 bits)."""
    indices = torch.tensor([5000, 904, 5000, 7, 904, 5000])
    offsets = torch.tensor([0, 2, 4])
    bags = preprocess_bags(indices, offsets, batch_size=4, capacity=10)
    assert bags.num_indices == 6 and bags.num_unique == 3
    assert bags.unique_indices[:3].tolist() == [7, 904, 5000]
    assert bags.unique_starts[:4].tolist() == [0, 1, 3, 6]
    assert bags.sorted_bags[:6].tolist() == [1, 0, 2, 0, 1, 2]
    assert bags.offsets.tolist() == [0, 2, 4, 6, 6]  # the fourth bag of the buffer is empty
    assert bags.indices.shape == (10,) and bags.unique_starts.shape == (11,)


@pytest.mark.parametrize("ranks", [Ranks(0, 1, 0, 1), Ranks(1, 2, 1, 2)], ids=["one-rank", "rank-1-of-2"])
def test_loader_buffers_hold_num_indices_per_lookup_times_the_global_batch(ranks: Ranks) -> None:
    argv = ["--arch-embedding-size=20-3000", "--mini-batch-size=16", "--num-indices-per-lookup=6", "--num-batches=1"]
    args, sizes, _ = dlrm_s_pytorch.parse_command_line(argv)
    shards = [shard for shard in plan_tables(sizes.tables, ranks.world_size) if shard.rank == ranks.rank]
    data, backend = dlrm_s_pytorch.RandomDataset(args, sizes), habana_dlrm_ops.Backend(lazy=False)
    batch = next(iter(dlrm_s_pytorch.make_loader(args, data, sizes, backend, shards, ranks)))
    assert batch.dense.size(0) == 16 // ranks.world_size and len(batch.bags) == len(shards) > 0
    for bags in batch.bags:  # every rank looks up its tables for the global batch
        assert bags.indices.shape == bags.unique_indices.shape == bags.sorted_bags.shape == (6 * 16,)
        assert (bags.offsets.shape, bags.unique_starts.shape, bags.valid_counts.shape) == ((17,), (97,), (5,))


def test_whole_buffer_kernels_spread_the_padding() -> None:
    """On CUDA one thread sums a bag and the last bag runs to the buffer's end, and updates of one row serialize:
    the padding goes to short throwaway bags and to distinct rows, never all to one (measured 2x slower on an H100).
    """
    bags = preprocess_bags(torch.tensor([3, 1, 3]), torch.tensor([0, 2]), batch_size=4, capacity=100)
    offsets = habana_dlrm_ops._with_padding_bags(bags.offsets, bags.valid_counts[1], 100)
    assert offsets[:5].tolist() == [0, 2, 3, 3, 3] and offsets[-1] == 100
    assert offsets.diff()[4:].max() <= habana_dlrm_ops.PADDING_BAG
    rows = WholeBufferKernels().updated_rows(bags, table_rows=10)
    assert rows.shape == (100,) and rows[:2].tolist() == [1, 3]
    assert rows.bincount().max() <= 11  # 98 padded slots over 10 rows, not 98 on row 0


@pytest.mark.parametrize("kernels", [TorchKernels, WholeBufferKernels])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_a_shard_of_no_rows_pools_zeros_and_updates_nothing(optimizer: str, kernels: type[TorchKernels]) -> None:
    """A table with fewer rows than ranks is split so that some ranks hold none of its rows: they look up nothing.
    The whole buffers' padding must not read or update a row there either (CUDA lazy mode, with several ranks)."""
    table = EmbeddingBag(torch.zeros(0, 4), kernels())
    table.set_optimizer(optimizer, 0.1)
    out = table(preprocess_bags(torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0]), batch_size=3, capacity=6))
    assert torch.equal(out, torch.zeros(3, 4)) and out.requires_grad  # the rank still joins the exchange's backward
    out.sum().backward()
    assert table.weight.shape == (0, 4) and table.weight.grad is None


def test_preprocessing_rejects_more_lookups_than_the_buffer() -> None:
    with pytest.raises(ValueError, match="more than the buffer's 4"):
        preprocess_bags(torch.arange(5), torch.tensor([0]), batch_size=1, capacity=4)


@pytest.mark.parametrize("kernels", [TorchKernels, WholeBufferKernels])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_backward_and_update_allocate_nothing_near_the_tables_size(optimizer: str, kernels: type) -> None:
    table = EmbeddingBag(torch.zeros(1 << 20, 4), kernels())  # 16 MB
    table.set_optimizer(optimizer, 0.1)
    out = table(preprocess_bags(torch.tensor([3, 5, 3, 900_000]), torch.tensor([0, 2]), batch_size=2, capacity=8))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        out.sum().backward()
    assert table.weight[[3, 5, 900_000]].ne(0).all() and table.weight[4].eq(0).all()
    largest = max(event.cpu_memory_usage for event in profile.events())  # bytes an op left allocated
    assert 0 < largest < (1 << 20), largest


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adagrad_std_is_torchs_bit_for_bit_on_subnormal_states(dtype: torch.dtype) -> None:
    """Subnormal states are clamped before the square root (30x faster on x86); no bit of sqrt + eps changes."""
    tiny = torch.finfo(dtype).tiny
    gen = torch.Generator().manual_seed(0)
    edges = torch.tensor([0.0, tiny, tiny / 2, tiny / 1e3, 1e-36, 1e-20, 1e-18, 1.0, float("inf")], dtype=dtype)
    states = torch.cat([edges, torch.rand(10_000, generator=gen, dtype=dtype) * tiny, torch.rand(10_000, dtype=dtype)])
    assert torch.equal(adagrad_std(states), states.sqrt().add_(1e-10))


# 1e-22 makes the squared gradients subnormal
@pytest.mark.parametrize("loss_scale", [1.0, 1e-22])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_dense_optimizer_equals_torch_optim(optimizer: str, loss_scale: float) -> None:
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))
    reference = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))
    reference.load_state_dict(ours.state_dict())
    DenseOptimizer(list(ours.parameters()), optimizer, lr=0.05)
    ref_opt = reference_optimizer(optimizer, reference.parameters(), 0.05)
    for _ in range(4):
        x = torch.randn(10, 6)
        (ours(x).square().mean() * loss_scale).backward()
        ref_opt.zero_grad()
        (reference(x).square().mean() * loss_scale).backward()
        ref_opt.step()
        assert all(p.grad is None for p in ours.parameters())
        for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def linear_stack(kernels: TorchKernels) -> nn.Sequential:
    """Three layers, two of the same shape, as ``make_mlp`` builds them."""
    return nn.Sequential(Linear(6, 5, kernels), nn.ReLU(), Linear(5, 5, kernels), nn.ReLU(), Linear(5, 5, kernels))


@pytest.mark.parametrize("kernels", [OneDNNKernels, BufferedOneDNNKernels])
def test_onednn_linear_equals_torch_linear(kernels: type[OneDNNKernels]) -> None:
    """oneDNN's products, forward and backward, against nn.Linear's: float32 summation order only."""
    torch.manual_seed(0)
    ours, reference = linear_stack(kernels()), linear_stack(TorchKernels())
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(10, 6)
    for _ in range(2):  # gradients accumulate into the first ones
        torch.testing.assert_close(ours(x), reference(x), atol=1e-6, rtol=1e-6)
        ours(x).square().sum().backward()
        reference(x).square().sum().backward()
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=1e-6)
    grads = [layer.weight.grad for layer in ours if isinstance(layer, Linear)]
    assert len({g.untyped_storage().data_ptr() for g in grads}) == 3  # kept gradients never share a buffer


def test_compiled_onednn_linear_calls_onednn_and_equals_torch_linear() -> None:
    """Lazy mode: inside a compiled graph the layers still multiply in oneDNN, forward and input gradient."""
    torch.manual_seed(0)
    ours, reference = linear_stack(OneDNNKernels()), linear_stack(TorchKernels())
    reference.load_state_dict(ours.state_dict())
    compiled = torch.compile(ours, fullgraph=True, dynamic=False)
    x = torch.randn(10, 6)
    compiled(x).square().sum().backward()  # compiles
    for param in ours.parameters():
        param.grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = compiled(x)
        out.square().sum().backward()
    products = [event for event in profile.events() if event.name == "dlrm::onednn_product"]
    assert len(products) == 3 + 2  # three forward products, two input gradients (x needs none)
    torch.testing.assert_close(out, reference(x), atol=1e-6, rtol=1e-6)
    reference(x).square().sum().backward()
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=1e-6)


def test_onednn_linear_reuses_one_gradient_buffer_per_shape_when_each_gradient_is_dropped() -> None:
    torch.manual_seed(0)
    kernels = BufferedOneDNNKernels()
    ours, reference = linear_stack(kernels), linear_stack(TorchKernels())
    reference.load_state_dict(ours.state_dict())
    DenseOptimizer(list(ours.parameters()), "adagrad", lr=0.05)
    ref_opt = reference_optimizer("adagrad", reference.parameters(), 0.05)
    buffers = set()
    for _ in range(3):
        x = torch.randn(10, 6)
        ours(x).square().mean().backward()
        ref_opt.zero_grad()
        reference(x).square().mean().backward()
        ref_opt.step()
        buffers |= {buffer.data_ptr() for buffer, _ in kernels._weight_grads.values()}
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6)
    assert len(buffers) == 2  # (5, 6) and (5, 5), over three steps and both 5 x 5 layers


def test_onednn_kernels_leave_autocast_to_torch() -> None:
    """Under autocast (bf16) the layer is torch's: its product runs in bf16, like nn.Linear's."""
    torch.manual_seed(0)
    ours, reference = linear_stack(BufferedOneDNNKernels()), linear_stack(TorchKernels())
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(10, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine, theirs = ours(x), reference(x)
    assert mine.dtype == torch.bfloat16
    assert torch.equal(mine, theirs)

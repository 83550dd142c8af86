"""`make bench`: every speed and memory comparison of the CPU port, side by side; a table, and JSON.

1. The medium configuration (one 3 M x 64 table, a 101 M-parameter top MLP, batch 512, Adagrad) in fp32 and
   bf16, eager and lazy, and the same step in plain PyTorch: ms/it, samples/s, peak memory, and ms/it against
   the matrix-multiply floor: the MLPs' forward and backward FLOPs over torch.mm's best rate, measured just
   before and just after each run (a slower machine during one run mostly cancels out; a slow spell while
   measuring cannot make the floor easier).
2. The embedding op alone against FBGEMM's EXACT_ADAGRAD and plain PyTorch, with their results compared.
3. A Criteo-Kaggle-shaped model against TorchRec's DLRM and plain PyTorch, samples/s on the same batch.

Each measurement runs in its own process. Times are medians after warm-up. FBGEMM and TorchRec come from
bench/requirements-peers.txt (`make bench` installs them); without them their rows are left out.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from habana_dlrm_ops import onednn_product  # noqa: E402

MEDIUM = ROOT / "hb_configs" / "single_node_dlrm_eager_medium_{}.yaml"
BATCH = 512
GEMM_REPEATS = 10  # timed products per rate, the first left out
GOALS = dict(fp32_x_floor=1.10, bf16_x_floor=1.25, embedding_vs_fbgemm=0.8, kaggle_vs_torchrec=1.3, fp32_peak_gb=2.9)
MS_PER_IT = re.compile(r"^Finished training it \d+/\d+ of epoch \d+, ([\d.]+) ms/it", re.M)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mlp_gflop_per_iteration(precision: str) -> float:
    """Forward and backward (3 x forward) FLOPs of both MLPs for one batch of the medium configuration."""
    parameters = yaml.safe_load(Path(str(MEDIUM).format(precision)).read_text())["parameters"]
    bottom = [int(w) for w in parameters["arch-mlp-bot"].split("-")]
    top = [2 * bottom[-1]] + [int(w) for w in parameters["arch-mlp-top"].split("-")]  # cat of x and one table
    multiply_adds = sum(n * m for widths in (bottom, top) for n, m in pairwise(widths))
    return 3 * 2 * multiply_adds * BATCH / 1e9


def gemm_gflops(dtype: torch.dtype, library: str) -> float:
    """The best rate of a matrix product at the top MLP's shape (512 x 4096 x 4096), the first call left out:
    torch.mm's (the goals' floor), or oneDNN's, which fp32 training on the CPU uses and which is faster on some CPUs.

    The best, not the median: a slow spell of this shared machine must not lower the floor a run is held to. The
    torch.mm product is written into the same tensor each time, so no allocation slows the rate down.
    """
    a, b = torch.randn(BATCH, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    product = torch.empty(BATCH, 4096, dtype=dtype)
    multiply = {
        "torch.mm": lambda: torch.mm(a, b, out=product),
        "oneDNN": lambda: onednn_product(a, b, None),  # the product fp32 training uses, eager and lazy
    }[library]
    rates = []
    for _ in range(GEMM_REPEATS):
        start = time.perf_counter()
        multiply()
        rates.append(2 * BATCH * 4096 * 4096 / (time.perf_counter() - start) / 1e9)
    return max(rates[1:])


def script_times(flags: list[str], iterations: int) -> tuple[list[float], float]:
    """Run the training script on the CPU: its per-iteration ms after the first, and its peak RSS in GB."""
    command = [
        sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *flags, f"--num-batches={iterations}",
        "--print-freq=1", "--print-time", "--device=cpu",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    output = process.stdout.read()  # one pipe: two could each fill while the other is being read
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, unlike RUSAGE_CHILDREN
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {' '.join(flags)} failed:\n{output[-4000:]}")
    return [float(ms) for ms in MS_PER_IT.findall(output)][1:], usage.ru_maxrss * 1024 / 1e9


def run_medium(precision: str, mode: str, iterations: int) -> dict:
    """One run of the medium configuration: its per-iteration times and its peak resident memory."""
    dtype = PRECISIONS[precision]
    before = {library: gemm_gflops(dtype, library) for library in ("torch.mm", "oneDNN")}
    times, peak_rss_gb = script_times(["--config", str(MEDIUM).format(precision), f"--mode={mode}"], iterations)
    ms = statistics.median(times)
    # measured just before and just after the run
    gemm, onednn = (max(before[library], gemm_gflops(dtype, library)) for library in ("torch.mm", "oneDNN"))
    floor_ms = 1000 * mlp_gflop_per_iteration(precision) / gemm
    onednn_floor_ms = 1000 * mlp_gflop_per_iteration(precision) / onednn
    return dict(
        precision=precision, mode=mode, iterations=iterations, ms_per_it=ms, samples_per_s=BATCH * 1000 / ms,
        peak_rss_gb=peak_rss_gb, gemm_gflops=gemm, floor_ms=floor_ms, ms_over_floor=ms / floor_ms,
        onednn_gflops=onednn, onednn_floor_ms=onednn_floor_ms, ms_over_onednn_floor=ms / onednn_floor_ms,
        per_iteration_ms=times,
    )  # fmt: skip


def peer(*what: str) -> dict | None:
    """One measurement of bench/peers.py, in its own process; None when its peer is not installed."""
    command = [sys.executable, str(ROOT / "bench" / "peers.py"), *what]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        if "ModuleNotFoundError" in result.stderr:
            return None
        sys.exit(f"bench: peers.py {' '.join(what)} failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def run_kaggle(mode: str, iterations: int) -> float:
    """ms/it of the training script on the Kaggle-shaped model, one batch replayed (--measure-perf)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from peers import KAGGLE_FLAGS

    times, _ = script_times([*KAGGLE_FLAGS, "--measure-perf", f"--mode={mode}"], iterations)
    return statistics.median(times)


def print_table(title: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    print(f"\n{title}")
    print("".join(f"{c:>14}" for c in columns))
    for row in rows:
        print("".join(f"{v:>14.2f}" if isinstance(v, float) else f"{v:>14}" for v in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10, help="per medium run, the first one is warm-up")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results.json"))
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}")

    medium = [run_medium(precision, mode, args.iterations) for precision in PRECISIONS for mode in ("eager", "lazy")]
    plain = {precision: peer("medium-plain", precision) for precision in PRECISIONS}
    print_table(
        f"medium configuration, batch {BATCH}",
        ("precision", "mode", "ms/it", "samples/s", "peak RSS GB", "mm GFLOP/s", "floor ms", "x floor",
         "oneDNN GF/s", "x oneDNN"),
        [
            (r["precision"], r["mode"], r["ms_per_it"], r["samples_per_s"], r["peak_rss_gb"], r["gemm_gflops"],
             r["floor_ms"], r["ms_over_floor"], r["onednn_gflops"], r["ms_over_onednn_floor"])
            for r in medium
        ] + [(p, "plain", r["ms_per_it"], BATCH * 1000 / r["ms_per_it"], *[""] * 6) for p, r in plain.items()],
    )  # fmt: skip
    print("x floor: over torch.mm's rate, the goals' floor; x oneDNN: over oneDNN's, the stricter when it is faster")
    # Each run's ms/it over the floor measured around it, so a slower machine during one run mostly cancels out.
    lazy_over_eager = {
        p: medium[2 * i + 1]["ms_over_floor"] / medium[2 * i]["ms_over_floor"] for i, p in enumerate(PRECISIONS)
    }
    print("lazy / eager (x floor over x floor): " + ", ".join(f"{p} {r:.2f}" for p, r in lazy_over_eager.items()))

    embedding = peer("embedding")
    print_table(
        "embedding op: 3,000,000 x 64, batch 512, up to 38 lookups a bag, Adagrad; forward + backward + update",
        ("", "ms", "x FBGEMM"),
        [
            (name, embedding[key], embedding[key] / embedding["fbgemm_ms"] if "fbgemm_ms" in embedding else "")
            for name, key in [("ours", "ours_ms"), ("FBGEMM", "fbgemm_ms"), ("plain PyTorch", "plain_ms")]
            if key in embedding
        ],
    )
    print(
        f"host preprocessing (in the loader, off the step): {embedding['preprocess_ms']:.2f} ms a batch; results "
        f"against FBGEMM: weights within {embedding.get('max_weight_difference', float('nan')):.1e}, "
        f"Adagrad state within {embedding.get('max_state_difference', float('nan')):.1e}"
    )

    kaggle = {"ours eager": run_kaggle("eager", 11), "ours lazy": run_kaggle("lazy", 11)}
    for name, what in [("TorchRec", "kaggle-torchrec"), ("plain PyTorch", "kaggle-plain")]:
        result = peer(what)
        if result is not None:
            kaggle[name] = result["ms_per_it"]
    torchrec = kaggle.get("TorchRec")
    print_table(
        "Criteo-Kaggle-shaped: 26 tables, dim 16, bottom 13-512-256-64-16, top 512-256-1, dot, batch 2048, Adagrad",
        ("", "ms/it", "samples/s", "x TorchRec"),
        [(name, ms, 2048 * 1000 / ms, torchrec / ms if torchrec else "") for name, ms in kaggle.items()],
    )

    best, best_onednn = (
        {p: min(medium[2 * i][key], medium[2 * i + 1][key]) for i, p in enumerate(PRECISIONS)}
        for key in ("ms_over_floor", "ms_over_onednn_floor")
    )
    fastest_kaggle = min(kaggle["ours eager"], kaggle["ours lazy"])
    measured = dict(
        fp32_x_floor=best["fp32"],
        bf16_x_floor=best["bf16"],
        embedding_vs_fbgemm=embedding["ours_ms"] / embedding["fbgemm_ms"] if "fbgemm_ms" in embedding else None,
        kaggle_vs_torchrec=torchrec / fastest_kaggle if torchrec else None,
        fp32_peak_gb=medium[0]["peak_rss_gb"],
        fp32_x_onednn_floor=best_onednn["fp32"],
        bf16_x_onednn_floor=best_onednn["bf16"],
    )
    print("\ngoals (lower is better except x TorchRec):")
    for name, goal in GOALS.items():
        value = measured[name]
        met = value is not None and (value >= goal if name == "kaggle_vs_torchrec" else value <= goal)
        shown = "not measured (peer not installed)" if value is None else f"{value:.2f}"
        print(f"  {name:22} {shown:>8}  goal {goal}: {'met' if met else 'NOT met'}")
    print(f"  over oneDNN's rate instead of torch.mm's: fp32 {best_onednn['fp32']:.2f}, bf16 {best_onednn['bf16']:.2f}")

    results = dict(
        medium=medium,
        medium_plain=plain,
        lazy_over_eager=lazy_over_eager,
        embedding=embedding,
        kaggle=kaggle,
        goals=GOALS,
        measured=measured,
    )
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()

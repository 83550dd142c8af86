#!/usr/bin/env bash
# The GPU check (issue 4), "all": the CUDA tests, then the medium configuration eager and lazy in fp32 and bf16 with
# --measure-perf, printing samples/s and peak GPU memory. "floor": the floor of bf16 lazy and whether its update can
# overlap the products or fuse with them (bench/gpu_floor.py); "autotune": the floor with Inductor's max-autotune
# too; "profile": the slowest GPU kernels of bf16 lazy; "decide": medium bf16 lazy, then the floor, in one call
# that fits a GPU session's 15 minutes. Uses the machine's own python3 (torch 2.11-2.14).
# Usage: bash bench/gpu_check.sh [tests|medium|floor|autotune|all|profile|decide] [num_batches]
set -u
cd "$(dirname "$0")/.."
what=${1:-all}
batches=${2:-200}
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

if [ "$what" = tests ] || [ "$what" = all ]; then
    echo "== CUDA tests"
    timeout 300 $python -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_embedding_op.py \
        tests/test_criteo_training.py tests/test_fused_adagrad.py -k cuda 2>&1 | tail -25
fi

modes="eager lazy" dtypes="fp32 bf16"
[ "$what" = decide ] && modes=lazy dtypes=bf16
if [ "$what" = medium ] || [ "$what" = all ] || [ "$what" = decide ]; then
    for mode in $modes; do
        for dtype in $dtypes; do
            echo "== medium $dtype $mode ($batches batches, --measure-perf)"
            timeout 180 $python dlrm_s_pytorch.py --config "hb_configs/single_node_dlrm_${mode}_medium_${dtype}.yaml" \
                --device cuda --measure-perf --num-batches "$batches" --print-freq $((batches / 2)) \
                --log-device-mem-alloc > /tmp/medium.log 2>&1
            status=$?
            grep -E "^(Using|Lazy|Finished|Peak)" /tmp/medium.log
            [ $status -ne 0 ] && { echo "exit $status"; tail -20 /tmp/medium.log; }
            last_ms=$(grep "^Finished" /tmp/medium.log | tail -1 | sed -E 's/.*, ([0-9.]+) ms\/it.*/\1/')
            [ -n "$last_ms" ] && $python -c "print(f'samples/s: {512 * 1000 / $last_ms:,.0f}  (batch 512, {$last_ms} ms/it, steady state)')"
        done
    done
fi

if [ "$what" = floor ] || [ "$what" = decide ]; then
    echo "== floor of medium bf16 lazy"
    timeout 300 $python -u bench/gpu_floor.py 2>&1 | grep -v Warning | tail -30
fi

if [ "$what" = autotune ]; then
    echo "== floor of medium bf16 lazy, and with max-autotune"
    timeout 540 $python -u bench/gpu_floor.py --autotune 2>&1 | grep -v Warning | tail -30
fi

if [ "$what" = profile ]; then
    echo "== medium bf16 lazy, profiled ($batches batches)"
    dir=$(mktemp -d)
    timeout 180 $python "$PWD/dlrm_s_pytorch.py" --config "$PWD/hb_configs/single_node_dlrm_lazy_medium_bf16.yaml" \
        --device cuda --measure-perf --num-batches "$batches" --print-freq "$batches" --enable-profiling \
        > "$dir/profile.log" 2>&1 || tail -20 "$dir/profile.log"
    (cd "$dir" && grep -E "^Finished" profile.log && head -40 dlrm_s_pytorch.prof)
fi

#!/usr/bin/env bash
# The CUDA checks and figures of one device session, in one script (the device is lent for
# minutes, so every step has its own time limit and the results are saved after each):
# tests/test_cuda.py (training equals the CPU, compiled decode as one graph with no host sync,
# CUDA-graph decode equals eager), compiled decode tokens/s with and without Engram
# (benchmarks/perf_targets.py: eager, model.compile, and mode="reduce-overhead"), the training
# step per mode with the hash ahead of the step and inside it, and where a step synchronises.
# Usage: OUT=results-dir bash benchmarks/gpu_check.sh    (results in $OUT/results.tgz)
# TESTS=expr: only the CUDA tests matching it; ONLY_DECODE=1: stop after the decode figures.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ENGRAM_CACHE=/tmp/engram-cache
R=/tmp/gpu; mkdir -p $R
T0=$(date +%s)
save() { tar czf $OUT/results.tgz -C /tmp gpu 2>/dev/null; }
step() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) at +$(( $(date +%s) - T0 ))s"
         timeout -s TERM $limit "$@" > $R/$name.txt 2>&1; echo "rc $? after +$(( $(date +%s) - T0 ))s" >> $R/$name.txt
         grep -v "Warning\|warnings.warn\|^$" $R/$name.txt | tail -n 14; save; }
{ nvidia-smi -L; nproc; python3 -c "import torch, transformers, tokenizers; print(torch.__version__, transformers.__version__, tokenizers.__version__, torch.cuda.get_device_name())"; uptime; } > $R/machine.txt 2>&1
cat $R/machine.txt
K=(); [ -n "${TESTS:-}" ] && K=(-k "$TESTS")
step test_cuda ${TEST_LIMIT:-170} python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -rA "${K[@]}"
step decode_compiled 300 python3 benchmarks/perf_targets.py --only compiled --device cuda --compile-modes reduce-overhead,default,default+static --reps 5
[ -n "${ONLY_DECODE:-}" ] && { echo "=== done at +$(( $(date +%s) - T0 ))s"; exit 0; }
step modes_study 100 python3 benchmarks/train_modes.py --device cuda --modes fp32,bf16+compile --hash ahead,in-step --warmup 5 --rounds 10 --out $R/modes_study.json
step sync_sites 45 python3 benchmarks/cuda_sync_sites.py
echo "=== done at +$(( $(date +%s) - T0 ))s"

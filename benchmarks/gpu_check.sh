#!/usr/bin/env bash
# The CUDA checks and figures of one device session, in one script (the device is lent for
# minutes): tests/test_cuda.py, where a step synchronises, training-step time per mode at the
# study's size and at GPT-2-small size, decode tokens/s eager and compiled, the study on the
# GPU, and (in the background, on the machine's CPUs) the default study on three corpora.
# Usage: DATA=dir-with-tinyshakespeare.txt-and-wikitext-2 OUT=results-dir bash benchmarks/gpu_check.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ENGRAM_CACHE=/tmp/engram-cache
R=/tmp/gpu; mkdir -p $R
T0=$(date +%s)
save() { tar czf $OUT/results.tgz -C /tmp gpu 2>/dev/null; }
step() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) at +$(( $(date +%s) - T0 ))s"
         timeout -s TERM $limit "$@" > $R/$name.txt 2>&1; echo "rc $?" >> $R/$name.txt; tail -25 $R/$name.txt; save; }
{ nvidia-smi -L; nproc; python3 -c "import torch, transformers, tokenizers; print(torch.__version__, transformers.__version__, tokenizers.__version__, torch.cuda.get_device_name())"; uptime; } > $R/machine.txt 2>&1
cat $R/machine.txt
# the tokenizer of the default corpus, once (the background studies and the GPU steps share the cache)
step tokenizer 120 python3 -c "from engram.training import data; c = data.load_corpus(); data.get_tokenizer(None, c.train_text, 4096)"
# background: the default study on three corpora, 3 seeds, CPU, 1 thread each
S="python3 -m engram study --device cpu --threads 1 --no-progress"
(timeout -s TERM 400 $S --out $R/study_cpu_stdlib > $R/study_cpu_stdlib.log 2>&1) &
(timeout -s TERM 400 $S --data $DATA/tinyshakespeare.txt --out $R/study_cpu_shakespeare > $R/study_cpu_shakespeare.log 2>&1) &
(timeout -s TERM 400 $S --data $DATA/wikitext-2/valid.txt --eval-data $DATA/wikitext-2/test.txt --out $R/study_cpu_wikitext > $R/study_cpu_wikitext.log 2>&1) &
step sync_sites 90 python3 benchmarks/cuda_sync_sites.py
step test_cuda 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_optim.py -rA
step modes_study 150 python3 benchmarks/train_modes.py --device cuda --modes fp32,bf16,bf16+compile --hash ahead,in-step --warmup 5 --rounds 20 --out $R/modes_study.json
step modes_gpt2 180 python3 benchmarks/train_modes.py --device cuda --modes bf16,bf16+compile --hash ahead,in-step --width 768 --layers 12 --batch 32 --seq 512 --warmup 4 --rounds 10 --out $R/modes_gpt2.json
step bench_eager 60 python3 -m engram bench --device cuda --only decode,table --reps 5 --out $R/bench_eager
step bench_compiled_b1 90 python3 -m engram bench --device cuda --only decode --compile --reps 5 --out $R/bench_compiled_b1
step bench_compiled_b8 120 python3 -m engram bench --device cuda --only decode --compile --batch 8 --reps 5 --out $R/bench_compiled_b8
step study_gpu 90 python3 -m engram study --device cuda --no-progress --out $R/study_gpu
echo "=== waiting for the CPU studies at +$(( $(date +%s) - T0 ))s"; uptime
wait
for s in stdlib shakespeare wikitext; do tail -30 $R/study_cpu_$s.log; done
save
echo "=== done at +$(( $(date +%s) - T0 ))s"

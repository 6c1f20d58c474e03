#!/usr/bin/env bash
# One prepared run on a lent GPU machine (16 cores): the CUDA kernels, plus the CPU benchmarks on
# otherwise idle cores (pinned to 2 cores each, so that they measure a quiet 2-core machine).
#   OUT=/some/dir bash benchmarks/device_run.sh
# Writes JSON and logs (in $OUT/all.tgz) with the card's and the CPU's names inside.
set -u
OUT=${OUT:?set OUT to an output folder}
export PYTHONPATH=src OMP_WAIT_POLICY=PASSIVE
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1

# CPU benchmarks in the background, 2 cores each (cores 0-1 stay with the GPU process).
taskset -c 2,3 python benchmarks/fake_quant_overhead.py --threads 2 \
  --out "$OUT/fake_quant_overhead_2cores.json" > "$OUT/fake_quant_overhead.log" 2>&1 &
taskset -c 4,5 python benchmarks/objective_overhead.py --threads 2 \
  --out "$OUT/objective_overhead_2cores.json" > "$OUT/objective_overhead.log" 2>&1 &
taskset -c 6,7 python benchmarks/scenes_speed.py --count 20000 --repeats 1 --workers 2 \
  --out "$OUT/scenes_speed_2cores.json" > "$OUT/scenes_speed.log" 2>&1 &
# Issue 7's onnxruntime int8 vs fp32 ratio on a CPU with VNNI (this project's AMD has none):
# the demo-size model and the op profile, 2 cores / 1 core, with the CPU's flags recorded.
grep -o -w 'avx512_vnni\|avx_vnni\|amx_int8\|avx2' /proc/cpuinfo | sort | uniq -c > "$OUT/cpu_flags.txt"
lscpu | grep -i 'model name' >> "$OUT/cpu_flags.txt"
(taskset -c 8,9 python benchmarks/deploy.py --threads 2 --preset tiny \
  --out "$OUT/deploy_xeon_2cores.json" > "$OUT/deploy.log" 2>&1
 taskset -c 8 python benchmarks/ort_op_profile.py --threads 1 \
  --out "$OUT/ort_op_profile_xeon.json" > "$OUT/ort_op_profile.log" 2>&1) &

# GPU: the W4A16 variant sweep, then the kernel table with distiq's autotuned kernel.
taskset -c 0,1 python benchmarks/w4a16_variants.py --budget-s 200 \
  --out "$OUT/w4a16_variants.json" > "$OUT/w4a16_variants.log" 2>&1
taskset -c 0,1 python benchmarks/cuda_kernels.py --repeats 30 \
  --out "$OUT/cuda_kernels.json" > "$OUT/cuda_kernels.log" 2>&1
wait
tail -n 60 "$OUT"/*.log
# the device tool brings back at most 8 files: one archive holds everything
tar -C "$OUT" -czf "$OUT/all.tgz" --exclude=all.tgz . && find "$OUT" -type f ! -name all.tgz -delete

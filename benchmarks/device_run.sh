#!/usr/bin/env bash
# One prepared run on a lent GPU machine, sized for one device command (under 10 minutes):
#   1. the CUDA tests of distiq.kernels (tinygemm behind w4a16_linear vs the dequantized
#      reference, the Triton GEMV for fp16), when pytest is installed there;
#   2. benchmarks/cuda_kernels.py: bf16 / W8A8 / fp8 / tinygemm / distiq's w4a16_linear (with
#      the path it picked) / forced dequantize / forced Triton, decode to prefill rows; every
#      kernel's output is checked against the dequantized reference first.
# Optional, off by default (each one may not fit beside the above in one command):
#   WITH_VARIANTS=1  the Triton W4A16 variant sweep (benchmarks/w4a16_variants.py);
#   WITH_CPU=1       the CPU benchmarks on otherwise idle cores, pinned to 2 cores each;
#   QUICK=1          cuda_kernels.py on one shape and fewer rows.
#   OUT=/some/dir bash benchmarks/device_run.sh
# Writes JSON and logs (in $OUT/all.tgz) with the card's and the CPU's names inside.
set -u
OUT=${OUT:?set OUT to an output folder}
export PYTHONPATH=src OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" >> "$OUT/gpu.txt" 2>&1

if [ "${WITH_CPU:-0}" = 1 ]; then
  # CPU benchmarks in the background, 2 cores each (cores 0-1 stay with the GPU process).
  taskset -c 2,3 python benchmarks/fake_quant_overhead.py --threads 2 \
    --out "$OUT/fake_quant_overhead_2cores.json" > "$OUT/fake_quant_overhead.log" 2>&1 &
  taskset -c 4,5 python benchmarks/objective_overhead.py --threads 2 \
    --out "$OUT/objective_overhead_2cores.json" > "$OUT/objective_overhead.log" 2>&1 &
  taskset -c 6,7 python benchmarks/scenes_speed.py --count 20000 --repeats 1 --workers 2 \
    --out "$OUT/scenes_speed_2cores.json" > "$OUT/scenes_speed.log" 2>&1 &
  # onnxruntime int8 vs fp32 on a CPU with VNNI (this project's AMD has none): the demo-size
  # model and the op profile, 2 cores / 1 core, with the CPU's flags recorded.
  grep -o -w 'avx512_vnni\|avx_vnni\|amx_int8\|avx2' /proc/cpuinfo | sort | uniq -c > "$OUT/cpu_flags.txt"
  lscpu | grep -i 'model name' >> "$OUT/cpu_flags.txt"
  (taskset -c 8,9 python benchmarks/deploy.py --threads 2 --preset tiny \
    --out "$OUT/deploy_xeon_2cores.json" > "$OUT/deploy.log" 2>&1
   taskset -c 8 python benchmarks/ort_op_profile.py --threads 1 \
    --out "$OUT/ort_op_profile_xeon.json" > "$OUT/ort_op_profile.log" 2>&1) &
fi

# GPU 1: the kernel tests (the CUDA ones run here; the CPU ones run anywhere).
if python -c "import pytest" 2>/dev/null; then
  timeout 200 taskset -c 0,1 python -m pytest -q -p no:cacheprovider \
    tests/kernels -rs > "$OUT/kernel_tests.log" 2>&1
  echo "pytest exit status $?" >> "$OUT/kernel_tests.log"
else
  echo "pytest is not installed on this machine: the CUDA kernel tests did not run" \
    > "$OUT/kernel_tests.log"
fi

# GPU 2: the kernel table (outputs checked against the dequantized reference, then timed).
if [ "${QUICK:-0}" = 1 ]; then
  KERNEL_ARGS=(--quick --batches 1,8,64,256,2048)
else
  KERNEL_ARGS=(--repeats 30)
fi
timeout 330 taskset -c 0,1 python benchmarks/cuda_kernels.py "${KERNEL_ARGS[@]}" \
  --out "$OUT/cuda_kernels.json" > "$OUT/cuda_kernels.log" 2>&1
echo "cuda_kernels.py exit status $?" >> "$OUT/cuda_kernels.log"

if [ "${WITH_VARIANTS:-0}" = 1 ]; then
  taskset -c 0,1 python benchmarks/w4a16_variants.py --budget-s 200 \
    --out "$OUT/w4a16_variants.json" > "$OUT/w4a16_variants.log" 2>&1
fi
wait
tail -n 80 "$OUT"/*.log
# the device tool brings back at most 8 files: one archive holds everything
tar -C "$OUT" -czf "$OUT/all.tgz" --exclude=all.tgz . && find "$OUT" -type f ! -name all.tgz -delete

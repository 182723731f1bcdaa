#!/usr/bin/env bash
# Standalone timings of 64-row decode launches on the lent GPU, outside MLX (kernel_log step 26): a kernel's
# NVRTC text as scripts/cuda_ptxas.py writes it (--dump DIR; its first two lines, the int typedefs, cut), built
# by nvcc into a harness that fills its inputs in device memory and times 300-400 launches with CUDA events.
# Needs no MLX install, so a lease of one call does it. Put the texts here first:
#   python scripts/cuda_ptxas.py ... --batches 64 --types Q4_K_M --form stored --dump /tmp/tu
#   sed 1,2d /tmp/tu/NN_rwkv_layernorm_lerp.cu > scripts/standalone/ln6.cu           (K 2560, M 6)
#   sed 1,2d /tmp/tu/NN_rwkv_matvec_one_segment_no_scales_mma_read_q4_k.cu > scripts/standalone/key.cu (MT 4)
cd "$(dirname "$0")"
b() { nvcc -O3 -arch=sm_90 -DKERNEL_TU="\"$1\"" "${@:4}" $3 -o /tmp/$2 2>&1 | grep -E "error" | head -3; }
b key.cu key ffn_key_64.cu &
b ln6.cu ln layernorm_lerp_64.cu &
b ln6.cu ln_fast layernorm_lerp_64.cu -use_fast_math &
wait
for i in 1 2 3; do /tmp/key; done
for b in 64 64 16 1; do /tmp/ln $b; done; /tmp/ln_fast 64

// Times the 64-row Q4_K FFN key launch (matvec MMA, MT 4, KT 160, two parts of K) as NVRTC builds it, standalone
// (scripts/standalone/run.sh). Its weights are all 0x11 bytes, so every product is 0: what is timed is the work.
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include KERNEL_TU
int main() {
  const int NB = 64, K = 2560, R = 10240, parts = 2, iters = 300;
  __half* x; uint8_t* w; int32_t *seg, *xs, *ss, *dummy_i; float *bias, *res, *y;
  cudaMalloc(&x, NB * K * 2); cudaMalloc(&w, (size_t)R * (K / 256) * 144); cudaMalloc(&seg, 48);
  cudaMalloc(&xs, 8); cudaMalloc(&ss, 8); cudaMalloc(&dummy_i, 64); cudaMalloc(&bias, 64); cudaMalloc(&res, 64);
  cudaMalloc(&y, (size_t)parts * NB * R * 4);
  cudaMemset(x, 0x3c, NB * K * 2); cudaMemset(w, 0x11, (size_t)R * (K / 256) * 144); cudaMemset(dummy_i, 0, 64);
  int h_seg[12] = {0, K, 0, 0, 0, 11, R, K, parts, 0, 0, 0}, h_xs[2] = {NB, K}, h_ss[2] = {2, 6};
  cudaMemcpy(seg, h_seg, 48, cudaMemcpyHostToDevice); cudaMemcpy(xs, h_xs, 8, cudaMemcpyHostToDevice);
  cudaMemcpy(ss, h_ss, 8, cudaMemcpyHostToDevice);
  dim3 grid(R / 64 * parts), block(256);
  for (int i = 0; i < 10; ++i) kernel<<<grid, block>>>(x, seg, bias, res, w, xs, ss, dummy_i, dummy_i, dummy_i, y);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  cudaEventRecord(a);
  for (int i = 0; i < iters; ++i) kernel<<<grid, block>>>(x, seg, bias, res, w, xs, ss, dummy_i, dummy_i, dummy_i, y);
  cudaEventRecord(b); cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b);
  float h_y[4]; cudaMemcpy(h_y, y, 16, cudaMemcpyDeviceToHost);
  printf("%s: %.2f us a launch, y[0] %g (%s)\n", KERNEL_TU, 1000.0f * ms / iters, h_y[0], cudaGetErrorString(cudaGetLastError()));
  return 0;
}

// Times the split LayerNorm prologue (layernorm_lerp, K 2560, M 6) of B rows (argv[1], default 64) as NVRTC
// builds it, standalone: scripts/standalone/run.sh.
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cuda_runtime.h>
#include KERNEL_TU
int main(int argc, char** argv) {
  const int B = argc > 1 ? atoi(argv[1]) : 64, K = 2560, M = 6, iters = 400;
  float *x, *prev, *lnw, *lnb, *mix, *eps, *xn; __half* xin; int* shp;
  cudaMalloc(&x, B * K * 4); cudaMalloc(&prev, B * K * 4); cudaMalloc(&lnw, K * 4); cudaMalloc(&lnb, K * 4);
  cudaMalloc(&mix, M * K * 4); cudaMalloc(&eps, 4); cudaMalloc(&xn, B * K * 4); cudaMalloc(&xin, B * (M + 1) * K * 2);
  cudaMalloc(&shp, 64);
  cudaMemset(x, 0x3f, B * K * 4); cudaMemset(prev, 0x3e, B * K * 4); cudaMemset(lnw, 0x3f, K * 4);
  cudaMemset(lnb, 0, K * 4); cudaMemset(mix, 0x3e, M * K * 4); cudaMemset(eps, 0x30, 4); cudaMemset(shp, 0, 64);
  dim3 grid(B * 10), block(256);
  for (int i = 0; i < 20; ++i) kernel<<<grid, block>>>(x, prev, lnw, lnb, mix, eps, shp, shp, shp, shp, shp, shp, xn, xin);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  cudaEventRecord(a);
  for (int i = 0; i < iters; ++i) kernel<<<grid, block>>>(x, prev, lnw, lnb, mix, eps, shp, shp, shp, shp, shp, shp, xn, xin);
  cudaEventRecord(b); cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b);
  printf("B=%d: %.2f us a launch (%s)\n", B, 1000.0f * ms / iters, cudaGetErrorString(cudaGetLastError()));
  return 0;
}

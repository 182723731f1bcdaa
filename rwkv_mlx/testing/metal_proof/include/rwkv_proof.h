// What the proof adds to each kernel text besides <metal_stdlib> (metal_proof/compile.py):
// RWKV_THREADGROUP_BYTES(n), inserted after the kernel's last threadgroup declaration with n =
// the sum of their sizeof, so the compiler itself measures the group's threadgroup memory.
#pragma once

#define RWKV_APPLE_THREADGROUP_BYTES 32768  // Apple GPUs: 32 KB of threadgroup memory per group

#ifdef RWKV_METAL_EMULATE
#define RWKV_THREADGROUP_BYTES(n) (rwkv_emu::threadgroup_bytes = (n))
#else
template <unsigned long N>
struct rwkv_threadgroup_bytes {
  static_assert(N <= RWKV_APPLE_THREADGROUP_BYTES, "threadgroup memory over Apple's 32 KB per group");
  static constexpr unsigned long value = N;
};
#define RWKV_THREADGROUP_BYTES(n) ((void)rwkv_threadgroup_bytes<(n)>::value)
#endif

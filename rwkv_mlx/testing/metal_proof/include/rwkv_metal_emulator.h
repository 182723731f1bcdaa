// A CPU runtime for Metal compute kernels (RWKV_METAL_EMULATE builds of include/metal_stdlib).
//
// Every thread of a threadgroup is its own execution context, so a kernel's local variables and
// control flow are per thread as on a GPU. Two ways to run them:
//  * fibers (the default): own stack and registers, run one at a time, switching only where
//    Metal threads synchronize (below); deterministic, and a barrier that some thread never
//    reaches is reported (a deadlock on a GPU), not hung on;
//  * OS threads (os_threads): one pthread per Metal thread of the group, running at once,
//    barriers as pthread barriers (per group, per SIMD group); the threads are reused for every
//    group of the launch. Slow on a few cores; used to cross-check the fibers.
// Synchronization:
//   threadgroup_barrier   waits until every thread of the group arrived;
//   simd_* operations     each lane publishes its value in a per-thread slot, waits for the 32
//                         lanes of its SIMD group, reads, and waits again before the slot is reused.
// Groups run one after another; `threadgroup` arrays are static storage of the kernel function
// (the proof rewrites them so), i.e. shared by the threads of the running group.
// No libc header is included (a -ffreestanding build): the few pthread functions are declared
// here with glibc's x86-64 sizes and resolve against the Python process's libc when loaded.
#pragma once

#if !defined(__x86_64__)
#error "the Metal emulator's context switch is written for x86-64"
#endif

extern "C" {
struct alignas(8) rwkv_pthread_barrier { char bytes[32]; };  // pthread_barrier_t
struct alignas(8) rwkv_pthread_attr { char bytes[56]; };     // pthread_attr_t
int pthread_create(unsigned long* thread, const rwkv_pthread_attr* attr, void* (*start)(void*), void* arg);
int pthread_join(unsigned long thread, void** result);
int pthread_attr_init(rwkv_pthread_attr* attr);
int pthread_attr_setstacksize(rwkv_pthread_attr* attr, unsigned long size);
int pthread_attr_destroy(rwkv_pthread_attr* attr);
int pthread_barrier_init(rwkv_pthread_barrier* barrier, const void* attr, unsigned count);
int pthread_barrier_wait(rwkv_pthread_barrier* barrier);
int pthread_barrier_destroy(rwkv_pthread_barrier* barrier);
}

namespace rwkv_emu {

enum : int { RUNNABLE = 0, AT_GROUP = 1, AT_SIMD = 2, DONE = 3 };
constexpr int MAX_THREADS = 1024;
constexpr int SIMD = 32;

struct Lane {
  void* sp;
  int state;
};

inline Lane lanes[MAX_THREADS];
inline unsigned long long slots[MAX_THREADS];
inline int n_lanes = 0, group_arrived = 0;
inline thread_local int current = 0;  // the Metal thread (lane of the group) running now
inline int simd_arrived[MAX_THREADS / SIMD];
inline void* scheduler_sp = nullptr;
inline void (*lane_body)(int) = nullptr;
inline void (*set_group)(unsigned long) = nullptr;
inline unsigned long threadgroup_bytes = 0;
inline bool os_threads = false;
inline rwkv_pthread_barrier group_bar, simd_bar[MAX_THREADS / SIMD];
inline unsigned long n_groups = 0;

extern "C" void rwkv_emu_switch(void** save_sp, void* load_sp);
extern "C" void rwkv_emu_start();

inline void yield() { rwkv_emu_switch(&lanes[current].sp, scheduler_sp); }

inline void group_barrier() {
  if (os_threads) {
    pthread_barrier_wait(&group_bar);
    return;
  }
  if (++group_arrived == n_lanes) {
    group_arrived = 0;
    for (int i = 0; i < n_lanes; ++i)
      if (lanes[i].state == AT_GROUP) lanes[i].state = RUNNABLE;
    return;
  }
  lanes[current].state = AT_GROUP;
  yield();
}

inline void simd_barrier() {
  const int s = current / SIMD;
  if (os_threads) {
    pthread_barrier_wait(&simd_bar[s]);
    return;
  }
  if (++simd_arrived[s] == SIMD) {
    simd_arrived[s] = 0;
    for (int i = s * SIMD; i < (s + 1) * SIMD; ++i)
      if (lanes[i].state == AT_SIMD) lanes[i].state = RUNNABLE;
    return;
  }
  lanes[current].state = AT_SIMD;
  yield();
}

template <typename T>
inline unsigned long long bits(T x) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "simd value too wide");
  unsigned long long u = 0;
  __builtin_memcpy(&u, &x, sizeof(T));
  return u;
}

template <typename T>
inline T unbits(unsigned long long u) {
  T x;
  __builtin_memcpy(&x, &u, sizeof(T));
  return x;
}

// Publish x, wait for the SIMD group, combine (lane order 0..31), wait again.
template <typename T, typename F>
inline T simd_all(T x, F combine) {
  const int base = current & ~(SIMD - 1);
  slots[current] = bits(x);
  simd_barrier();
  T r = unbits<T>(slots[base]);
  for (int l = 1; l < SIMD; ++l) r = combine(r, unbits<T>(slots[base + l]));
  simd_barrier();
  return r;
}

template <typename T>
inline T simd_from(T x, int lane) {
  const int base = current & ~(SIMD - 1);
  slots[current] = bits(x);
  simd_barrier();
  T r = unbits<T>(slots[base + (lane & (SIMD - 1))]);
  simd_barrier();
  return r;
}

inline int lane_id() { return current & (SIMD - 1); }

// Run the threads of one group to completion; -1 when some barrier is never completed.
inline int run_group(char* stacks, unsigned long stack_bytes) {
  for (int l = 0; l < n_lanes; ++l) {
    void** top = reinterpret_cast<void**>(stacks + (unsigned long)(l + 1) * stack_bytes) - 2;
    top[0] = reinterpret_cast<void*>(&rwkv_emu_start);  // 16-byte aligned: entered as if called
    top[1] = nullptr;
    top -= 6;  // rbp rbx r12-r15, popped by the first switch
    for (int r = 0; r < 6; ++r) top[r] = nullptr;
    lanes[l].sp = top;
    lanes[l].state = RUNNABLE;
  }
  group_arrived = 0;
  for (int s = 0; s < MAX_THREADS / SIMD; ++s) simd_arrived[s] = 0;
  int done = 0;
  while (done < n_lanes) {
    bool progressed = false;
    for (int l = 0; l < n_lanes; ++l) {
      if (lanes[l].state != RUNNABLE) continue;
      current = l;
      rwkv_emu_switch(&scheduler_sp, lanes[l].sp);
      progressed = true;
      if (lanes[l].state == DONE) ++done;
    }
    if (!progressed) return -1;
  }
  return 0;
}

inline int run_fibers(unsigned long groups, char* stacks, unsigned long stack_bytes) {
  os_threads = false;
  for (unsigned long g = 0; g < groups; ++g) {
    set_group(g);  // fibers share the scheduler's thread, so its thread_local
    if (run_group(stacks, stack_bytes) != 0) return -1;
  }
  return 0;
}

inline void* thread_main(void* lane) {
  current = (int)(long)lane;
  for (unsigned long g = 0; g < n_groups; ++g) {
    set_group(g);
    lane_body(current);
    pthread_barrier_wait(&group_bar);  // the group is done before the next reuses threadgroup memory
  }
  return nullptr;
}

inline int run_threads(unsigned long groups) {
  os_threads = true;
  n_groups = groups;
  pthread_barrier_init(&group_bar, nullptr, (unsigned)n_lanes);
  for (int s = 0; s < n_lanes / SIMD; ++s) pthread_barrier_init(&simd_bar[s], nullptr, SIMD);
  rwkv_pthread_attr attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 256 * 1024);
  unsigned long threads[MAX_THREADS];
  int started = 0, rc = 0;
  for (; started < n_lanes; ++started)
    if (pthread_create(&threads[started], &attr, thread_main, (void*)(long)started) != 0) break;
  if (started < n_lanes) rc = -2;  // threads that started wait at a barrier forever: a fatal setup failure
  for (int l = 0; l < started && rc == 0; ++l) pthread_join(threads[l], nullptr);
  pthread_attr_destroy(&attr);
  if (rc == 0) {
    pthread_barrier_destroy(&group_bar);
    for (int s = 0; s < n_lanes / SIMD; ++s) pthread_barrier_destroy(&simd_bar[s]);
  }
  os_threads = false;
  return rc;
}

// A fiber's first frame: run the thread, then hand back to the scheduler for good.
extern "C" void rwkv_emu_start() {
  lane_body(current);
  lanes[current].state = DONE;
  void* unused;
  rwkv_emu_switch(&unused, scheduler_sp);
  __builtin_unreachable();
}

}  // namespace rwkv_emu

// save callee-saved registers and the stack pointer in *save_sp (rdi), resume load_sp (rsi)
asm(R"(
  .text
  .globl rwkv_emu_switch
  .hidden rwkv_emu_switch
  .type rwkv_emu_switch,@function
rwkv_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rwkv_emu_switch, .-rwkv_emu_switch
)");

namespace metal {

inline void threadgroup_barrier(mem_flags) { rwkv_emu::group_barrier(); }
inline void simdgroup_barrier(mem_flags) { rwkv_emu::simd_barrier(); }

template <typename T> inline T simd_sum(T x) { return rwkv_emu::simd_all(x, [](T a, T b) { return a + b; }); }
template <typename T> inline T simd_max(T x) { return rwkv_emu::simd_all(x, [](T a, T b) { return a > b ? a : b; }); }
template <typename T> inline T simd_min(T x) { return rwkv_emu::simd_all(x, [](T a, T b) { return a < b ? a : b; }); }
template <typename T> inline T simd_shuffle(T x, ushort lane) { return rwkv_emu::simd_from(x, lane); }
template <typename T> inline T simd_broadcast(T x, ushort lane) { return rwkv_emu::simd_from(x, lane); }
template <typename T> inline T simd_shuffle_xor(T x, ushort mask) {
  return rwkv_emu::simd_from(x, rwkv_emu::lane_id() ^ mask);
}
template <typename T> inline T simd_shuffle_down(T x, ushort delta) {
  const int src = rwkv_emu::lane_id() + delta;
  const T r = rwkv_emu::simd_from(x, src < rwkv_emu::SIMD ? src : rwkv_emu::lane_id());
  return r;
}
template <typename T> inline T simd_shuffle_up(T x, ushort delta) {
  const int src = rwkv_emu::lane_id() - (int)delta;
  return rwkv_emu::simd_from(x, src >= 0 ? src : rwkv_emu::lane_id());
}

// Simdgroup matrices: every lane holds (and computes) the whole 8 x 8 matrix. Each operation first
// waits for the 32 lanes of the SIMD group: Metal requires all of them to call it together, so a call
// that some lane skips is a barrier never completed (reported), not a wrong answer that passes.
template <typename T, int Cols, int Rows>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(const T value) {
  rwkv_emu::simd_barrier();
  simdgroup_matrix<T, Cols, Rows> m;
  for (int i = 0; i < Cols * Rows; ++i) m.e[i] = value;
  return m;
}

template <typename T, int Cols, int Rows>
inline void simdgroup_load(simdgroup_matrix<T, Cols, Rows>& d, const T* src, ulong elements_per_row = Cols,
                           ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  rwkv_emu::simd_barrier();
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) {
      const ulong row = transpose_matrix ? c : r, col = transpose_matrix ? r : c;
      d.e[r * Cols + c] = src[(matrix_origin.y + row) * elements_per_row + matrix_origin.x + col];
    }
  rwkv_emu::simd_barrier();  // no lane changes the source before every lane has read it
}

template <typename T, int Cols, int Rows>
inline void simdgroup_store(const simdgroup_matrix<T, Cols, Rows>& a, T* dst, ulong elements_per_row = Cols,
                            ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  rwkv_emu::simd_barrier();
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < Cols; ++c) {
      const ulong row = transpose_matrix ? c : r, col = transpose_matrix ? r : c;
      dst[(matrix_origin.y + row) * elements_per_row + matrix_origin.x + col] = a.e[r * Cols + c];
    }
}

template <typename TD, typename TA, typename TB, typename TC>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                          const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c) {
  rwkv_emu::simd_barrier();
  simdgroup_matrix<TD, 8, 8> out;
  for (int r = 0; r < 8; ++r)
    for (int col = 0; col < 8; ++col) {
      float acc = static_cast<float>(c.e[r * 8 + col]);
      for (int k = 0; k < 8; ++k) acc += static_cast<float>(a.e[r * 8 + k]) * static_cast<float>(b.e[k * 8 + col]);
      out.e[r * 8 + col] = static_cast<TD>(acc);
    }
  d = out;
}

}  // namespace metal

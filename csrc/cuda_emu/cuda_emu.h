// The CUDA execution model on the CPU, so that the CUDA kernels (csrc/cuda/*.cu) can be compiled
// by the host compiler and run, unchanged, on machines without a GPU (this project's CI).
//
// cuda_emu/module.cpp builds gated_ops._cuda_emu (gated_ops/cuda_emu.py) from every CUDA source,
// #included into one translation unit with GATED_OPS_CUDA_EMU defined; cuda/common.cuh then
// includes this header in place of the CUDA headers, and the launchers live in the namespace
// gated_ops::cuda_emu (gated_ops::cuda in _C) and register for CPU tensors as
// torch.ops.gated_ops_cudaemu.*. What is emulated, and how:
//   * a launch runs the grid's blocks one after another; the threads of a block are fibers
//     (ucontext) on the calling thread, each with its own stack, run in thread order until each
//     reaches a barrier, so code between two barriers runs thread after thread;
//   * __syncthreads() waits for every thread of the block that has not exited (as on sm_70+);
//   * __shfl_xor_sync() with a full mask is a warp barrier: each lane posts its value, waits for
//     the 32 lanes, reads its partner's value (two slots alternate, so one barrier suffices);
//   * __shared__ variables are function statics (thread_local): one copy per block, as blocks
//     run one at a time;
//   * CUDA_KERNEL_ASSERT failing in any thread stops the launch and raises a RuntimeError naming
//     the condition, the block and the thread (a GPU would fail the next CUDA call instead);
//   * GATED_OPS_CUDA_EMU_ORDER=reverse (read at each launch) runs the blocks, and the threads
//     between two barriers, in reverse order: a kernel free of races gives the same bits either
//     way, while one that reads what another thread writes without a barrier in between reads
//     it in one order only (tests/test_cuda_emu.py compares the two).
// What a GPU would do wrongly but this emulation refuses loudly: a full-mask shuffle in a warp
// with exited lanes, and a deadlock (threads waiting at different barriers, or a barrier that
// some threads never reach); both raise with the block and the barrier counts.
// What it cannot tell: speed, memory coalescing, races that neither thread order shows (every
// thread runs to its next barrier before the next one starts; and __shared__ values persist
// from the previous block or launch, where a GPU's are undefined), warp divergence, register
// pressure, and float results to the bit (the host's exp/log and FMA contraction differ from the
// device's). Tests compare it with the float64 reference under the same tolerance rule as the
// GPU (gated_ops.testing).
//
// The rules a change to the CUDA sources keeps, so that they still compile and run here:
//   * CUDA names only from the list at the end of this file: __global__, __device__,
//     __host__, __forceinline__, __launch_bounds__ (ignored), __shared__ (static sizes only),
//     __align__, threadIdx / blockIdx / blockDim / gridDim, __syncthreads(),
//     __shfl_xor_sync(0xffffffff, v, lane_mask) (a full mask; values of at most 16 bytes),
//     CUDA_KERNEL_ASSERT, C10_CUDA_KERNEL_LAUNCH_CHECK(), c10::cuda::CUDAGuard, and ::exp /
//     ::log / min / max. Anything else (other shuffles and votes, atomics, __ldg, cooperative
//     groups, dynamic shared memory, streams, CUDA runtime calls) does not compile here: add it
//     to this header first, or keep it behind #ifdef GATED_OPS_CUDA_EMU with the host's
//     equivalent (inline PTX, as prefetch_l2 in cuda/common.cuh does: a hint, nothing to do);
//   * every launch is GATED_LAUNCH(kernel, grid, block)(args...), never <<<...>>>: 1 to 1024
//     threads a block, grid.y and grid.z below 65536, no launch from inside a kernel (refused);
//   * CUDA headers come only through cuda/common.cuh (it picks this header instead); launchers
//     reach the device through ATen (tensors, cuBLAS GEMMs as at::bmm), which runs on the CPU
//     here; the plan's device is GATED_KERNEL_DEVICE, registrations GATED_OPS_CUDA_LIBRARY_IMPL;
//   * the CUDA sources are one translation unit here (nvcc compiles each on its own): the names
//     a .cu file keeps to itself (its anonymous namespace) differ from every other .cu file's,
//     and a new .cu file gets its #include in cuda_emu/module.cpp (without one, the
//     registrations in cuda/registration.cu fail to link).
#pragma once

#include <math.h>  // float overloads of ::exp / ::log in the global namespace, as CUDA has
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <ATen/record_function.h>
#include <c10/core/Device.h>
#include <cstdlib>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace gated_ops_emu {

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
// Per-thread stack. The kernels' frames are a few KB (register arrays of up to 32 accumulators);
// an exception raised in a thread (a failed assert) unwinds on this stack too.
constexpr size_t kStackBytes = size_t(128) << 10;

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int warp = 0, lane = 0;
  bool done = false;
  int wait = 0;           // 0: runnable; kAtBlockBarrier / kAtWarpBarrier
  uint64_t shuffles = 0;  // this lane's shuffle count (selects the slot)
};
constexpr int kAtBlockBarrier = 1, kAtWarpBarrier = 2;

struct Warp {
  int size = 0, live = 0, arrived = 0;
  alignas(16) unsigned char slot[2][kWarpSize][16];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0, arrived = 0;
  std::string error;  // the first failure, with the thread that raised it
};

struct State {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  Block* block = nullptr;
  Fiber* self = nullptr;
  ucontext_t scheduler;
  char* stacks = nullptr;  // kMaxThreads stacks, each above a guard page, mapped once
  void (*invoke)(const void*) = nullptr;
  const void* body = nullptr;
  bool in_launch = false;
};

inline State& state() {
  static thread_local State s;
  return s;
}

inline std::string where(const State& s) {
  return "block (" + std::to_string(s.block_idx.x) + "," + std::to_string(s.block_idx.y) + "," +
         std::to_string(s.block_idx.z) + "), thread (" + std::to_string(s.thread_idx.x) + "," +
         std::to_string(s.thread_idx.y) + "," + std::to_string(s.thread_idx.z) + ")";
}

[[noreturn]] inline void device_error(const std::string& what) { throw std::runtime_error(what); }

[[noreturn]] inline void device_assert_failed(const char* cond, const char* file, int line) {
  device_error(std::string("device-side assertion `") + cond + "` failed (" + file + ":" +
               std::to_string(line) + ")");
}

inline void yield() {
  State& s = state();
  swapcontext(&s.self->ctx, &s.scheduler);
}

inline void release(Block& b, int kind, int warp) {
  for (Fiber& f : b.fibers) {
    if (!f.done && f.wait == kind && (kind == kAtBlockBarrier || f.warp == warp)) f.wait = 0;
  }
}

inline void syncthreads() {
  State& s = state();
  Block& b = *s.block;
  if (++b.arrived == b.live) {  // the last one to arrive releases the others and goes on
    b.arrived = 0;
    release(b, kAtBlockBarrier, -1);
    return;
  }
  s.self->wait = kAtBlockBarrier;
  yield();
}

template <typename T>
T shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shuffled type");
  State& s = state();
  Block& b = *s.block;
  Fiber& f = *s.self;
  Warp& w = b.warps[f.warp];
  if (mask != 0xffffffffu) device_error("__shfl_xor_sync: only the full mask is emulated");
  if (w.size != kWarpSize || w.live != kWarpSize) {
    device_error("__shfl_xor_sync(0xffffffff) in a warp of " + std::to_string(w.live) + " of " +
                 std::to_string(kWarpSize) + " live lanes (undefined on a GPU)");
  }
  const int slot = static_cast<int>(f.shuffles++ & 1);
  std::memcpy(w.slot[slot][f.lane], &v, sizeof(T));
  if (++w.arrived == w.live) {
    w.arrived = 0;
    release(b, kAtWarpBarrier, f.warp);
  } else {
    f.wait = kAtWarpBarrier;
    yield();
  }
  T out;
  std::memcpy(&out, w.slot[slot][(f.lane ^ lane_mask) & (kWarpSize - 1)], sizeof(T));
  return out;
}

// A thread's body ends here (returned or raised): it no longer counts at the barriers.
inline void thread_exit(State& s) {
  Block& b = *s.block;
  Fiber& f = *s.self;
  Warp& w = b.warps[f.warp];
  f.done = true;
  f.wait = 0;
  --b.live;
  --w.live;
  if (w.arrived > 0 && b.error.empty()) {
    b.error = "a lane exited while its warp waits at a full-mask shuffle (undefined on a GPU), " +
              where(s);
  }
  if (b.arrived > 0 && b.arrived == b.live) {
    b.arrived = 0;
    release(b, kAtBlockBarrier, -1);
  }
}

inline void fiber_main() {
  State& s = state();
  try {
    s.invoke(s.body);
  } catch (const std::exception& e) {
    if (s.block->error.empty()) s.block->error = std::string(e.what()) + ", " + where(s);
  }
  thread_exit(s);
  // returning resumes uc_link: the scheduler
}

inline char* stack_of(State& s, int i) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t each = kStackBytes + page;
  if (!s.stacks) {
    void* p = mmap(nullptr, each * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "CUDA emulation: could not map the thread stacks");
    s.stacks = static_cast<char*>(p);
    for (int t = 0; t < kMaxThreads; ++t) {  // a guard page below each stack: overflow faults
      mprotect(s.stacks + t * each, page, PROT_NONE);
    }
  }
  return s.stacks + i * each + page;
}

template <typename F>
void run_grid(dim3 grid, dim3 block, const F& body) {
  State& s = state();
  TORCH_CHECK(!s.in_launch, "CUDA emulation: a kernel launched from inside a kernel");
  const int64_t nthreads = int64_t(block.x) * block.y * block.z;
  TORCH_CHECK(nthreads >= 1 && nthreads <= kMaxThreads, "CUDA emulation: invalid block size ",
              nthreads, " (CUDA: 1 to 1024 threads)");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y < 65536 && grid.z < 65536,
              "CUDA emulation: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  const char* order = std::getenv("GATED_OPS_CUDA_EMU_ORDER");
  const bool reverse = order != nullptr && std::string(order) == "reverse";
  s.in_launch = true;
  s.block_dim = block;
  s.grid_dim = grid;
  s.invoke = [](const void* f) { (*static_cast<const F*>(f))(); };
  s.body = &body;
  Block b;
  b.fibers.resize(nthreads);
  b.warps.resize((nthreads + kWarpSize - 1) / kWarpSize);
  std::string error;
  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  for (int64_t i = 0; i < nblocks && error.empty(); ++i) {
    const int64_t bi = reverse ? nblocks - 1 - i : i;
    const unsigned bx = unsigned(bi % grid.x), by = unsigned((bi / grid.x) % grid.y),
                   bz = unsigned(bi / (int64_t(grid.x) * grid.y));
    s.block_idx = dim3(bx, by, bz);
    b.live = static_cast<int>(nthreads);
    b.arrived = 0;
    for (Warp& w : b.warps) w.size = w.live = w.arrived = 0;
    for (int64_t t = 0; t < nthreads; ++t) {
      Fiber& f = b.fibers[t];
      f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (int64_t(block.x) * block.y));
      f.warp = static_cast<int>(t / kWarpSize);
      f.lane = static_cast<int>(t % kWarpSize);
      f.done = false;
      f.wait = 0;
      f.shuffles = 0;
      ++b.warps[f.warp].size;
      ++b.warps[f.warp].live;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stack_of(s, static_cast<int>(t));
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = &s.scheduler;
      makecontext(&f.ctx, &fiber_main, 0);
    }
    s.block = &b;
    for (;;) {
      bool progressed = false, all_done = true;
      for (int64_t k = 0; k < nthreads; ++k) {
        Fiber& f = b.fibers[reverse ? nthreads - 1 - k : k];
        if (f.done) continue;
        all_done = false;
        if (f.wait) continue;
        s.self = &f;
        s.thread_idx = f.tid;
        swapcontext(&s.scheduler, &f.ctx);
        progressed = true;
        if (!b.error.empty()) break;
      }
      if (!b.error.empty()) {
        error = b.error;  // the block is abandoned (its frames hold no resources)
        break;
      }
      if (all_done) break;
      if (!progressed) {
        int at_block = 0, at_warp = 0;
        for (const Fiber& f : b.fibers) {
          at_block += !f.done && f.wait == kAtBlockBarrier;
          at_warp += !f.done && f.wait == kAtWarpBarrier;
        }
        error = "deadlock in block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                std::to_string(bz) + "): " + std::to_string(at_block) +
                " threads at __syncthreads, " + std::to_string(at_warp) +
                " at a shuffle, of " + std::to_string(b.live) +
                " live (a barrier not reached by every thread)";
        break;
      }
    }
  }
  s.block = nullptr;
  s.self = nullptr;
  s.in_launch = false;
  TORCH_CHECK(error.empty(), "CUDA emulation: ", error);
}

// kernel<<<grid, block>>>(args...) as launch(kernel, grid, block)(args...): the arguments are
// converted to the kernel's parameter types once, and every thread calls the kernel with them
// (by-value parameters: each thread gets its own copy, as on a GPU).
// Each launch is also a torch.profiler event, "cuda_emu_kernel: <the kernel expression> in
// <the launching function> (<the launch's file>:<line>)", so a profile of an emulated step lists
// the kernels a GPU would run, in order (gated_ops.testing.kernel_census).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  std::string name;
  dim3 grid, block;
  template <typename... A>
  void operator()(A&&... args) const {
    RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{});
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const auto body = [&] { std::apply(kernel, params); };
    run_grid(grid, block, body);
  }
};

// The launching function's name from the compiler's __PRETTY_FUNCTION__ at the launch (inside
// a lambda it still begins with the enclosing function): the identifier before the first '('.
inline std::string launcher_name(const char* pretty) {
  std::string f(pretty);
  f = f.substr(0, f.find('('));
  const size_t colons = f.rfind("::");
  f = colons == std::string::npos ? f : f.substr(colons + 2);
  const size_t space = f.rfind(' ');
  return space == std::string::npos ? f : f.substr(space + 1);
}

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), const char* expr, const char* pretty, const char* file,
                    int line, dim3 grid, dim3 block) {
  std::string f(file);
  f = f.substr(f.find_last_of('/') + 1);  // the file's name (npos + 1 = 0: all of it)
  return Launch<P...>{kernel,
                      std::string("cuda_emu_kernel: ") + expr + " in " + launcher_name(pretty) +
                          " (" + f + ":" + std::to_string(line) + ")",
                      grid, block};
}

}  // namespace gated_ops_emu

// ---------------------------------------------------------------------------------------------
// The CUDA names the CUDA sources may use (the rules above).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define threadIdx (::gated_ops_emu::state().thread_idx)
#define blockIdx (::gated_ops_emu::state().block_idx)
#define blockDim (::gated_ops_emu::state().block_dim)
#define gridDim (::gated_ops_emu::state().grid_dim)
#define __syncthreads() ::gated_ops_emu::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask) ::gated_ops_emu::shfl_xor_sync(mask, v, lane_mask)
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                   \
  do {                                                                             \
    if (!(cond)) ::gated_ops_emu::device_assert_failed(#cond, __FILE__, __LINE__); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define GATED_LAUNCH(kernel, grid, block)                                                 \
  ::gated_ops_emu::launch(kernel, #kernel, __PRETTY_FUNCTION__, __FILE__, __LINE__, (grid), \
                          (block))
// Launchers register for CPU tensors under their own namespace (module.cpp defines its schemas).
#define GATED_OPS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(gated_ops_cudaemu, CPU, m)

#define GATED_KERNEL_DEVICE at::kCPU

using std::max;
using std::min;

namespace c10 {
namespace cuda {
struct CUDAGuard {  // one "device": nothing to switch
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10

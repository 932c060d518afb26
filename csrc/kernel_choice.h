// Where more than one kernel computes an op, the code picks one by itself, from what it knows:
// the CPU's features (detected once), the device, the dtype and the plan. Tests and benchmarks
// may force a choice, to run both sides of a pair on one machine (tests/test_cpu_skinny.py and
// tests/test_lookahead.py demand their bits be equal) or to A/B them, through one private op,
// gated_ops::_force_kernel(name, value) (gated_ops.testing.force_kernel); value -1 gives the
// choice back to the code. The library reads no environment variable to choose a kernel.
//
//   name             values                               the automatic choice
//   cpu_lanes        8, 16: the skinny kernels' vector     8 on AVX2 CPUs without AVX-512, else
//                    width (8 only where AVX2 runs)        16 (cpu/simd.h skinny_lanes)
//   cpu_skinny       0: BLAS, 1: our skinny kernels for    ours, except float32 on CPUs without
//                    blocked plans                         AVX2 (cpu/common.h use_skinny_blocked)
//   cpu_widen_gemm   0: 16-bit GEMMs, 1: float32 GEMMs on  widened on CPUs without AVX-512
//                    widened copies                        (cpu/common.h widen_gemm)
//   cpu_lookahead    0: rows in groups, 1: one pass (the   one pass for bfloat16 weights on
//                    16-lane fused lookahead)              AVX-512 CPUs (cpu/simd.h)
//   cuda_prefetch    0, 1: L2 prefetch in the skinny       off (cuda/common.cuh prefetch_l2)
//                    forward and the fused SGD
//   cuda_ce          0: a thread per row, 1: a thread per  a thread per row where the batch fits
//                    path (the few-class CE forward)       (cuda/cross_entropy.cu)
//   cuda_routed_gemm 0: our tiled grouped GEMM, 1: torch's  torch's for bfloat16 on sm90 / sm100
//                    at::_grouped_mm (where dtype and      (cuda/routed.cu use_grouped_mm)
//                    shapes allow it)
//
// The choices are process-wide (a library's: the CUDA kernels' CPU emulation keeps its own) and
// read when a kernel is launched: a captured CUDA graph keeps the kernels it recorded.
#pragma once

#include <cstdint>
#include <string>

namespace gated_ops {

enum class KernelChoice : int {
  kCpuLanes,
  kCpuSkinny,
  kCpuWidenGemm,
  kCpuLookahead,
  kCudaPrefetch,
  kCudaCe,
  kCudaRoutedGemm,
  kCount
};

constexpr int64_t kAutomatic = -1;

// The forced value of a choice, or kAutomatic.
int64_t forced_kernel(KernelChoice choice);

// The hook (the op gated_ops::_force_kernel): forces `name` to `value` (kAutomatic: the code's
// choice again) and returns the previous setting. Refuses an unknown name or value.
int64_t force_kernel(const std::string& name, int64_t value);

}  // namespace gated_ops

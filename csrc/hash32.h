// The integer hash of stochastic rounding, in one place for the CPU kernels (cpu/simd.h, on
// uint32_t and on vectors of them, lane by lane) and the CUDA kernels (rounding.h, host and
// device). "lowbias32", from C. Wellons' integer hash prospector; gated_ops/reference.py and
// gated_ops/triton/ compute the same bits.
#pragma once

#include <c10/macros/Macros.h>

namespace gated_ops {

// (U: uint32_t, or a GCC vector of them.) Always inlined: the CPU kernels call it inside their
// per-ISA clones, where it must compile for the clone's vector width.
template <typename U>
C10_HOST_DEVICE C10_ALWAYS_INLINE U hash32(U x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

}  // namespace gated_ops

// How the fused SGD stores an updated parameter: rounded to nearest, or (bfloat16 parameters)
// stochastically, with random bits that are a hash of (seed, element index). Shared by the CPU
// kernels (cpu/sgd.cpp, cpu/simd.h) and the CUDA kernels (cuda/common.cuh round_param).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include "hash32.h"

namespace gated_ops {

// Stochastic rounding of a bfloat16 parameter's update (rounding_seed >= 0): the random bits of
// element i are hash32(uint32(i) + mix) mod 2^16, mix = seed_mix(seed), added below the kept
// mantissa before truncation (cpu/simd.h bf16_stochastic, the CUDA kernels' round_param,
// gated_ops/triton/ and reference.round_stochastic_bf16 compute the same bits). "lowbias32", from
// C. Wellons' integer hash prospector (hash32.h).
C10_HOST_DEVICE inline uint32_t seed_mix(int64_t seed) {
  return hash32(uint32_t(seed) ^ 0x5bd1e995u);
}
// The seed of step `step` of a stream of seeds (the ops' rounding_step): (step * 0x9E3779B1 +
// seed) mod 2^31, as reference.rounding_seed_at computes it. (Modulo 2^31, only the low 32 bits
// of step and seed matter.)
C10_HOST_DEVICE inline uint32_t seed_at(int64_t seed, int64_t step) {
  return (uint32_t(step) * 0x9E3779B1u + uint32_t(seed)) & 0x7FFFFFFFu;
}

// How an updated parameter is stored: rounded to nearest, or (bfloat16 parameters,
// rounding_seed >= 0) stochastically with the random bits of (seed, element index). With a
// rounding_step tensor, the seed is seed_at(seed, step), the step read where the kernel runs
// (`step` points to it: device memory for the CUDA kernels), so that a captured CUDA graph
// draws new bits at every replay as the caller's counter advances.
struct Rounding {
  bool stochastic = false;
  uint32_t mix = 0;               // seed_mix(seed) when step is null
  const int64_t* step = nullptr;  // else the mix is seed_mix(seed_at(seed, *step))
  int64_t seed = 0;
  // The rounding with the step read: mix set, step null.
  C10_HOST_DEVICE Rounding resolved() const {
    Rounding r = *this;
    if (stochastic && step != nullptr) {
      r.mix = seed_mix(seed_at(seed, *step));
      r.step = nullptr;
    }
    return r;
  }
};
// The rounding of a step with this seed (and step tensor); what: "weights" or "biases", for the
// error. The step stays a pointer to read where the kernel runs: on the CPU, the caller
// resolves it at once.
inline Rounding rounding_for(int64_t rounding_seed, const c10::optional<at::Tensor>& step,
                             const at::Tensor& param, const char* what) {
  TORCH_CHECK(rounding_seed < 0 || param.scalar_type() == at::kBFloat16,
              "rounding_seed: stochastic rounding (rounding_seed >= 0) is for bfloat16 ", what,
              ", got ", param.scalar_type(), " (pass -1: round to nearest)");
  if (step) {
    TORCH_CHECK(step->scalar_type() == at::kLong && step->numel() == 1,
                "rounding_step: expected an int64 tensor of one element (the step count), got ",
                step->scalar_type(), " of shape ", step->sizes());
    TORCH_CHECK(step->device() == param.device(), "rounding_step: expected a tensor on the ",
                what, "' device, ", param.device(), ", got ", step->device());
  }
  Rounding r{rounding_seed >= 0, seed_mix(rounding_seed)};
  if (r.stochastic && step) {
    r.step = step->const_data_ptr<int64_t>();
    r.seed = rounding_seed;
  }
  return r;
}

}  // namespace gated_ops

// Shared by the CPU kernels (cpu/matmul_forward.cpp, cpu/matmul_backward.cpp, cpu/sgd.cpp,
// cpu/cross_entropy.cpp, cpu/routed.cpp): the plan with its index checks, the GEMM helpers, the parallel loops,
// the kernel choices, and the entry points that gated_ops.cpp registers for the CPU.
//
// The math of every op is gated_ops/reference.py; the plan layout is gated_ops/plan.py.
// CPU strategy: the GEMMs go to ATen (MKL/oneDNN BLAS), batched over the plan's blocks; the
// gather/scatter epilogues and the reductions are at::parallel_for loops in a fixed order, so
// every result is deterministic (no atomics, no order that depends on the thread count).
// float32 and float64, and bfloat16 / float16 storage with float arithmetic: every epilogue,
// reduction and update computes in float (at::opmath_type) and rounds once when it stores;
// ATen's 16-bit GEMMs accumulate in float and round their output (oneDNN uses AMX / AVX-512
// BF16 where the CPU has them). The hand-vectorised kernels of cpu/simd.h take float32 and
// bfloat16 weights; float16 runs the scalar loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>

#include "cpu/simd.h"
#include "gated_ops.h"
#include "kernel_choice.h"

namespace gated_ops {
namespace cpu {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// The plan on the CPU, with the index range checks of every table the CPU kernels read: a
// PathwayPlan is validated once when it is made (gated_ops/plan.py), but the registered ops
// also serve raw callers, and O(T + S + M + P) is negligible next to the GEMMs. The GPU
// kernels trust the plan (reading its tables there would cost a host synchronisation).
inline Plan cpu_plan(const Tensor& paths, const Tensor& csr, at::IntArrayRef layout, int64_t S,
                     int64_t M, const Tensor& ref) {
  const Plan p = make_plan_view(paths, csr, layout, S, M, ref);
  for (int64_t i = 0; i < p.P; ++i) {
    TORCH_CHECK(p.src[i] >= 0 && p.src[i] < S, "paths: source index ", p.src[i], " of pathway ",
                i, " out of range [0, ", S, ") (S = x.size(0))");
    TORCH_CHECK(p.wgt[i] >= 0 && p.wgt[i] < M, "paths: weight index ", p.wgt[i], " of pathway ",
                i, " out of range [0, ", M, ") (M = weight.size(0))");
    TORCH_CHECK(p.dst[i] >= 0 && p.dst[i] < p.T, "paths: destination index ", p.dst[i],
                " of pathway ", i, " out of range [0, ", p.T, ")");
    TORCH_CHECK(p.owner[i] >= 0 && p.owner[i] < p.P, "csr: corrupt plan (owner table); rebuild "
                "it with make_plan");
    TORCH_CHECK(p.dst_perm[i] >= 0 && p.dst_perm[i] < p.P && p.src_perm[i] >= 0 &&
                    p.src_perm[i] < p.P && p.wgt_perm[i] >= 0 && p.wgt_perm[i] < p.P,
                "csr: corrupt plan (a CSR permutation entry out of range); rebuild it with "
                "make_plan");
    TORCH_CHECK(p.zrow[i] >= 0 && p.zrow[i] < (p.blocked() ? p.n * p.ns : p.P) &&
                    p.zcol[i] >= 0 && p.zcol[i] < (p.blocked() ? p.nm : 1),
                "paths: corrupt plan (zrow / zcol of pathway ", i, " out of range); rebuild it "
                "with make_plan");
  }
  // CSR pointers: from 0 to P, non-decreasing (the loops over a row read perm[ptr[r]..ptr[r+1]])
  for (const auto& [ptr, n] : {std::pair<const int64_t*, int64_t>{p.dst_ptr, p.T},
                               {p.src_ptr, S}, {p.wgt_ptr, M}}) {
    bool ok = ptr[0] == 0 && ptr[n] == p.P;
    for (int64_t r = 0; ok && r < n; ++r) ok = ptr[r] <= ptr[r + 1];
    TORCH_CHECK(ok, "csr: corrupt plan (CSR pointers not running from 0 to P); rebuild it with "
                "make_plan");
  }
  // The flags, against the tables (the GPU backends take them on trust).
  bool one = p.T == p.P, zy = p.blocked() && p.nm == 1;
  for (int64_t t = 0; one && t < p.T; ++t) one = p.dst_ptr[t + 1] - p.dst_ptr[t] == 1;
  zy = zy && one;
  for (int64_t q = 0; zy && q < p.P; ++q) zy = p.dst[q] == p.zrow[q];
  TORCH_CHECK(p.one_per_dst() == one && p.z_is_y() == zy, "layout: flags ", p.flags,
              " do not match the pathway table (expected ", (one ? kOnePerDst : 0) |
              (zy ? kZIsY : 0), "); rebuild the plan with make_plan");
  return p;
}

inline void check_cpu_dtype(const Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf, name,
              ": the CPU kernels support float32, float64, bfloat16 and float16, got ", d);
}

#define GATED_CPU_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// The bits of a bfloat16 tensor, for cpu/simd.h's bfloat16 overloads.
inline const uint16_t* bf16_bits(const Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
}

// Grouped layout: the sources of every pathway in by-weight order, (P*B, D_in).
inline Tensor gather_sources(const Plan& p, const Tensor& x) {
  auto order = at::from_blob(const_cast<int64_t*>(p.wgt_perm), {p.P}, at::kLong);
  auto src = at::from_blob(const_cast<int64_t*>(p.src), {p.P}, at::kLong);
  return x.index_select(0, src.index_select(0, order)).view({p.P * x.size(1), x.size(2)});
}

// at::parallel_for for bodies that call ATen ops: the worker threads get this thread's
// thread-local state (above all the dispatch keys that keep a kernel's own ATen calls below
// autograd; without it an at::mm_out on a weight that requires grad fails in a worker).
template <typename F>
void parallel_for_aten(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    fn(b, e);
  });
}

// 16-bit GEMMs (bfloat16 / float16 storage) on CPUs without AVX-512 run in float32 on widened
// copies of their operands and are rounded once, as a 16-bit GEMM with float32 accumulation
// rounds: oneDNN has no fast 16-bit kernel there (a 2-core AMD EPYC with AVX2: plain PyTorch's
// bfloat16 k-path step at H=1024 took 6.8 s against 0.29 s in float32). On AVX-512 CPUs (and
// AMX) the 16-bit GEMMs stay. Decided once from the CPU; cpu_widen_gemm (kernel_choice.h) forces
// either (the tests run both).
inline bool widen_gemm(const Tensor& t) {
  const auto d = t.scalar_type();
  if (d != at::kBFloat16 && d != at::kHalf) return false;
  const int64_t forced = forced_kernel(KernelChoice::kCpuWidenGemm);
  if (forced != kAutomatic) return forced == 1;
#if GATED_HAVE_VECTOR_EXT
  static const bool widen = !simd::wide_vectors();
  return widen;
#else
  return false;
#endif
}
// at::mm / at::bmm (by a's dimension), widened where widen_gemm says.
inline Tensor mm_or_bmm(const Tensor& a, const Tensor& b) {
  return a.dim() == 3 ? at::bmm(a, b) : at::mm(a, b);
}
inline Tensor gemm(const Tensor& a, const Tensor& b) {
  if (widen_gemm(a)) return mm_or_bmm(a.to(at::kFloat), b.to(at::kFloat)).to(a.scalar_type());
  return mm_or_bmm(a, b);
}
// out = a @ b into a (possibly strided) view
inline void gemm_out(Tensor& out, const Tensor& a, const Tensor& b) {
  if (widen_gemm(a)) {
    out.copy_(mm_or_bmm(a.to(at::kFloat), b.to(at::kFloat)));  // (rounded once, here)
  } else if (a.dim() == 3) {
    at::bmm_out(out, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// A parallel_for grain (in items) that gives each task at least ~kGrainFloats floats of work,
// so that small ops stay on one thread and few large items (T = 1 destination of an MoE layer,
// P = 8 experts) still split: loops below run over (item, batch row) pairs for that reason.
constexpr int64_t kGrainFloats = 16384;
inline int64_t grain_for(int64_t floats_per_item) {
  return std::max<int64_t>(1, kGrainFloats / std::max<int64_t>(1, floats_per_item));
}

// Runs fn(m, row0, rows) for every weight m of a grouped plan that has pathways, in parallel.
template <typename F>
void for_each_weight_group(const Plan& p, int64_t B, const F& fn) {
  parallel_for_aten(0, p.M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t cnt = p.wgt_ptr[m + 1] - p.wgt_ptr[m];
      if (cnt > 0) fn(m, p.wgt_ptr[m] * B, cnt * B);
    }
  });
}

// The skinny kernels of cpu/simd.h on blocked plans (the k-path encoders' forward and fused
// update), for float32 where they have a vector width that fits the CPU: 16 lanes on AVX-512,
// 8 on AVX2 (simd::skinny_lanes). Older CPUs take BLAS and a streamed update for float32 (the
// 16-lane AVX2 clone, before the 8-lane kernels, measured slower than BLAS on a 2-core AMD
// EPYC, 2026-12-02). bfloat16 keeps them everywhere (without a native bf16 dot product BLAS is
// far slower still). Decided once from the CPU; cpu_skinny (kernel_choice.h) forces them on or
// off (the tests run both).
inline bool use_skinny_blocked(at::ScalarType dtype) {
#if GATED_HAVE_VECTOR_EXT
  const int64_t forced = forced_kernel(KernelChoice::kCpuSkinny);
  if (forced != kAutomatic) return forced == 1;
  static const bool float32 = simd::wide_vectors() || simd::narrow_vectors_supported();
  return dtype != at::kFloat || float32;
#else
  (void)dtype;
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Shared by several op families.

// Z (z_rows, z_cols): every pathway's pre-gate output x[s_p] @ W[m_p]^T, without bias, in x's
// dtype. x and w contiguous. (cpu/matmul_forward.cpp; the forward, grad_gate and the lookahead.)
Tensor compute_z(const Plan& p, const Tensor& x, const Tensor& w);

// grad_bias[m] = sum_{p: m_p = m} sum_b dZ_p[b], summed in opmath and stored as out_type (dZ's
// dtype, or float for the bias step of 16-bit storage: no rounding, no widened copy of dZ).
// (cpu/matmul_backward.cpp; pathway_grad_bias and the bias step.)
Tensor grad_bias_sums(const Tensor& dz, const Tensor& paths, const Tensor& csr,
                      at::IntArrayRef layout, int64_t num_sources, int64_t num_weights,
                      int64_t d_out, at::ScalarType out_type);

// ---------------------------------------------------------------------------------------------
// The ops' CPU kernels, one file per op family (registered in gated_ops.cpp).

// cpu/matmul_forward.cpp
Tensor pathway_matmul_cpu(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                          const c10::optional<Tensor>& gate, const Tensor& paths,
                          const Tensor& csr, at::IntArrayRef layout);

// cpu/matmul_backward.cpp
Tensor pathway_grad_z_cpu(const Tensor& grad_y, const c10::optional<Tensor>& gate,
                          const Tensor& paths, const Tensor& csr, at::IntArrayRef layout,
                          int64_t num_sources, int64_t num_weights);
Tensor pathway_grad_x_cpu(const Tensor& grad_z, const Tensor& weight, const Tensor& paths,
                          const Tensor& csr, at::IntArrayRef layout, int64_t num_sources,
                          int64_t batch);
Tensor pathway_grad_weight_cpu(const Tensor& grad_z, const Tensor& x, const Tensor& paths,
                               const Tensor& csr, at::IntArrayRef layout, int64_t num_weights,
                               int64_t d_out);
Tensor pathway_grad_bias_cpu(const Tensor& grad_z, const Tensor& paths, const Tensor& csr,
                             at::IntArrayRef layout, int64_t num_sources, int64_t num_weights,
                             int64_t d_out);
Tensor pathway_grad_gate_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                             const c10::optional<Tensor>& bias, const Tensor& gate,
                             const Tensor& paths, const Tensor& csr, at::IntArrayRef layout);
std::tuple<Tensor, Tensor> pathway_grad_x_gate_cpu(const Tensor& grad_y, const Tensor& x,
                                                   const Tensor& weight,
                                                   const c10::optional<Tensor>& bias,
                                                   const Tensor& gate, const Tensor& paths,
                                                   const Tensor& csr, at::IntArrayRef layout);

// cpu/sgd.cpp
void pathway_sgd_cpu(const Tensor& grad_z, const Tensor& x, const Tensor& weight,
                     const c10::optional<Tensor>& momentum_buffer, const Tensor& paths,
                     const Tensor& csr, at::IntArrayRef layout, double lr, double momentum,
                     double weight_decay, bool nesterov, int64_t rounding_seed,
                     const c10::optional<Tensor>& rounding_step,
                     const c10::optional<Tensor>& bias, const c10::optional<Tensor>& bias_buf,
                     int64_t bias_rounding_seed);
Tensor pathway_sgd_lookahead_cpu(const Tensor& grad_z, const Tensor& x, const Tensor& weight,
                                 const c10::optional<Tensor>& momentum_buffer,
                                 const Tensor& paths, const Tensor& csr, at::IntArrayRef layout,
                                 double lr, double momentum, double weight_decay, bool nesterov,
                                 int64_t rounding_seed, const Tensor& x_next,
                                 const c10::optional<Tensor>& rounding_step,
                                 const c10::optional<Tensor>& bias,
                                 const c10::optional<Tensor>& bias_buf,
                                 int64_t bias_rounding_seed);
void pathway_bias_sgd_cpu(const Tensor& grad_z, const Tensor& bias,
                          const c10::optional<Tensor>& momentum_buffer, const Tensor& paths,
                          const Tensor& csr, at::IntArrayRef layout, int64_t num_sources,
                          int64_t num_weights, double lr, double momentum, double weight_decay,
                          bool nesterov, int64_t rounding_seed,
                          const c10::optional<Tensor>& rounding_step);

// cpu/cross_entropy.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor> gated_cross_entropy_cpu(const Tensor& logits,
                                                                   const Tensor& target,
                                                                   const Tensor& gate);
Tensor gated_cross_entropy_backward_cpu(const c10::optional<Tensor>& grad_loss,
                                        const c10::optional<Tensor>& grad_path_loss,
                                        const Tensor& logits, const Tensor& target,
                                        const Tensor& gate, const Tensor& lse);

// cpu/routed.cpp
Tensor pathway_route_cpu(const Tensor& idx, const Tensor& paths, int64_t num_weights);
std::tuple<Tensor, Tensor> routed_matmul_cpu(const Tensor& x, const Tensor& weight,
                                             const c10::optional<Tensor>& bias,
                                             const c10::optional<Tensor>& gate,
                                             const Tensor& idx, const Tensor& route,
                                             const Tensor& paths, int64_t num_dst,
                                             bool grouped_in, bool grouped_out);
Tensor routed_grad_z_cpu(const Tensor& grad_y, const c10::optional<Tensor>& gate,
                         const Tensor& idx, const Tensor& route, const Tensor& paths,
                         bool grouped_out);
Tensor routed_grad_x_cpu(const Tensor& grad_z, const Tensor& weight, const Tensor& idx,
                         const Tensor& route, const Tensor& paths, int64_t num_sources,
                         bool grouped_in);
Tensor routed_grad_weight_cpu(const Tensor& grad_z, const Tensor& x, const Tensor& idx,
                              const Tensor& route, const Tensor& paths, int64_t num_weights,
                              bool grouped_in);
Tensor routed_grad_bias_cpu(const Tensor& grad_z, const Tensor& route, int64_t num_weights);
Tensor routed_grad_gate_cpu(const Tensor& grad_y, const Tensor& z, const Tensor& idx,
                            const Tensor& route, const Tensor& paths);

}  // namespace cpu
}  // namespace gated_ops

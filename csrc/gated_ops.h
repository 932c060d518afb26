// Shared by the CPU (gated_ops.cpp) and CUDA (gated_ops_cuda.cu) implementations: the plan view
// and the argument checks, so that every backend rejects bad input with the same words.
#pragma once

#include <ATen/ATen.h>

namespace gated_ops {

// Read-only view of a PathwayPlan (gated_ops/plan.py documents the layout).
struct Plan {
  int64_t T = 0, n = 0, s0 = 0, ns = 0, m0 = 0, nm = 0;  // layout
  int64_t P = 0, S = 0, M = 0;
  bool blocked() const { return n > 0; }
  // Row/column counts of the intermediate Z for a batch of B rows and D_out outputs.
  int64_t z_rows(int64_t B) const { return blocked() ? n * ns * B : P * B; }
  int64_t z_cols(int64_t D_out) const { return blocked() ? nm * D_out : D_out; }
};

// Names the argument as the user passed it (name), and the shape it should have had.
#define GATED_CHECK_SHAPE(name, t, ...)                                                        \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), name ": expected shape ",        \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(),
              " (the device of x / logits), got ", t.device());
}

inline void check_float(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype,
              " (the dtype of the data), got ", t.scalar_type());
}

// Validates the plan tensors against S sources and M weights and returns the view.
inline Plan make_plan_view(const at::Tensor& paths, const at::Tensor& csr, at::IntArrayRef layout,
                           int64_t S, int64_t M, const at::Tensor& ref) {
  TORCH_CHECK(layout.size() == 6, "layout: expected 6 ints (T, n, s0, ns, m0, nm), got ",
              layout.size());
  Plan p;
  p.T = layout[0]; p.n = layout[1]; p.s0 = layout[2]; p.ns = layout[3]; p.m0 = layout[4];
  p.nm = layout[5];
  p.S = S; p.M = M;
  TORCH_CHECK(paths.scalar_type() == at::kLong && csr.scalar_type() == at::kLong,
              "paths, csr: expected int64 plan tensors (build them with gated_ops.make_plan)");
  TORCH_CHECK(paths.dim() == 2 && paths.size(0) == 5 && paths.is_contiguous(),
              "paths: expected a contiguous (5, P) tensor, got ", paths.sizes());
  p.P = paths.size(1);
  check_same_device(paths, "paths (plan)", ref);
  check_same_device(csr, "csr (plan)", ref);
  const int64_t csr_len = (p.T + 1) + (S + 1) + (M + 1) + 3 * p.P;
  TORCH_CHECK(csr.dim() == 1 && csr.numel() == csr_len && csr.is_contiguous(),
              "csr: expected ", csr_len, " entries for T=", p.T, ", S=", S, ", M=", M, ", P=", p.P,
              " (a plan built for other sizes?), got shape ", csr.sizes());
  TORCH_CHECK(p.T >= 0 && p.n >= 0, "layout: expected T >= 0 and n >= 0");
  if (p.blocked()) {
    TORCH_CHECK(p.ns > 0 && p.nm > 0 && p.n * p.ns * p.nm == p.P && p.s0 >= 0 && p.m0 >= 0 &&
                    p.s0 + p.n * p.ns <= S && p.m0 + p.n * p.nm <= M,
                "layout: blocked structure (n=", p.n, ", s0=", p.s0, ", ns=", p.ns, ", m0=", p.m0,
                ", nm=", p.nm, ") does not fit P=", p.P, ", S=", S, ", M=", M,
                " (a plan built for other sizes?)");
  }
  return p;
}

}  // namespace gated_ops

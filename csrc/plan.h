// The views the kernels read, shared by every backend: the pathway plan (Plan, built by
// make_plan_view from a PathwayPlan's tensors) and the gated cross-entropy's logit blocks
// (LogitBlocks), each with the checks of the shapes it implies. Passed by value to CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include "checks.h"

namespace gated_ops {

// The layout's flags (gated_ops/plan.py: ONE_PER_DST, Z_IS_Y): what the host knows of the
// table without reading it from the device.
constexpr int64_t kOnePerDst = 1;  // every destination has exactly one pathway
constexpr int64_t kZIsY = 2;  // blocked, nm = 1, pathway p is destination p and Z's row block p

// Read-only view of a PathwayPlan (gated_ops/plan.py documents the layout): its sizes and raw
// pointers into paths / csr, on the plan's device. Passed by value to CUDA kernels.
struct Plan {
  int64_t T = 0, n = 0, s0 = 0, ns = 0, m0 = 0, nm = 0, flags = 0;  // layout
  int64_t P = 0, S = 0, M = 0;
  const int64_t *src = nullptr, *wgt = nullptr, *dst = nullptr, *zrow = nullptr, *zcol = nullptr;
  const int64_t *dst_ptr = nullptr, *dst_perm = nullptr, *src_ptr = nullptr,
                *src_perm = nullptr, *wgt_ptr = nullptr, *wgt_perm = nullptr;
  // owner[rb * (blocked ? nm : 1) + cb]: the pathway of Z's row block rb, column block cb
  const int64_t* owner = nullptr;
  C10_HOST_DEVICE bool blocked() const { return n > 0; }
  C10_HOST_DEVICE bool one_per_dst() const { return (flags & kOnePerDst) != 0; }
  // Z (n*ns*B, D_out) is y (T, B, D_out) itself, row for row.
  C10_HOST_DEVICE bool z_is_y() const { return (flags & kZIsY) != 0; }
  // Row/column counts of the intermediate Z for a batch of B rows and D_out outputs.
  C10_HOST_DEVICE int64_t z_rows(int64_t B) const { return blocked() ? n * ns * B : P * B; }
  C10_HOST_DEVICE int64_t z_cols(int64_t D_out) const { return blocked() ? nm * D_out : D_out; }
};

// Validates the plan tensors against S sources and M weights and returns the view.
inline Plan make_plan_view(const at::Tensor& paths, const at::Tensor& csr, at::IntArrayRef layout,
                           int64_t S, int64_t M, const at::Tensor& ref) {
  TORCH_CHECK(layout.size() == 7, "layout: expected 7 ints (T, n, s0, ns, m0, nm, flags), got ",
              layout.size(), " (build the plan with gated_ops.make_plan)");
  Plan p;
  p.T = layout[0]; p.n = layout[1]; p.s0 = layout[2]; p.ns = layout[3]; p.m0 = layout[4];
  p.nm = layout[5]; p.flags = layout[6];
  p.S = S; p.M = M;
  TORCH_CHECK(paths.scalar_type() == at::kLong && csr.scalar_type() == at::kLong,
              "paths, csr: expected int64 plan tensors (build them with gated_ops.make_plan)");
  TORCH_CHECK(paths.dim() == 2 && paths.size(0) == 5 && paths.is_contiguous(),
              "paths: expected a contiguous (5, P) tensor, got ", paths.sizes());
  p.P = paths.size(1);
  check_same_device(paths, "paths (plan)", ref);
  check_same_device(csr, "csr (plan)", ref);
  const int64_t csr_len = (p.T + 1) + (S + 1) + (M + 1) + 4 * p.P;
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
  // The flags' shape facts, which the kernels rely on for their index ranges (the tables
  // themselves are checked against the flags by the CPU backend: cpu_plan).
  TORCH_CHECK(p.flags >= 0 && p.flags <= (kOnePerDst | kZIsY), "layout: unknown flags ", p.flags);
  TORCH_CHECK(!p.one_per_dst() || p.T == p.P, "layout: flags say one pathway per destination, "
              "but T=", p.T, " and P=", p.P, " (a plan built for other sizes?)");
  TORCH_CHECK(!p.z_is_y() || (p.one_per_dst() && p.blocked() && p.nm == 1),
              "layout: flags say Z is y, which needs one pathway per destination and a blocked "
              "plan with nm = 1 (build the plan with gated_ops.make_plan)");
  const int64_t* pa = paths.data_ptr<int64_t>();
  p.src = pa; p.wgt = pa + p.P; p.dst = pa + 2 * p.P; p.zrow = pa + 3 * p.P; p.zcol = pa + 4 * p.P;
  const int64_t* c = csr.data_ptr<int64_t>();
  p.dst_ptr = c; c += p.T + 1; p.dst_perm = c; c += p.P;
  p.src_ptr = c; c += S + 1;   p.src_perm = c; c += p.P;
  p.wgt_ptr = c; c += M + 1;   p.wgt_perm = c; c += p.P;
  p.owner = c;
  return p;
}

// Views of the blocked layout's sources and weights: (n, ns*B, D_in) and (n, nm*D_out, D_in).
inline at::Tensor x_blocks(const Plan& p, const at::Tensor& x) {
  return x.narrow(0, p.s0, p.n * p.ns).reshape({p.n, p.ns * x.size(1), x.size(2)});
}
inline at::Tensor w_blocks(const Plan& p, const at::Tensor& w) {
  return w.narrow(0, p.m0, p.n * p.nm).reshape({p.n, p.nm * w.size(1), w.size(2)});
}

// The batch B of a dZ laid out for this plan and D_out (B rows per pathway; 0 without any),
// checked: z_cols(D_out) columns and a whole batch of rows per pathway.
inline int64_t grad_z_batch(const at::Tensor& dz, const Plan& p, int64_t Do) {
  TORCH_CHECK(dz.dim() == 2 && dz.size(1) == p.z_cols(Do), "grad_z: expected ", p.z_cols(Do),
              " columns, got shape ", dz.sizes());
  const int64_t rows_per_path = p.blocked() ? p.n * p.ns : p.P;
  const int64_t B = rows_per_path ? dz.size(0) / rows_per_path : 0;
  TORCH_CHECK(dz.size(0) == rows_per_path * B, "grad_z: expected a multiple of ", rows_per_path,
              " rows for this plan, got shape ", dz.sizes());
  return B;
}

inline void check_grad_z(const at::Tensor& dz, const Plan& p, int64_t B, int64_t Do) {
  TORCH_CHECK(dz.dim() == 2 && dz.size(0) == p.z_rows(B) && dz.size(1) == p.z_cols(Do),
              "grad_z: expected shape (", p.z_rows(B), ", ", p.z_cols(Do),
              ") for this plan, batch and D_out, got ", dz.sizes());
}

// The logits of the gated cross-entropy as R*P blocks of B rows of C classes, in place: either
// (R, P, B, C) or (R, I, J, B, C) with path p = i * J + j (the k-path decoder's output viewed
// without a copy: there the blocks and the rows are strided). Any strides; classes contiguous.
// Passed by value to CUDA kernels.
struct LogitBlocks {
  int64_t R, P, B, C, J, sr, si, sj, sb;
  explicit LogitBlocks(const at::Tensor& l)
      : R(l.size(0)), P(l.dim() == 5 ? l.size(1) * l.size(2) : l.size(1)), B(l.size(-2)),
        C(l.size(-1)), J(l.dim() == 5 ? l.size(2) : 1), sr(l.stride(0)), si(l.stride(1)),
        sj(l.dim() == 5 ? l.stride(2) : 0), sb(l.stride(-2)) {}
  // element offset of path q's first row (q = r * P + p)
  C10_HOST_DEVICE int64_t offset(int64_t q) const {
    const int64_t r = q / P, p = q % P;
    return r * sr + (p / J) * si + (p % J) * sj;
  }
  // The t-th of the R*P*B rows in memory order, as (path q, row b): for the k-path's
  // (R, I, J, B, C) view the J paths of a sample row are adjacent in memory, so t runs over them
  // first (coalesced when consecutive GPU threads take consecutive rows).
  C10_HOST_DEVICE void row_at(int64_t t, int64_t& q, int64_t& b) const {
    if (J > 1 && sj < sb) {
      const int64_t j = t % J, u = t / J;
      b = u % B;
      q = (u / B) * J + j;
    } else {
      q = t / B;
      b = t - q * B;
    }
  }
};

// Logits (R, P, B, C) or (R, I, J, B, C) with contiguous classes (a copy otherwise).
inline at::Tensor logits_view(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 4 || logits.dim() == 5, "logits: expected (R, P, B, C) or (R, I, "
              "J, B, C) with P = I * J, got shape ", logits.sizes());
  return logits.size(-1) > 1 && logits.stride(-1) != 1 ? logits.contiguous() : logits;
}

// The gated cross-entropy's other inputs, checked against its logits (lb: their blocks):
// target (R, P, B) int64 class indices and gate (R, P) in the logits' dtype, on their device.
inline void check_ce_target_gate(const at::Tensor& logits, const LogitBlocks& lb,
                                 const at::Tensor& target, const at::Tensor& gate) {
  TORCH_CHECK(target.scalar_type() == at::kLong, "target: expected int64 class indices, got ",
              target.scalar_type());
  GATED_CHECK_SHAPE("target", target, lb.R, lb.P, lb.B);
  check_same_device(target, "target", logits);
  check_float(gate, "gate", logits.scalar_type());
  GATED_CHECK_SHAPE("gate", gate, lb.R, lb.P);
  check_same_device(gate, "gate", logits);
}

// The forward's: as above, and a loss that is defined (a mean over B > 0 rows of C > 0 classes).
inline void check_ce_forward(const at::Tensor& logits, const LogitBlocks& lb,
                             const at::Tensor& target, const at::Tensor& gate) {
  check_ce_target_gate(logits, lb, target, gate);
  TORCH_CHECK(lb.B > 0, "logits: expected a batch of B > 0 samples (the loss is a mean over B)");
  TORCH_CHECK(lb.C > 0, "logits: expected C > 0 classes");
}

// The backward's: as above, the forward's lse (R, P, B), and the incoming gradients (R,) and
// (R, P), each optional (an output nobody differentiates), all in the logits' dtype and device.
inline void check_ce_backward(const c10::optional<at::Tensor>& grad_loss,
                              const c10::optional<at::Tensor>& grad_path_loss,
                              const at::Tensor& logits, const LogitBlocks& lb,
                              const at::Tensor& target, const at::Tensor& gate,
                              const at::Tensor& lse) {
  if (grad_loss) {
    GATED_CHECK_SHAPE("grad_loss", *grad_loss, lb.R);
    check_float(*grad_loss, "grad_loss", logits.scalar_type());
    check_same_device(*grad_loss, "grad_loss", logits);
  }
  if (grad_path_loss) {
    GATED_CHECK_SHAPE("grad_path_loss", *grad_path_loss, lb.R, lb.P);
    check_float(*grad_path_loss, "grad_path_loss", logits.scalar_type());
    check_same_device(*grad_path_loss, "grad_path_loss", logits);
  }
  check_ce_target_gate(logits, lb, target, gate);
  GATED_CHECK_SHAPE("lse", lse, lb.R, lb.P, lb.B);
  check_float(lse, "lse", logits.scalar_type());
  check_same_device(lse, "lse", logits);
}

}  // namespace gated_ops

// Shared by the CPU (gated_ops.cpp) and CUDA (gated_ops_cuda.cu) implementations: the plan view
// and the argument checks, so that every backend rejects bad input with the same words.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "hash32.h"

namespace gated_ops {

// The op schemas, declared once: TORCH_LIBRARY(gated_ops) in gated_ops.cpp, and the CUDA
// kernels' CPU emulation (csrc/cuda_emu/module.cpp) under its own namespace. `paths`, `csr`,
// `layout` come from gated_ops.make_plan.
inline void define_schemas(torch::Library& m) {
  m.def("pathway_matmul(Tensor x, Tensor weight, Tensor? bias, Tensor? gate, Tensor paths, "
        "Tensor csr, int[] layout) -> Tensor");
  m.def("pathway_grad_z(Tensor grad_y, Tensor? gate, Tensor paths, Tensor csr, int[] layout, "
        "int num_sources, int num_weights) -> Tensor");
  m.def("pathway_grad_x(Tensor grad_z, Tensor weight, Tensor paths, Tensor csr, int[] layout, "
        "int num_sources, int batch) -> Tensor");
  m.def("pathway_grad_weight(Tensor grad_z, Tensor x, Tensor paths, Tensor csr, int[] layout, "
        "int num_weights, int d_out) -> Tensor");
  m.def("pathway_grad_bias(Tensor grad_z, Tensor paths, Tensor csr, int[] layout, "
        "int num_sources, int num_weights, int d_out) -> Tensor");
  m.def("pathway_grad_gate(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor gate, "
        "Tensor paths, Tensor csr, int[] layout) -> Tensor");
  m.def("pathway_grad_x_gate(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor gate, "
        "Tensor paths, Tensor csr, int[] layout) -> (Tensor grad_x, Tensor grad_gate)");
  m.def("pathway_sgd_(Tensor grad_z, Tensor x, Tensor(a!) weight, Tensor(b!)? momentum_buffer, "
        "Tensor paths, Tensor csr, int[] layout, float lr, float momentum, float weight_decay, "
        "bool nesterov, int rounding_seed=-1, Tensor? rounding_step=None, "
        "Tensor(c!)? bias=None, Tensor(d!)? bias_momentum_buffer=None, "
        "int bias_rounding_seed=-1) -> ()");
  m.def("pathway_sgd_lookahead_(Tensor grad_z, Tensor x, Tensor(a!) weight, "
        "Tensor(b!)? momentum_buffer, Tensor paths, Tensor csr, int[] layout, float lr, "
        "float momentum, float weight_decay, bool nesterov, int rounding_seed, Tensor x_next, "
        "Tensor? rounding_step=None, Tensor(c!)? bias=None, "
        "Tensor(d!)? bias_momentum_buffer=None, int bias_rounding_seed=-1) -> Tensor");
  m.def("pathway_bias_sgd_(Tensor grad_z, Tensor(a!) bias, Tensor(b!)? momentum_buffer, "
        "Tensor paths, Tensor csr, int[] layout, int num_sources, int num_weights, float lr, "
        "float momentum, float weight_decay, bool nesterov, int rounding_seed=-1, "
        "Tensor? rounding_step=None) -> ()");
  m.def("gated_cross_entropy(Tensor logits, Tensor target, Tensor gate) "
        "-> (Tensor loss, Tensor path_loss, Tensor correct, Tensor lse)");
  m.def("gated_cross_entropy_backward(Tensor? grad_loss, Tensor? grad_path_loss, Tensor logits, "
        "Tensor target, Tensor gate, Tensor lse) -> Tensor");
}

// Inside an op its ATen calls (the BLAS paths) run in the op's dtype: autocast decided the dtype
// at the op's boundary (gated_ops/ops.py: a fused-SGD layer runs in its parameters' dtype), and
// the Autocast keys, falling through our ops, would otherwise recast a nested bmm's inputs.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

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

// x (S, B, D_in), weight (M, D_out, D_in), bias (M, D_out): shapes, dtypes, devices agree.
// (Which dtypes a backend supports is checked by the backend.)
inline void check_data(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 3, "x: expected (S, B, D_in), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 3, "weight: expected (M, D_out, D_in), got shape ", weight.sizes());
  check_float(weight, "weight", x.scalar_type());
  check_same_device(weight, "weight", x);
  TORCH_CHECK(weight.size(2) == x.size(2), "weight: expected D_in = ", x.size(2),
              " (x.size(2)), got weight of shape ", weight.sizes());
  if (bias) {
    check_float(*bias, "bias", x.scalar_type());
    check_same_device(*bias, "bias", x);
    GATED_CHECK_SHAPE("bias", *bias, weight.size(0), weight.size(1));
  }
}

// `ref` carries the dtype and device the gate must have; B is the batch size.
inline void check_gate(const c10::optional<at::Tensor>& gate, const at::Tensor& ref, int64_t P,
                       int64_t B) {
  if (!gate) return;
  check_float(*gate, "gate", ref.scalar_type());
  check_same_device(*gate, "gate", ref);
  TORCH_CHECK((gate->dim() == 1 && gate->size(0) == P) ||
                  (gate->dim() == 2 && gate->size(0) == P && gate->size(1) == B),
              "gate: expected (P,) or (P, B) = (", P, ",) or (", P, ", ", B, "), got shape ",
              gate->sizes());
}

// Views of the blocked layout's sources and weights: (n, ns*B, D_in) and (n, nm*D_out, D_in).
inline at::Tensor x_blocks(const Plan& p, const at::Tensor& x) {
  return x.narrow(0, p.s0, p.n * p.ns).reshape({p.n, p.ns * x.size(1), x.size(2)});
}
inline at::Tensor w_blocks(const Plan& p, const at::Tensor& w) {
  return w.narrow(0, p.m0, p.n * p.nm).reshape({p.n, p.nm * w.size(1), w.size(2)});
}

// A fused SGD step's parameter (name: "weight" or "bias") and momentum buffer: the data's dtype
// and device, contiguous (updated in place through raw pointers), and a buffer exactly when
// momentum != 0, laid out like the parameter.
inline void check_sgd_state(const at::Tensor& param, const char* name,
                            const c10::optional<at::Tensor>& buf, double momentum,
                            const at::Tensor& ref) {
  check_float(param, name, ref.scalar_type());
  check_same_device(param, name, ref);
  TORCH_CHECK(param.is_contiguous(), name, ": the fused SGD update needs a contiguous ", name);
  TORCH_CHECK((momentum != 0) == buf.has_value(),
              "momentum_buffer: expected a buffer exactly when momentum != 0");
  if (buf) {
    TORCH_CHECK(buf->sizes() == param.sizes() && buf->is_contiguous() &&
                    buf->scalar_type() == param.scalar_type(),
                "momentum_buffer: expected a contiguous tensor like ", name, " ", param.sizes(),
                ", got ", buf->sizes());
    check_same_device(*buf, "momentum_buffer", ref);
  }
}

// x_next (S, B', D_in) of a lookahead step: like x but for its batch size.
inline void check_x_next(const at::Tensor& x_next, const at::Tensor& x) {
  TORCH_CHECK(x_next.dim() == 3 && x_next.size(0) == x.size(0) && x_next.size(2) == x.size(2),
              "x_next: expected (S, B_next, D_in) with S = ", x.size(0), ", D_in = ", x.size(2),
              " (those of x), got shape ", x_next.sizes());
  TORCH_CHECK(x_next.scalar_type() == x.scalar_type(), "x_next: expected dtype ",
              x.scalar_type(), " (x's), got ", x_next.scalar_type());
  check_same_device(x_next, "x_next", x);
}

// bias (M, D_out) of a fused bias step.
inline void check_bias_sgd(const at::Tensor& bias, int64_t num_weights) {
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == num_weights, "bias: expected (M, D_out) with M = ",
              num_weights, " weights, got shape ", bias.sizes());
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

// Stochastic rounding of a bfloat16 parameter's update (rounding_seed >= 0): the random bits of
// element i are hash32(uint32(i) + mix) mod 2^16, mix = seed_mix(seed), added below the kept
// mantissa before truncation (cpu_simd.h bf16_stochastic, the CUDA kernels' round_param,
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

// The bias a weight update also steps (pathway_sgd_'s bias, bias_momentum_buffer): (M, D_out)
// like the weight's rows, its buffer as check_sgd_state asks. Checked before either is touched.
inline void check_layer_bias(const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& bias_buf, const at::Tensor& weight,
                             double momentum, int64_t bias_rounding_seed,
                             const c10::optional<at::Tensor>& rounding_step,
                             const at::Tensor& ref) {
  if (!bias) {
    TORCH_CHECK(!bias_buf, "bias_momentum_buffer: given without a bias");
    return;
  }
  TORCH_CHECK(bias->dim() == 2 && bias->size(0) == weight.size(0) &&
                  bias->size(1) == weight.size(1),
              "bias: expected (M, D_out) = (", weight.size(0), ", ", weight.size(1),
              ") like the weight's rows, got shape ", bias->sizes());
  check_sgd_state(*bias, "bias", bias_buf, momentum, ref);
  rounding_for(bias_rounding_seed, rounding_step, *bias, "biases");  // (its checks)
}

}  // namespace gated_ops

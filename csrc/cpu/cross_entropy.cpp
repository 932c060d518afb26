// The gated cross-entropy on the CPU: per-path mean losses, correct counts and the gated mean
// (gated_cross_entropy), and its gradient with respect to the logits in one pass
// (gated_cross_entropy_backward). cpu/common.h says how the CPU kernels work.
#include <ATen/AccumulateType.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/common.h"

namespace gated_ops {
namespace cpu {
namespace {

// exp for the cross-entropy: a branch-free float expf that compilers vectorise (Cephes' range
// reduction by ln 2 and degree-6 polynomial, relative error < 2 ulp on [-87, 88]; NaN in, NaN
// out; below -87.3 it returns 0 as expf underflows). On 800k logits (K=100, B=8, C=10) a
// scalar libm exp per element was most of the CE forward's ~8 ms on this 2-core machine.
inline float expf_poly(float x) {
  const float xc = std::min(std::max(x, -87.33f), 88.72f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float p = simd::exp_core(xc, n);
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float out = p * scale;
  return x != x ? x : (x < -87.33f ? 0.0f : out);
}

// out[i] = exp(l[i] - mx[i / C]) for rows x C entries (shift first, then one flat loop that
// vectorises whatever C is).
GATED_TARGET_CLONES void exp_shifted(const float* l, const float* mx, int64_t rows, int64_t C,
                                     float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = l[r * C + c] - mx[r];
  for (int64_t i = 0; i < rows * C; ++i) out[i] = expf_poly(out[i]);
}
void exp_shifted(const double* l, const double* mx, int64_t rows, int64_t C, double* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = std::exp(l[r * C + c] - mx[r]);
}

// One block's B x C values (rows sb apart) as contiguous opmath values: in place when they are
// already (float / double, contiguous rows), else gathered (and widened) into buf.
template <typename scalar_t, typename opmath_t>
const opmath_t* block_rows(const scalar_t* src, int64_t B, int64_t C, int64_t sb,
                           std::vector<opmath_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (sb == C) return src;
  }
  buf.resize(B * C);
  for (int64_t b = 0; b < B; ++b) std::copy(src + b * sb, src + b * sb + C, buf.data() + b * C);
  return buf.data();
}

// d = w * (softmax(l) - onehot(y)) for one path's B x C block, from the forward's row lse.
// 16-bit logits: the block is widened and its softmax recomputed in float from the row max, not
// from the stored lse (a bf16 lse near 8 is off by up to 0.03, a 3% error on every softmax
// value); d is formed in float and rounded once.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void ce_grad_block(const scalar_t* l, const scalar_t* lse, const int64_t* y, opmath_t w,
                   int64_t B, int64_t C, scalar_t* d, std::vector<opmath_t>& scratch) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    exp_shifted(l, lse, B, C, d);
    for (int64_t i = 0; i < B * C; ++i) d[i] *= w;
    for (int64_t b = 0; b < B; ++b) d[b * C + y[b]] -= w;
  } else {  // softmax = exp(l - max) / sum in float, from the widened block
    scratch.resize(2 * B * C + B);
    opmath_t *lw = scratch.data(), *e = lw + B * C, *mx = e + B * C;
    std::copy(l, l + B * C, lw);
    for (int64_t b = 0; b < B; ++b) {
      opmath_t m = lw[b * C];
      for (int64_t c = 1; c < C; ++c) m = std::max(m, lw[b * C + c]);
      mx[b] = m;
    }
    exp_shifted(lw, mx, B, C, e);
    for (int64_t b = 0; b < B; ++b) {
      opmath_t sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += e[b * C + c];
      const opmath_t scale = w / sum;
      for (int64_t c = 0; c < C; ++c) e[b * C + c] *= scale;
      e[b * C + y[b]] -= w;
    }
    std::copy(e, e + B * C, d);
  }
}

// One path's gradient block through the vector kernel (simd::ce_grad_rows, rows in lanes)
// where there is one: float logits in place, 16-bit ones widened with their softmax recomputed
// in float (ce_grad_block's reason) and the gradient rounded once into its rows. Returns false
// where the caller takes the scalar path (double; builds without vector extensions).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
bool ce_grad_vector(const scalar_t* l, int64_t sb, const scalar_t* lse, const int64_t* y,
                    opmath_t w, int64_t B, int64_t C, scalar_t* d, int64_t dsb,
                    std::vector<opmath_t>& scratch, std::vector<opmath_t>& wide) {
#if GATED_HAVE_VECTOR_EXT
  if constexpr (std::is_same_v<scalar_t, float>) {
    simd::ce_grad_rows(l, sb, lse, y, w, B, C, d, dsb);
    return true;
  } else if constexpr (std::is_same_v<opmath_t, float>) {
    const float* lw = block_rows(l, B, C, sb, scratch);
    wide.resize(B * C);
    simd::ce_grad_rows(lw, C, nullptr, y, w, B, C, wide.data(), C);
    for (int64_t b = 0; b < B; ++b)
      std::copy(wide.data() + b * C, wide.data() + (b + 1) * C, d + b * dsb);
    return true;
  }
#endif
  return false;
}

// One path's cross-entropy forward over B rows of C logits (contiguous, targets in range):
// lse per row into lse, correct rows into hits; returns sum_b (lse[b] - l[b, y[b]]). Float
// logits take simd::ce_rows (rows in vector lanes) instead: see ce_block.
template <typename T>
double ce_path(const T* lq, const int64_t* Y, int64_t B, int64_t C, T* lse, int64_t& hits,
               std::vector<T>& mx, std::vector<T>& e) {
  hits = 0;
  for (int64_t b = 0; b < B; ++b) {
    const T* l = lq + b * C;
    // argmax as torch.argmax: the first maximum, or the first NaN (NaN counts as the maximum,
    // and the max is then NaN): a max pass, then bit masks (no data-dependent branches).
    T m = l[0];
    for (int64_t c = 1; c < C; ++c) m = l[c] > m ? l[c] : m;
    int64_t arg;
    if (C <= 64) {
      uint64_t at_max = 0, at_nan = 0;
      for (int64_t c = 0; c < C; ++c) {
        at_max |= uint64_t(l[c] == m) << c;
        at_nan |= uint64_t(l[c] != l[c]) << c;
      }
      arg = __builtin_ctzll((at_nan ? at_nan : at_max) | (uint64_t(1) << (C - 1)));
      if (at_nan) m = std::numeric_limits<T>::quiet_NaN();
    } else {
      bool nan = false;
      for (int64_t c = 0; c < C; ++c) nan |= l[c] != l[c];
      arg = 0;
      while (arg < C && !(nan ? l[arg] != l[arg] : l[arg] == m)) ++arg;
      if (nan) m = std::numeric_limits<T>::quiet_NaN();
    }
    mx[b] = m;
    hits += (arg == Y[b]);
  }
  // Shifted by the max as log_softmax is; an infinite max gives NaN, as it does there.
  exp_shifted(lq, mx.data(), B, C, e.data());
  double nll_sum = 0;
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += e[b * C + c];
    const double lse_b = std::log(sum) + double(mx[b]);
    lse[b] = T(lse_b);
    nll_sum += lse_b - double(lq[b * C + Y[b]]);
  }
  return nll_sum;
}

// One path's block (B rows of C logits, rows sb apart) through the CE forward: float logits
// straight from their strided rows (simd::ce_rows), others gathered into contiguous opmath rows
// first (ce_path).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
double ce_block(const scalar_t* src, int64_t sb, const int64_t* Y, int64_t B, int64_t C,
                opmath_t* lse, int64_t& hits, std::vector<opmath_t>& rows,
                std::vector<opmath_t>& mx, std::vector<opmath_t>& e) {
#if GATED_HAVE_VECTOR_EXT
  if constexpr (std::is_same_v<scalar_t, float>) {
    return simd::ce_rows(src, sb, Y, B, C, lse, hits);
  } else if constexpr (std::is_same_v<opmath_t, float>) {
    // 16-bit logits: the block is widened into contiguous float rows and takes the same
    // vector path (ce_path's scalar rows were nearly all of the bf16 forward's 1.61 ms at
    // K = 100 on an AMD EPYC; this path takes 0.82 ms)
    return simd::ce_rows(block_rows(src, B, C, sb, rows), C, Y, B, C, lse, hits);
  }
#endif
  return ce_path(block_rows(src, B, C, sb, rows), Y, B, C, lse, hits, mx, e);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Gated cross-entropy over (R, P, B, C) logits: per-path mean loss, correct counts, gated mean.
std::tuple<Tensor, Tensor, Tensor, Tensor> gated_cross_entropy_cpu(const Tensor& logits_,
                                                                   const Tensor& target_,
                                                                   const Tensor& gate_) {
  check_cpu_dtype(logits_, "logits");
  const Tensor logits = logits_view(logits_);
  const LogitBlocks lb(logits);
  const int64_t R = lb.R, P = lb.P, B = lb.B, C = lb.C;
  check_ce_forward(logits, lb, target_, gate_);
  const Tensor target = target_.contiguous(), gate = gate_.contiguous();
  Tensor loss = at::empty({R}, logits.options());
  Tensor path_loss = at::empty({R, P}, logits.options());
  Tensor correct = at::empty({R, P}, target.options());
  Tensor lse = at::empty({R, P, B}, logits.options());
  GATED_CPU_DISPATCH(logits.scalar_type(), "gated_cross_entropy_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    using opmath_t = at::opmath_type<scalar_t>;  // 16-bit logits: widened per path, then float
    const scalar_t* L = logits.data_ptr<scalar_t>();
    const int64_t* Y = target.data_ptr<int64_t>();
    const scalar_t* G = gate.data_ptr<scalar_t>();
    scalar_t *PL = path_loss.data_ptr<scalar_t>(), *LSE = lse.data_ptr<scalar_t>();
    int64_t* CO = correct.data_ptr<int64_t>();
    at::parallel_for(0, R * P, 64, [&](int64_t q0, int64_t q1) {
      std::vector<opmath_t> mx(B), e(B * C), rows, lse_q(B);
      for (int64_t q = q0; q < q1; ++q) {
        const scalar_t* lq = L + lb.offset(q);
        for (int64_t b = 0; b < B; ++b) {  // (before any read at l[b, y[b]])
          const int64_t y = Y[q * B + b];
          TORCH_CHECK(y >= 0 && y < C, "target: class index ", y, " out of range [0, ", C, ")");
        }
        int64_t hits = 0;
        const double nll_sum =
            ce_block(lq, lb.sb, Y + q * B, B, C, lse_q.data(), hits, rows, mx, e);
        for (int64_t b = 0; b < B; ++b) LSE[q * B + b] = scalar_t(lse_q[b]);
        PL[q] = scalar_t(nll_sum / double(B));
        CO[q] = hits;
      }
    });
    scalar_t* LO = loss.data_ptr<scalar_t>();
    for (int64_t r = 0; r < R; ++r) {
      acc_t num = 0, den = 0;
      for (int64_t j = 0; j < P; ++j) {
        num += acc_t(G[r * P + j]) * acc_t(PL[r * P + j]);
        den += acc_t(G[r * P + j]);
      }
      TORCH_CHECK(den != 0, "gate: the path gate of replica ", r,
                  " sums to zero, so the gated mean loss is undefined; gate at least one path");
      LO[r] = scalar_t(num / den);
    }
  });
  return {loss, path_loss, correct, lse};
}

// d/dlogits of sum_r grad_loss[r] * loss[r] + sum_{r,p} grad_path_loss[r,p] * path_loss[r,p]
//   = w[r,p] * (softmax(logits) - onehot(target)),
//   w[r,p] = (grad_loss[r] * gate[r,p] / sum_p gate[r,p] + grad_path_loss[r,p]) / B,
// one pass over the logits: softmax = exp(logits - lse) with the forward's lse. A missing
// grad_loss or grad_path_loss (an output nobody differentiates) counts as zeros.
Tensor gated_cross_entropy_backward_cpu(const c10::optional<Tensor>& grad_loss_,
                                        const c10::optional<Tensor>& grad_pl_,
                                        const Tensor& logits_, const Tensor& target_,
                                        const Tensor& gate_, const Tensor& lse_) {
  const Tensor logits = logits_view(logits_);
  const LogitBlocks lb(logits);
  const int64_t R = lb.R, P = lb.P, B = lb.B, C = lb.C;
  check_cpu_dtype(logits_, "logits");
  check_ce_backward(grad_loss_, grad_pl_, logits, lb, target_, gate_, lse_);
  const Tensor target = target_.contiguous(), lse = lse_.contiguous(),
               gate = gate_.contiguous(),
               grad_loss = grad_loss_ ? grad_loss_->contiguous() : Tensor(),
               grad_pl = grad_pl_ ? grad_pl_->contiguous() : Tensor();
  Tensor grad = at::empty_like(logits);  // the logits' strides (a strided view stays one)
  const LogitBlocks gb(grad);
  GATED_CPU_DISPATCH(logits.scalar_type(), "gated_cross_entropy_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // w[r, p] = (grad_loss[r] * gate[r, p] / sum_p gate[r, p] + grad_path_loss[r, p]) / B, in
    // opmath (float for 16-bit logits); a plain loop: (R, P) is small, and ATen ops on it cost
    // more in dispatch than in arithmetic (tens of microseconds a step).
    std::vector<opmath_t> w(R * P);
    const scalar_t *G = gate.data_ptr<scalar_t>(),
                   *GL = grad_loss.defined() ? grad_loss.data_ptr<scalar_t>() : nullptr,
                   *GP = grad_pl.defined() ? grad_pl.data_ptr<scalar_t>() : nullptr;
    for (int64_t r = 0; r < R; ++r) {
      opmath_t den = 0;
      for (int64_t p = 0; p < P; ++p) den += opmath_t(G[r * P + p]);
      const opmath_t gl = GL ? opmath_t(GL[r]) : opmath_t(0);
      for (int64_t p = 0; p < P; ++p) {
        w[r * P + p] = (gl * opmath_t(G[r * P + p]) / den +
                        (GP ? opmath_t(GP[r * P + p]) : opmath_t(0))) / opmath_t(B);
      }
    }
    const scalar_t *L = logits.data_ptr<scalar_t>(), *LSE = lse.data_ptr<scalar_t>();
    const opmath_t* W = w.data();
    const int64_t* Y = target.data_ptr<int64_t>();
    scalar_t* D = grad.data_ptr<scalar_t>();
    const bool dense = lb.sb == C && gb.sb == C;  // rows contiguous: work in place
    at::parallel_for(0, R * P, 64, [&](int64_t q0, int64_t q1) {
      std::vector<opmath_t> scratch, wide;
      std::vector<scalar_t> lc(dense ? 0 : B * C), dc(dense ? 0 : B * C);
      for (int64_t q = q0; q < q1; ++q) {
        for (int64_t b = 0; b < B; ++b) {  // a direct call with a bad target: refused
          const int64_t y = Y[q * B + b];  // (before any write at d[b, y])
          TORCH_CHECK(y >= 0 && y < C, "target: class index ", y, " out of range [0, ", C, ")");
        }
        scalar_t* dq = dense ? D + gb.offset(q) : dc.data();
        const opmath_t wq = W[q];
        if (wq == opmath_t(0)) {
          // An ungated path whose path loss is not differentiated (the k-path training loss:
          // half the paths at N = K/2): its gradient is 0 * (softmax - onehot), exactly zero
          // when every row's lse is finite (no NaN or +inf logit); else keep NaN propagating.
          bool finite = true;
          for (int64_t b = 0; b < B; ++b) finite &= std::isfinite(float(LSE[q * B + b]));
          if (finite) {
            for (int64_t b = 0; b < B; ++b)
              std::fill(D + gb.offset(q) + b * gb.sb, D + gb.offset(q) + b * gb.sb + C,
                        scalar_t(0));
            continue;
          }
        }
        const scalar_t* lq = L + lb.offset(q);
        if (ce_grad_vector(lq, lb.sb, LSE + q * B, Y + q * B, wq, B, C, D + gb.offset(q),
                           gb.sb, scratch, wide))
          continue;
        if (!dense) {  // gather the block's rows, scatter its gradient rows below
          for (int64_t b = 0; b < B; ++b)
            std::copy(lq + b * lb.sb, lq + b * lb.sb + C, lc.data() + b * C);
          lq = lc.data();
        }
        ce_grad_block(lq, LSE + q * B, Y + q * B, wq, B, C, dq, scratch);
        if (!dense) {
          for (int64_t b = 0; b < B; ++b)
            std::copy(dc.data() + b * C, dc.data() + (b + 1) * C, D + gb.offset(q) + b * gb.sb);
        }
      }
    });
  });
  return grad;
}

}  // namespace cpu
}  // namespace gated_ops

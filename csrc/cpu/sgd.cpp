// The fused SGD on the CPU: pathway_sgd_ (the weight's gradient formed a few rows at a time
// and applied at once, never written to memory; with a layer's bias step), its lookahead
// (pathway_sgd_lookahead_: the next forward from the updated weight, in the same pass where the
// skinny kernels run) and the bias step (pathway_bias_sgd_). cpu/common.h says how the CPU
// kernels work.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/common.h"

namespace gated_ops {
namespace cpu {
namespace {

// Fused SGD: W <- W - lr * d, buf <- momentum * buf + (g + wd * W), d = buf (or g + momentum * buf
// with nesterov), g = grad_W computed a few rows at a time and never written to memory. Per step
// this reads and writes W and buf once: at K=100, D=784, H=128 that is 4 x 40 MB instead of the
// 7 x 40 MB of autograd's grad tensor followed by torch.optim.SGD.
//
// The hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time
// (GATED_TARGET_CLONES, cpu/simd.h), since the rest of the build targets baseline x86-64.

template <typename scalar_t, typename opmath_t>
inline void store_weight(scalar_t* w, opmath_t v, int64_t index, const Rounding& rd) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (rd.stochastic) {
      w->x = simd::bf16_stochastic(float(v), index, rd.mix);
      return;
    }
  }
  *w = v;
}

// (scalar_t: the weight's storage type; grad_t: the gradient's (scalar_t or opmath_t). The
// update is computed in opmath_t, float for 16-bit weights, and rounded once when W and buf are
// stored. index0: the element index of w[0] in the whole weight tensor.)
template <typename scalar_t, typename grad_t = scalar_t,
          typename opmath_t = at::opmath_type<scalar_t>>
GATED_TARGET_CLONES void sgd_rows(scalar_t* w, scalar_t* buf, const grad_t* g, int64_t count,
                                  opmath_t lr, opmath_t mom, opmath_t wd, bool nesterov,
                                  int64_t index0, Rounding rd) {
#if GATED_HAVE_VECTOR_EXT
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> &&
                (std::is_same_v<grad_t, at::BFloat16> || std::is_same_v<grad_t, float>)) {
    using bits_t = std::conditional_t<std::is_same_v<grad_t, float>, float, uint16_t>;
    simd::sgd_stream(reinterpret_cast<uint16_t*>(w), reinterpret_cast<uint16_t*>(buf),
                     reinterpret_cast<const bits_t*>(g), count, index0,
                     {float(lr), float(mom), float(wd), nesterov, rd.stochastic, rd.mix});
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) {
    const opmath_t wi = w[i];
    opmath_t d = g ? opmath_t(g[i]) : opmath_t(0);
    if (wd != 0) d += wd * wi;
    if (buf) {
      const opmath_t b = mom * opmath_t(buf[i]) + d;
      buf[i] = b;
      d = nesterov ? d + mom * b : b;
    }
    store_weight(w + i, wi - lr * d, index0 + i, rd);
  }
}

// One row of W updated from its gradient row g = sum_r a[r * lda] * x[r, :] (a skinny dZ^T X,
// nr rows), in one streaming pass: the gradient of a 64-wide chunk is formed in registers and
// applied to W and the momentum buffer at once, so W and buf are read and written once and the
// gradient row never touches memory. (The two-pass version, the whole gradient row into an L1
// array and then sgd_rows, profiled at ~2x the encoder's memory floor at K=40, D=3072; this one
// measured no different within this 2-core VM's +-30% run-to-run noise.)
// (scalar_t: the weight's storage type; a and x are in opmath_t, float for 16-bit weights.)
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
GATED_TARGET_CLONES void grad_sgd_row(scalar_t* w, scalar_t* buf, const opmath_t* a, int64_t lda,
                                      const opmath_t* x, int64_t nr, int64_t Di, opmath_t lr,
                                      opmath_t mom, opmath_t wd, bool nesterov, int64_t index0,
                                      Rounding rd) {
  constexpr int64_t kChunk = 64;
  for (int64_t i0 = 0; i0 < Di; i0 += kChunk) {
    const int64_t n = std::min(kChunk, Di - i0);
    opmath_t g[kChunk] = {};
    for (int64_t r = 0; r < nr; ++r) {
      const opmath_t ar = a[r * lda];
      const opmath_t* xr = x + r * Di + i0;
      for (int64_t i = 0; i < n; ++i) g[i] += ar * xr[i];
    }
    scalar_t* wi = w + i0;
    scalar_t* bi = buf ? buf + i0 : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      const opmath_t wv = wi[i];
      opmath_t d = wd != 0 ? g[i] + wd * wv : g[i];
      if (bi) {
        const opmath_t b = mom * opmath_t(bi[i]) + d;
        bi[i] = b;
        d = nesterov ? d + mom * b : b;
      }
      store_weight(wi + i, wv - lr * d, index0 + i0 + i, rd);
    }
  }
}

// The vectorised skinny update (cpu/simd.h) where there is one: float32 and bfloat16 weights
// (a and x in float). Returns false for the other types; the caller runs grad_sgd_row.
template <typename scalar_t, typename opmath_t>
bool try_skinny_grad_sgd(scalar_t* w, scalar_t* buf, int64_t index0, const opmath_t* a,
                         int64_t lda, const opmath_t* x, int64_t nr, int64_t rows, int64_t D,
                         double lr, double momentum, double weight_decay, bool nesterov,
                         Rounding rd, int lanes) {
#if GATED_HAVE_VECTOR_EXT
  const simd::SgdArgs args{float(lr), float(momentum), float(weight_decay), nesterov,
                           rd.stochastic, rd.mix};
  if constexpr (std::is_same_v<scalar_t, float>) {
    simd::skinny_grad_sgd(w, buf, index0, a, lda, x, nr, rows, D, args, lanes);
    return true;
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    simd::skinny_grad_sgd(reinterpret_cast<uint16_t*>(w), reinterpret_cast<uint16_t*>(buf),
                          index0, a, lda, x, nr, rows, D, args, lanes);
    return true;
  }
#endif
  (void)lanes;
  return false;
}

// The skinny update fused with the next forward (simd::skinny_grad_sgd_fwd): float32 and
// bfloat16 weights, nr <= 8 rows of x and of x_next (the caller checks).
template <typename scalar_t, typename opmath_t>
void fused_grad_sgd_fwd(scalar_t* w, scalar_t* buf, int64_t index0, const opmath_t* a,
                        int64_t lda, const opmath_t* x, int64_t nr, int64_t rows, int64_t D,
                        double lr, double momentum, double weight_decay, bool nesterov,
                        Rounding rd, int lanes, const opmath_t* xn, float* zn, int64_t ldzn) {
#if GATED_HAVE_VECTOR_EXT
  const simd::SgdArgs args{float(lr), float(momentum), float(weight_decay), nesterov,
                           rd.stochastic, rd.mix};
  if constexpr (std::is_same_v<scalar_t, float>) {
    return simd::skinny_grad_sgd_fwd(w, buf, index0, a, lda, x, nr, rows, D, args, xn, zn, ldzn,
                                     lanes);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return simd::skinny_grad_sgd_fwd(reinterpret_cast<uint16_t*>(w),
                                     reinterpret_cast<uint16_t*>(buf), index0, a, lda, x, nr,
                                     rows, D, args, xn, zn, ldzn, lanes);
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "fused_grad_sgd_fwd: float32 or bfloat16 weights");
}

// Up to this many rows of dZ per weight (ns * B), gradient rows are rank-nr updates formed in
// registers by grad_sgd_row; above it, blocked plans take one GEMM per block (hidden layer and
// decoders: K * B = 800 rows) and grouped plans one GEMM per weight.
constexpr int64_t kSkinnyRows = 64;

// The update, and with x_next (pathway_sgd_lookahead_) the next forward's Z from the updated
// weight: fused into the update's pass where the skinny kernels run (see skinny_grad_sgd_fwd),
// else a forward (compute_z) after it. Returns that Z, or an undefined tensor.
Tensor sgd_cpu(const Tensor& dz_, const Tensor& x_, const Tensor& w,
               const c10::optional<Tensor>& buf, const Tensor& paths, const Tensor& csr,
               at::IntArrayRef layout, double lr, double momentum, double weight_decay,
               bool nesterov, int64_t rounding_seed, const c10::optional<Tensor>& rounding_step,
               const Tensor* x_next_) {
  TORCH_CHECK(x_.dim() == 3 && w.dim() == 3, "x, weight: expected 3-D tensors");
  const NoAutocast no_autocast;
  check_sgd_state(w, "weight", buf, momentum, x_);
  if (x_next_) check_x_next(*x_next_, x_);
  const Rounding rd = rounding_for(rounding_seed, rounding_step, w, "weights").resolved();
  check_float(dz_, "grad_z", x_.scalar_type());
  const Tensor dz = dz_.contiguous(), x = x_.contiguous();
  const Plan p = cpu_plan(paths, csr, layout, x.size(0), w.size(0), x);
  const int64_t B = x.size(1), Do = w.size(1), Di = w.size(2);
  check_grad_z(dz, p, B, Do);
  const int64_t ldz = dz.size(1);
  const Tensor xg = (!p.blocked() && p.P > 0 && B > 0) ? gather_sources(p, x) : Tensor();
  if (p.blocked() && (p.ns * B > kSkinnyRows || !use_skinny_blocked(w.scalar_type()))) {
    // Wide blocks (the k-path hidden layer: 800 rows): one multi-threaded GEMM per block for
    // all its nm weights, G = dZ_i^T X_i (nm*D_out, D_in), then the update row by row. (16-bit
    // weights: G is the GEMM's fp32 accumulation rounded to the weight's dtype.) Many narrow
    // blocks (encoders without the skinny kernels) take one batched GEMM for all of them.
    GATED_CPU_DISPATCH(w.scalar_type(), "pathway_sgd_cpu", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      scalar_t* W = w.data_ptr<scalar_t>();
      scalar_t* BUF = buf ? buf->data_ptr<scalar_t>() : nullptr;
      const opmath_t lr_ = lr, mom_ = momentum, wd_ = weight_decay;
      const scalar_t* no_grad = nullptr;
      const int64_t rows = p.nm * Do;
      const bool batched = p.n > 1 && p.ns * B <= kSkinnyRows;
      const Tensor Gall = batched ? gemm(dz.view({p.n, p.ns * B, rows}).transpose(1, 2),
                                         x_blocks(p, x))
                                  : Tensor();
      for (int64_t i = 0; i < (batched ? 1 : p.n); ++i) {
        const Tensor G = batched ? Gall
                                 : gemm(dz.narrow(0, i * p.ns * B, p.ns * B).t(),
                                        x.narrow(0, p.s0 + i * p.ns, p.ns).view({p.ns * B, Di}));
        const scalar_t* g = G.data_ptr<scalar_t>();
        const int64_t off = (p.m0 + i * p.nm) * Do * Di;
        at::parallel_for(0, (batched ? p.n : 1) * rows, 16, [&](int64_t r0, int64_t r1) {
          sgd_rows<scalar_t>(W + off + r0 * Di, BUF ? BUF + off + r0 * Di : nullptr,
                             g + r0 * Di, (r1 - r0) * Di, lr_, mom_, wd_, nesterov,
                             off + r0 * Di, rd);
        });
      }
      // weights outside the blocks: zero gradient (decay and momentum still apply)
      for (const auto& [m0, m1] : {std::pair<int64_t, int64_t>{0, p.m0},
                                   std::pair<int64_t, int64_t>{p.m0 + p.n * p.nm, p.M}}) {
        if (m1 > m0)
          sgd_rows<scalar_t>(W + m0 * Do * Di, BUF ? BUF + m0 * Do * Di : nullptr, no_grad,
                             (m1 - m0) * Do * Di, lr_, mom_, wd_, nesterov, m0 * Do * Di, rd);
      }
    });
    return x_next_ ? compute_z(p, x_next_->contiguous(), w) : Tensor();
  }
  // The lookahead fused into the skinny update: blocked, at most 8 rows per block in both
  // batches, float32 or bfloat16 (the forward takes the same skinny kernels then: compute_z).
  const Tensor x_next = x_next_ ? x_next_->contiguous() : Tensor();
  const bool fuse = x_next_ && GATED_HAVE_VECTOR_EXT && p.blocked() && x_next.size(1) == B &&
                    p.ns * B <= 8 &&
                    (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16);
  Tensor zn = fuse ? at::empty({p.z_rows(B), p.z_cols(Do)}, x.options().dtype(at::kFloat))
                   : Tensor();
  float* ZN = fuse ? zn.data_ptr<float>() : nullptr;
  const int64_t ldzn = p.z_cols(Do);
  GATED_CPU_DISPATCH(w.scalar_type(), "pathway_sgd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* W = w.data_ptr<scalar_t>();
    scalar_t* BUF = buf ? buf->data_ptr<scalar_t>() : nullptr;
    // The skinny gradient rows are formed from dZ and x in opmath_t. 16-bit ones are widened:
    // for blocked plans (every block skinny here) a weight's few rows at a time into
    // thread-local buffers that stay in cache (the k-path encoder: 8 x 784 values of x per
    // weight), else once for the whole call. (Whole-call copies of x and dZ in float cost
    // 1.3 ms of the bf16 k-path step at H=128 in a profile: allocation, page faults and a
    // pass over 2.5 MB written and read back.)
    constexpr bool kWiden = !std::is_same_v<scalar_t, opmath_t>;
    const bool local = kWiden && p.blocked();
    const auto op_type = c10::CppTypeToScalarType<opmath_t>::value;
    const Tensor dzo = local ? Tensor() : dz.to(op_type);
    const Tensor xo = local ? Tensor() : (xg.defined() ? xg : x).to(op_type);
    const opmath_t* DZ = local ? nullptr : dzo.const_data_ptr<opmath_t>();
    const opmath_t lr_ = lr, mom_ = momentum, wd_ = weight_decay;
    const scalar_t* no_grad = nullptr;
#if GATED_HAVE_VECTOR_EXT
    const int lanes = simd::skinny_lanes();
#else
    const int lanes = 0;
#endif
    parallel_for_aten(0, p.M, 1, [&](int64_t m0, int64_t m1) {
      Tensor gm;  // scratch (Do, Di) for the GEMM path
      std::vector<opmath_t> xbuf, abuf, xnbuf;  // this weight's widened rows of x, dZ, x_next
      for (int64_t m = m0; m < m1; ++m) {
        // The rows of dZ (nr of them, starting at dz_m, columns from col0) and of x that feed
        // W[m]; nr = 0 when no pathway uses it (zero gradient: decay and momentum still apply).
        int64_t nr = 0, row0 = 0, col0 = 0, xrow0 = 0;  // xrow0: first row of xo
        if (p.blocked()) {
          const int64_t j = m - p.m0;
          if (j >= 0 && j < p.n * p.nm) {
            const int64_t i = j / p.nm;
            nr = p.ns * B; row0 = i * p.ns * B; col0 = (j % p.nm) * Do;
            xrow0 = (p.s0 + i * p.ns) * B;
          }
        } else if (B > 0) {
          nr = (p.wgt_ptr[m + 1] - p.wgt_ptr[m]) * B; row0 = xrow0 = p.wgt_ptr[m] * B;
        }
        scalar_t* wm = W + m * Do * Di;
        scalar_t* bm = BUF ? BUF + m * Do * Di : nullptr;
        const opmath_t *dzm = nullptr, *xm = nullptr;
        int64_t lda = ldz;  // dzm's row stride
        if (local && nr > 0) {
          TORCH_INTERNAL_ASSERT(nr <= kSkinnyRows);  // (wide blocked plans returned above)
          xbuf.resize(nr * Di);
          abuf.resize(nr * Do);
          const scalar_t* xs = x.const_data_ptr<scalar_t>() + xrow0 * Di;
          for (int64_t i = 0; i < nr * Di; ++i) xbuf[i] = opmath_t(xs[i]);
          const scalar_t* ds = dz.const_data_ptr<scalar_t>() + row0 * ldz + col0;
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t o = 0; o < Do; ++o) abuf[r * Do + o] = opmath_t(ds[r * ldz + o]);
          dzm = abuf.data();
          xm = xbuf.data();
          lda = Do;
        } else if (!local) {
          dzm = DZ + row0 * ldz + col0;
          xm = xo.const_data_ptr<opmath_t>() + xrow0 * Di;
        }
        if (nr == 0) {
          sgd_rows<scalar_t>(wm, bm, no_grad, Do * Di, lr_, mom_, wd_, nesterov, m * Do * Di, rd);
        } else if (fuse) {
          const scalar_t* xs = x_next.const_data_ptr<scalar_t>() + xrow0 * Di;
          const opmath_t* xn = reinterpret_cast<const opmath_t*>(xs);
          if constexpr (kWiden) {
            xnbuf.resize(nr * Di);
            for (int64_t i = 0; i < nr * Di; ++i) xnbuf[i] = opmath_t(xs[i]);
            xn = xnbuf.data();
          }
          fused_grad_sgd_fwd(wm, bm, m * Do * Di, dzm, lda, xm, nr, Do, Di, lr, momentum,
                             weight_decay, nesterov, rd, lanes, xn, ZN + row0 * ldzn + col0,
                             ldzn);
        } else if (nr <= kSkinnyRows) {
          if (try_skinny_grad_sgd(wm, bm, m * Do * Di, dzm, lda, xm, nr, Do, Di, lr, momentum,
                                  weight_decay, nesterov, rd, lanes))
            continue;
          for (int64_t o = 0; o < Do; ++o) {
            grad_sgd_row<scalar_t>(wm + o * Di, bm ? bm + o * Di : nullptr, dzm + o, lda, xm, nr,
                                   Di, lr_, mom_, wd_, nesterov, (m * Do + o) * Di, rd);
          }
        } else {
          // G in opmath_t from the widened operands (a 16-bit GEMM would round G)
          if (!gm.defined()) gm = at::empty({Do, Di}, xo.options());
          const Tensor dzt = dzo.narrow(0, row0, nr).narrow(1, col0, Do).t();
          at::mm_out(gm, dzt, xo.narrow(0, xrow0, nr));
          sgd_rows<scalar_t, opmath_t>(wm, bm, gm.const_data_ptr<opmath_t>(), Do * Di, lr_, mom_,
                                       wd_, nesterov, m * Do * Di, rd);
        }
      }
    });
  });
  if (!x_next_) return Tensor();
  if (!fuse) return compute_z(p, x_next, w);
  return w.scalar_type() == at::kFloat ? zn : zn.to(w.scalar_type());
}

// The weight's step, and with a bias the bias's (pathway_bias_sgd_'s bits; checked first).
Tensor layer_sgd_cpu(const Tensor& dz, const Tensor& x, const Tensor& w,
                     const c10::optional<Tensor>& buf, const Tensor& paths, const Tensor& csr,
                     at::IntArrayRef layout, double lr, double momentum, double weight_decay,
                     bool nesterov, int64_t rounding_seed,
                     const c10::optional<Tensor>& rounding_step, const Tensor* x_next,
                     const c10::optional<Tensor>& bias, const c10::optional<Tensor>& bias_buf,
                     int64_t bias_rounding_seed) {
  TORCH_CHECK(w.dim() == 3, "weight: expected (M, D_out, D_in), got shape ", w.sizes());
  check_layer_bias(bias, bias_buf, w, momentum, bias_rounding_seed, rounding_step, x);
  Tensor z = sgd_cpu(dz, x, w, buf, paths, csr, layout, lr, momentum, weight_decay, nesterov,
                     rounding_seed, rounding_step, x_next);
  if (bias) {
    pathway_bias_sgd_cpu(dz, *bias, bias_buf, paths, csr, layout, x.size(0), w.size(0), lr,
                         momentum, weight_decay, nesterov, bias_rounding_seed, rounding_step);
  }
  return z;
}

}  // namespace

void pathway_sgd_cpu(const Tensor& dz, const Tensor& x, const Tensor& w,
                     const c10::optional<Tensor>& buf, const Tensor& paths, const Tensor& csr,
                     at::IntArrayRef layout, double lr, double momentum, double weight_decay,
                     bool nesterov, int64_t rounding_seed,
                     const c10::optional<Tensor>& rounding_step,
                     const c10::optional<Tensor>& bias, const c10::optional<Tensor>& bias_buf,
                     int64_t bias_rounding_seed) {
  layer_sgd_cpu(dz, x, w, buf, paths, csr, layout, lr, momentum, weight_decay, nesterov,
                rounding_seed, rounding_step, nullptr, bias, bias_buf, bias_rounding_seed);
}

// pathway_sgd_ and then Z_next = every pathway's pre-gate output for x_next from the updated
// weight, without bias (compute_z's result; the layer adds bias and gate): for blocked plans
// on the skinny kernels, in the update's one pass over the weight.
Tensor pathway_sgd_lookahead_cpu(const Tensor& dz, const Tensor& x, const Tensor& w,
                                 const c10::optional<Tensor>& buf, const Tensor& paths,
                                 const Tensor& csr, at::IntArrayRef layout, double lr,
                                 double momentum, double weight_decay, bool nesterov,
                                 int64_t rounding_seed, const Tensor& x_next,
                                 const c10::optional<Tensor>& rounding_step,
                                 const c10::optional<Tensor>& bias,
                                 const c10::optional<Tensor>& bias_buf,
                                 int64_t bias_rounding_seed) {
  return layer_sgd_cpu(dz, x, w, buf, paths, csr, layout, lr, momentum, weight_decay, nesterov,
                       rounding_seed, rounding_step, &x_next, bias, bias_buf,
                       bias_rounding_seed);
}

// The bias's share of the fused SGD step: grad_bias (pathway_grad_bias, accumulated in float for
// 16-bit storage and not rounded) and torch.optim.SGD's step, in place, in one call.
void pathway_bias_sgd_cpu(const Tensor& dz_, const Tensor& bias, const c10::optional<Tensor>& buf,
                          const Tensor& paths, const Tensor& csr, at::IntArrayRef layout,
                          int64_t num_sources, int64_t num_weights, double lr, double momentum,
                          double weight_decay, bool nesterov, int64_t rounding_seed,
                          const c10::optional<Tensor>& rounding_step) {
  check_bias_sgd(bias, num_weights);
  check_sgd_state(bias, "bias", buf, momentum, dz_);
  const Rounding rd = rounding_for(rounding_seed, rounding_step, bias, "biases").resolved();
  const auto op_type = at::isReducedFloatingType(dz_.scalar_type()) ? at::kFloat
                                                                     : dz_.scalar_type();
  const Tensor gb = grad_bias_sums(dz_, paths, csr, layout, num_sources, num_weights,
                                   bias.size(1), op_type);
  GATED_CPU_DISPATCH(bias.scalar_type(), "pathway_bias_sgd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    sgd_rows<scalar_t, opmath_t>(bias.data_ptr<scalar_t>(),
                                 buf ? buf->data_ptr<scalar_t>() : nullptr,
                                 gb.const_data_ptr<opmath_t>(), bias.numel(), lr, momentum,
                                 weight_decay, nesterov, 0, rd);
  });
}

}  // namespace cpu
}  // namespace gated_ops

// The forward on the CPU: pathway_matmul, and compute_z (every pathway's pre-gate output Z),
// which the gate gradient and the lookahead share. cpu/common.h says how the CPU kernels work.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu/common.h"

namespace gated_ops {
namespace cpu {
namespace {

// At most this many activation rows per block (ns * B) take the skinny float32 forward
// (simd::skinny_xwt, the k-path encoders: 8); wider blocks go to BLAS.
constexpr int64_t kSkinnyForwardRows = 16;

}  // namespace

// Z (z_rows, z_cols): every pathway's pre-gate output x[s_p] @ W[m_p]^T, without bias, in x's
// dtype. x and w contiguous.
Tensor compute_z(const Plan& p, const Tensor& x, const Tensor& w) {
  const NoAutocast no_autocast;
  const int64_t B = x.size(1);
#if GATED_HAVE_VECTOR_EXT
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (p.blocked() && (x.scalar_type() == at::kFloat || bf16) && p.ns * B <= kSkinnyForwardRows &&
      use_skinny_blocked(x.scalar_type())) {
    // One task per (block, 32 weight rows): each weight row is streamed once, x stays in L1.
    // bfloat16: the weights are read as stored (half the bytes) and widened in registers; the
    // few activation rows are widened once up front and Z is rounded once at the end.
    const int64_t nx = p.ns * B, rows = p.nm * w.size(1), D = x.size(2);
    Tensor z = at::empty({p.z_rows(B), p.z_cols(w.size(1))}, x.options().dtype(at::kFloat));
    if (z.numel() == 0) return z.to(x.scalar_type());
    if (D == 0) return z.zero_().to(x.scalar_type());
    const Tensor xf = x.narrow(0, p.s0, p.n * p.ns).to(at::kFloat).contiguous();
    const float* X = xf.const_data_ptr<float>();
    const int64_t w0 = p.m0 * w.size(1) * D;
    float* Z = z.data_ptr<float>();
    constexpr int64_t kRowsPerTask = 32;
    const int lanes = simd::skinny_lanes();
    const int64_t chunks = (rows + kRowsPerTask - 1) / kRowsPerTask;
    at::parallel_for(0, p.n * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k = t / chunks, r0 = (t % chunks) * kRowsPerTask;
        const int64_t nw = std::min(kRowsPerTask, rows - r0), wo = w0 + (k * rows + r0) * D;
        float* zk = Z + k * nx * rows + r0;
        if (bf16) {
          simd::skinny_xwt(X + k * nx * D, nx, bf16_bits(w) + wo, nw, D, zk, rows, lanes);
        } else {
          simd::skinny_xwt(X + k * nx * D, nx, w.const_data_ptr<float>() + wo, nw, D, zk, rows,
                           lanes);
        }
      }
    });
    return bf16 ? z.to(at::kBFloat16) : z;
  }
#endif
  if (p.blocked()) {
    return gemm(x_blocks(p, x), w_blocks(p, w).transpose(1, 2))
        .view({p.z_rows(B), p.z_cols(w.size(1))});
  }
  Tensor z = at::empty({p.z_rows(B), w.size(1)}, x.options());
  if (p.P == 0 || B == 0) return z;
  Tensor xg = gather_sources(p, x);
  for_each_weight_group(p, B, [&](int64_t m, int64_t r0, int64_t rows) {
    Tensor out = z.narrow(0, r0, rows);
    gemm_out(out, xg.narrow(0, r0, rows), w[m].t());
  });
  return z;
}

// ---------------------------------------------------------------------------------------------
// pathway_matmul: y[t] = sum_{p: t_p = t} gate[p] * (Z_p + bias[m_p])
Tensor pathway_matmul_cpu(const Tensor& x_, const Tensor& w_, const c10::optional<Tensor>& bias_,
                          const c10::optional<Tensor>& gate_, const Tensor& paths,
                          const Tensor& csr, at::IntArrayRef layout) {
  check_data(x_, w_, bias_);
  check_cpu_dtype(x_, "x");
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  const Plan p = cpu_plan(paths, csr, layout, x.size(0), w.size(0), x);
  check_gate(gate_, x, p.P, x.size(1));
  const int64_t B = x.size(1), Do = w.size(1);
  if (p.P == 0 || B == 0 || Do == 0) return at::zeros({p.T, B, Do}, x.options());
  // Z is y itself when each destination is exactly one pathway's Z block, in Z's order
  // (blocked, nm = 1: the k-path encoders, the hidden layer, the wide decoder): the epilogue
  // then works in place, and an ungated layer without bias does no pass at all.
  const bool in_place = p.z_is_y();
  const Tensor z = compute_z(p, x, w);
  // (otherwise every row of y is written below: no zero fill)
  Tensor y = in_place ? z.view({p.T, B, Do}) : at::empty({p.T, B, Do}, x.options());
  const Tensor bias = bias_ ? bias_->contiguous() : Tensor();
  const Tensor gate = gate_ ? gate_->contiguous() : Tensor();
  const bool per_sample = gate.defined() && gate.dim() == 2;
  const int64_t ldz = z.size(1);
  GATED_CPU_DISPATCH(x.scalar_type(), "pathway_matmul_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* Z = z.data_ptr<scalar_t>();
    const scalar_t* bi = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = gate.defined() ? gate.data_ptr<scalar_t>() : nullptr;
    scalar_t* Y = y.data_ptr<scalar_t>();
    if (p.one_per_dst()) {  // every k-path layer: y is a gated, biased copy of Z, in Z order
      // One task item per pathway (Z's row block rb, column block cb): its B rows of D_out
      // floats, with the bias / gate cases compiled separately (the decoder's 10-float rows
      // made the per-row branches and lookups cost several times the copy itself).
      const int64_t ncb = p.blocked() ? p.nm : 1;
      auto copy_blocks = [&](auto has_bias, auto gate_kind) {
        at::parallel_for(0, p.z_rows(1) * ncb, grain_for(B * Do), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t q = p.owner[i];
            const scalar_t* zq = Z + (i / ncb) * B * ldz + (i % ncb) * Do;
            const scalar_t* bq = has_bias ? bi + p.wgt[q] * Do : nullptr;
            scalar_t* yq = Y + p.dst[q] * B * Do;
            for (int64_t b = 0; b < B; ++b) {
              const scalar_t* zr = zq + b * ldz;
              scalar_t* yr = yq + b * Do;  // == zr when in place (elementwise: safe)
              if constexpr (decltype(gate_kind)::value == 0 && !decltype(has_bias)::value) {
                if (!in_place) std::memcpy(yr, zr, Do * sizeof(scalar_t));
              } else {
                opmath_t gv = 1;
                if constexpr (decltype(gate_kind)::value == 1) gv = g[q];
                if constexpr (decltype(gate_kind)::value == 2) gv = g[q * B + b];
                for (int64_t o = 0; o < Do; ++o) {
                  if constexpr (decltype(has_bias)::value) {
                    yr[o] = gv * (opmath_t(zr[o]) + opmath_t(bq[o]));
                  } else {
                    yr[o] = gv * opmath_t(zr[o]);
                  }
                }
              }
            }
          }
        });
      };
      using T0 = std::integral_constant<int, 0>;
      using T1 = std::integral_constant<int, 1>;
      using T2 = std::integral_constant<int, 2>;
      const bool hb = bi != nullptr;
      const int gk = g ? (per_sample ? 2 : 1) : 0;
      if (in_place && !hb && gk == 0) return;  // y is Z
      if (hb) {
        if (gk == 0) copy_blocks(std::true_type{}, T0{});
        else if (gk == 1) copy_blocks(std::true_type{}, T1{});
        else copy_blocks(std::true_type{}, T2{});
      } else {
        if (gk == 0) copy_blocks(std::false_type{}, T0{});
        else if (gk == 1) copy_blocks(std::false_type{}, T1{});
        else copy_blocks(std::false_type{}, T2{});
      }
      return;
    }
    // over (destination, batch row) pairs: an MoE layer has T = 1 destination
    const int64_t per_row = Do * std::max<int64_t>(1, p.P / std::max<int64_t>(1, p.T));
    at::parallel_for(0, p.T * B, grain_for(per_row), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = i / B, b = i % B;
        scalar_t* yr = Y + i * Do;
        if (p.dst_ptr[t] == p.dst_ptr[t + 1]) std::fill(yr, yr + Do, scalar_t(0));
        // The first pathway into t assigns, the others add: a fixed order (the table's).
        for (int64_t k = p.dst_ptr[t]; k < p.dst_ptr[t + 1]; ++k) {
          const int64_t q = p.dst_perm[k];
          const bool first = k == p.dst_ptr[t];
          const scalar_t* zr = Z + (p.zrow[q] * B + b) * ldz + p.zcol[q] * Do;
          const scalar_t* bq = bi ? bi + p.wgt[q] * Do : nullptr;
          const opmath_t gv = g ? (per_sample ? g[q * B + b] : g[q]) : scalar_t(1);
          for (int64_t o = 0; o < Do; ++o) {
            const opmath_t v = gv * (opmath_t(zr[o]) + (bq ? opmath_t(bq[o]) : opmath_t(0)));
            yr[o] = first ? v : opmath_t(yr[o]) + v;
          }
        }
      }
    });
  });
  return y;
}

}  // namespace cpu
}  // namespace gated_ops

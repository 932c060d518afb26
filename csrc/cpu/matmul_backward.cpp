// The backward on the CPU: the gradients of pathway_matmul with respect to Z, x, the weights,
// the biases and the gate (and x and the gate together). cpu/common.h says how the CPU kernels
// work.
#include <ATen/AccumulateType.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/common.h"

namespace gated_ops {
namespace cpu {
namespace {

// acc[c] = sum over rows r of a[r * lda + c] for c < nc, in opmath: rows in chunks of 8 summed
// apart and then added (a chain of rows / 8 + 8 additions), vectorised over the columns.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
GATED_TARGET_CLONES void column_sums(const scalar_t* a, int64_t lda, int64_t rows, int64_t nc,
                                     opmath_t* acc) {
  constexpr int64_t kChunk = 8, kMax = 256;
  opmath_t part[kMax];
  std::fill(acc, acc + nc, opmath_t(0));
  for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
    std::fill(part, part + nc, opmath_t(0));
    for (int64_t r = r0; r < std::min(rows, r0 + kChunk); ++r) {
      const scalar_t* row = a + r * lda;
      for (int64_t c = 0; c < nc; ++c) part[c] += opmath_t(row[c]);
    }
    for (int64_t c = 0; c < nc; ++c) acc[c] += part[c];
  }
}

// sum_i a[i] * b[i] in acc_t, 16 interleaved partial sums added pairwise: vectorised without
// reassociating (each lane's chain is fixed), the same order on every call.
template <typename acc_t, typename T>
inline acc_t dot_blocked(const T* a, const T* b, int64_t n) {
  constexpr int L = 16;
  acc_t part[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) part[l] += acc_t(a[i + l]) * acc_t(b[i + l]);
  }
  for (int l = 0; i < n; ++i, ++l) part[l] += acc_t(a[i]) * acc_t(b[i]);
  for (int w = L / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  }
  return part[0];
}

}  // namespace

// dZ_p = gate[p] * grad_y[t_p], laid out like Z. Every Z cell belongs to exactly one pathway.
Tensor pathway_grad_z_cpu(const Tensor& grad_y_, const c10::optional<Tensor>& gate_,
                          const Tensor& paths, const Tensor& csr, at::IntArrayRef layout,
                          int64_t num_sources, int64_t num_weights) {
  TORCH_CHECK(grad_y_.dim() == 3, "grad_y: expected (T, B, D_out), got shape ", grad_y_.sizes());
  check_cpu_dtype(grad_y_, "grad_y");
  const Tensor gy = grad_y_.contiguous();
  const Plan p = cpu_plan(paths, csr, layout, num_sources, num_weights, gy);
  TORCH_CHECK(gy.size(0) == p.T, "grad_y: expected T = ", p.T, " destinations, got shape ",
              gy.sizes());
  const int64_t B = gy.size(1), Do = gy.size(2);
  check_gate(gate_, gy, p.P, B);
  Tensor dz = at::empty({p.z_rows(B), p.z_cols(Do)}, gy.options());
  if (dz.numel() == 0) return dz;
  const Tensor gate = gate_ ? gate_->contiguous() : Tensor();
  const bool per_sample = gate.defined() && gate.dim() == 2;
  const int64_t ldz = dz.size(1);
  GATED_CPU_DISPATCH(gy.scalar_type(), "pathway_grad_z_cpu", [&] {
    const scalar_t* GY = gy.data_ptr<scalar_t>();
    const scalar_t* g = gate.defined() ? gate.data_ptr<scalar_t>() : nullptr;
    scalar_t* DZ = dz.data_ptr<scalar_t>();
    at::parallel_for(0, p.P, grain_for(B * Do), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        scalar_t* dq = DZ + p.zrow[q] * B * ldz + p.zcol[q] * Do;
        const scalar_t* gq = GY + p.dst[q] * B * Do;
        if (!g) {  // no gate: plain row copies (the k-path layers)
          for (int64_t b = 0; b < B; ++b)
            std::memcpy(dq + b * ldz, gq + b * Do, Do * sizeof(scalar_t));
          continue;
        }
        for (int64_t b = 0; b < B; ++b) {
          const at::opmath_type<scalar_t> gv = per_sample ? g[q * B + b] : g[q];
          const scalar_t* gr = gq + b * Do;
          scalar_t* dr = dq + b * ldz;
          for (int64_t o = 0; o < Do; ++o) dr[o] = gv * gr[o];
        }
      }
    });
  });
  return dz;
}

// grad_x[s] = sum_{p: s_p = s} dZ_p @ W[m_p]
Tensor pathway_grad_x_cpu(const Tensor& dz_, const Tensor& w_, const Tensor& paths,
                          const Tensor& csr, at::IntArrayRef layout, int64_t num_sources,
                          int64_t batch) {
  TORCH_CHECK(w_.dim() == 3, "weight: expected (M, D_out, D_in), got shape ", w_.sizes());
  check_float(dz_, "grad_z", w_.scalar_type());
  const Tensor dz = dz_.contiguous(), w = w_.contiguous();
  const Plan p = cpu_plan(paths, csr, layout, num_sources, w.size(0), w);
  const int64_t B = batch, Do = w.size(1), Di = w.size(2);
  check_grad_z(dz, p, B, Do);
  const bool covers = p.blocked() && p.n * p.ns == p.S;
  Tensor gx = covers ? at::empty({p.S, B, Di}, w.options()) : at::zeros({p.S, B, Di}, w.options());
  if (p.P == 0 || B == 0) return gx;
  if (p.blocked()) {
    Tensor out = x_blocks(p, gx);
    gemm_out(out, dz.view({p.n, p.ns * B, p.nm * Do}), w_blocks(p, w));
    return gx;
  }
  Tensor dxg = at::empty({p.P * B, Di}, w.options());  // per pathway, by-weight order
  for_each_weight_group(p, B, [&](int64_t m, int64_t r0, int64_t rows) {
    Tensor out = dxg.narrow(0, r0, rows);
    gemm_out(out, dz.narrow(0, r0, rows), w[m]);
  });
  GATED_CPU_DISPATCH(w.scalar_type(), "pathway_grad_x_cpu", [&] {
    const scalar_t* D = dxg.data_ptr<scalar_t>();
    scalar_t* GX = gx.data_ptr<scalar_t>();
    const int64_t row = B * Di;
    at::parallel_for(0, p.S, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        scalar_t* out = GX + s * row;
        for (int64_t k = p.src_ptr[s]; k < p.src_ptr[s + 1]; ++k) {
          const scalar_t* in = D + p.zrow[p.src_perm[k]] * row;
          for (int64_t i = 0; i < row; ++i) out[i] = at::opmath_type<scalar_t>(out[i]) + in[i];
        }
      }
    });
  });
  return gx;
}

// grad_W[m] = sum_{p: m_p = m} dZ_p^T @ x[s_p]
Tensor pathway_grad_weight_cpu(const Tensor& dz_, const Tensor& x_, const Tensor& paths,
                               const Tensor& csr, at::IntArrayRef layout, int64_t num_weights,
                               int64_t d_out) {
  TORCH_CHECK(x_.dim() == 3, "x: expected (S, B, D_in), got shape ", x_.sizes());
  check_float(dz_, "grad_z", x_.scalar_type());
  const Tensor dz = dz_.contiguous(), x = x_.contiguous();
  const Plan p = cpu_plan(paths, csr, layout, x.size(0), num_weights, x);
  const int64_t B = x.size(1), Di = x.size(2), Do = d_out;
  check_grad_z(dz, p, B, Do);
  const bool covers = p.blocked() && p.n * p.nm == p.M;
  if (p.P == 0 || B == 0) return at::zeros({p.M, Do, Di}, x.options());
  Tensor gw = covers ? at::empty({p.M, Do, Di}, x.options()) : at::zeros({p.M, Do, Di}, x.options());
  if (p.blocked()) {
    Tensor out = w_blocks(p, gw);
    gemm_out(out, dz.view({p.n, p.ns * B, p.nm * Do}).transpose(1, 2), x_blocks(p, x));
    return gw;
  }
  Tensor xg = gather_sources(p, x);
  for_each_weight_group(p, B, [&](int64_t m, int64_t r0, int64_t rows) {
    Tensor out = gw[m];
    gemm_out(out, dz.narrow(0, r0, rows).t(), xg.narrow(0, r0, rows));
  });
  return gw;
}

// grad_bias[m] = sum_{p: m_p = m} sum_b dZ_p[b], summed in opmath and stored as out_type (dZ's
// dtype, or float for the bias step of 16-bit storage: no rounding, no widened copy of dZ).
Tensor grad_bias_sums(const Tensor& dz_, const Tensor& paths, const Tensor& csr,
                      at::IntArrayRef layout, int64_t num_sources, int64_t num_weights,
                      int64_t d_out, at::ScalarType out_type) {
  const Tensor dz = dz_.contiguous();
  const Plan p = cpu_plan(paths, csr, layout, num_sources, num_weights, dz);
  const int64_t Do = d_out;
  const int64_t B = grad_z_batch(dz, p, Do);
  Tensor gb = at::zeros({p.M, Do}, dz.options().dtype(out_type));
  if (p.P == 0 || B == 0) return gb;
  const int64_t ldz = dz.size(1);
  GATED_CPU_DISPATCH(dz.scalar_type(), "pathway_grad_bias_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* DZ = dz.data_ptr<scalar_t>();
    // one output element of opmath sums: stored as dZ's type or as opmath (out_type)
    auto store = [&](int64_t at, const opmath_t* v, int64_t n) {
      if (out_type == dz.scalar_type()) {
        std::copy(v, v + n, gb.data_ptr<scalar_t>() + at);
      } else {
        std::copy(v, v + n, gb.data_ptr<opmath_t>() + at);
      }
    };
    if (p.blocked() && out_type == dz.scalar_type()) {  // ATen's vectorised cascade sum
      gb.narrow(0, p.m0, p.n * p.nm).view({p.n, p.nm, Do})
          .copy_(dz.view({p.n, p.ns * B, p.nm, Do}).sum(1));
      return;
    }
    if (p.blocked()) {
      // 16-bit dZ summed in float without a widened copy of dZ (at::sum with a float dtype
      // makes one): each block's ns*B rows over 256-column tiles, in parallel.
      constexpr int64_t kCols = 256;
      const int64_t rows = p.ns * B, cols = p.nm * Do, nct = (cols + kCols - 1) / kCols;
      at::parallel_for(0, p.n * nct, 1, [&](int64_t t0, int64_t t1) {
        opmath_t acc[kCols];
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = t / nct, c0 = (t % nct) * kCols, nc = std::min(kCols, cols - c0);
          column_sums(DZ + i * rows * ldz + c0, ldz, rows, nc, acc);
          store((p.m0 + i * p.nm) * Do + c0, acc, nc);
        }
      });
      return;
    }
    at::parallel_for(0, p.M, 1, [&](int64_t m0, int64_t m1) {
      std::vector<opmath_t> acc(Do);
      for (int64_t m = m0; m < m1; ++m) {
        std::fill(acc.begin(), acc.end(), 0);
        for (int64_t k = p.wgt_ptr[m]; k < p.wgt_ptr[m + 1]; ++k) {
          const int64_t q = p.wgt_perm[k];
          const scalar_t* dq = DZ + p.zrow[q] * B * ldz + p.zcol[q] * Do;
          for (int64_t b = 0; b < B; ++b)
            for (int64_t o = 0; o < Do; ++o) acc[o] += dq[b * ldz + o];
        }
        store(m * Do, acc.data(), Do);
      }
    });
  });
  return gb;
}

Tensor pathway_grad_bias_cpu(const Tensor& dz, const Tensor& paths, const Tensor& csr,
                             at::IntArrayRef layout, int64_t num_sources, int64_t num_weights,
                             int64_t d_out) {
  return grad_bias_sums(dz, paths, csr, layout, num_sources, num_weights, d_out,
                        dz.scalar_type());
}

// grad_gate[p, b] = <grad_y[t_p, b], Z_p[b] + bias[m_p]>  (summed over b for a (P,) gate)
Tensor pathway_grad_gate_cpu(const Tensor& grad_y_, const Tensor& x_, const Tensor& w_,
                             const c10::optional<Tensor>& bias_, const Tensor& gate,
                             const Tensor& paths, const Tensor& csr, at::IntArrayRef layout) {
  check_data(x_, w_, bias_);
  check_cpu_dtype(x_, "x");
  const Tensor x = x_.contiguous(), w = w_.contiguous(), gy = grad_y_.contiguous();
  const Plan p = cpu_plan(paths, csr, layout, x.size(0), w.size(0), x);
  check_gate(gate, x, p.P, x.size(1));
  const int64_t B = x.size(1), Do = w.size(1);
  GATED_CHECK_SHAPE("grad_y", gy, p.T, B, Do);
  Tensor gg = at::zeros({p.P, B}, x.options());
  if (p.P > 0 && B > 0 && Do > 0) {
    const Tensor z = compute_z(p, x, w);
    const Tensor bias = bias_ ? bias_->contiguous() : Tensor();
    const int64_t ldz = z.size(1);
    GATED_CPU_DISPATCH(x.scalar_type(), "pathway_grad_gate_cpu", [&] {
      using acc_t = at::acc_type<scalar_t, false>;
      const scalar_t* Z = z.data_ptr<scalar_t>();
      const scalar_t* GY = gy.data_ptr<scalar_t>();
      const scalar_t* bi = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
      scalar_t* GG = gg.data_ptr<scalar_t>();
      at::parallel_for(0, p.P * B, grain_for(Do), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {  // (pathway, batch row) pairs
          const int64_t q = i / B, b = i % B;
          const scalar_t* zr = Z + (p.zrow[q] * B + b) * ldz + p.zcol[q] * Do;
          const scalar_t* bq = bi ? bi + p.wgt[q] * Do : nullptr;
          const scalar_t* gr = GY + (p.dst[q] * B + b) * Do;
          acc_t acc = 0;
          for (int64_t o = 0; o < Do; ++o)
            acc += acc_t(gr[o]) * (acc_t(zr[o]) + (bq ? acc_t(bq[o]) : acc_t(0)));
          GG[i] = scalar_t(acc);
        }
      });
    });
  }
  return gate.dim() == 2 ? gg : gg.sum(1);
}

// grad_x and grad_gate together, with one GEMM instead of two. Both need, per pathway and
// sample, U_p[b] = grad_y[t_p, b] @ W[m_p] (the ungated input gradient):
//   grad_x[s, b]    = sum_{p: s_p = s} gate[p, b] * U_p[b]
//   grad_gate[p, b] = <grad_y[t_p, b], Z_p[b] + bias[m_p]> = <U_p[b], x[s_p, b]> + <grad_y, bias>
// (pathway_grad_x + pathway_grad_gate compute Z and dZ @ W: two GEMMs of this size.) Used by the
// autograd backward when both gradients are needed, as in a mixture-of-experts layer whose router
// is trained; other devices run a composite of the two ops (gated_ops/ops.py).
std::tuple<Tensor, Tensor> pathway_grad_x_gate_cpu(const Tensor& grad_y_, const Tensor& x_,
                                                   const Tensor& w_,
                                                   const c10::optional<Tensor>& bias_,
                                                   const Tensor& gate_, const Tensor& paths,
                                                   const Tensor& csr, at::IntArrayRef layout) {
  check_data(x_, w_, bias_);
  check_cpu_dtype(x_, "x");
  const Tensor x = x_.contiguous(), w = w_.contiguous(), gy = grad_y_.contiguous();
  const Plan p = cpu_plan(paths, csr, layout, x.size(0), w.size(0), x);
  check_gate(gate_, x, p.P, x.size(1));
  const int64_t S = x.size(0), B = x.size(1), Di = x.size(2), Do = w.size(1);
  GATED_CHECK_SHAPE("grad_y", gy, p.T, B, Do);
  Tensor gx = at::zeros({S, B, Di}, x.options());
  Tensor gg = at::zeros({p.P, B}, x.options());
  if (p.P == 0 || B == 0) return {gx, gate_.dim() == 2 ? gg : gg.sum(1)};
  const Tensor gate = gate_.contiguous();
  const bool per_sample = gate.dim() == 2;
  const Tensor bias = bias_ ? bias_->contiguous() : Tensor();
  // U in by-weight pathway order (P*B, Di): one GEMM per weight over its pathways' rows.
  // grad_y rows in by-weight pathway order; one destination (an MoE layer): a broadcast view
  auto order = at::from_blob(const_cast<int64_t*>(p.wgt_perm), {p.P}, at::kLong);
  auto dst = at::from_blob(const_cast<int64_t*>(p.dst), {p.P}, at::kLong);
  const Tensor gyw = p.T == 1 ? gy.expand({p.P, B, Do})
                              : gy.index_select(0, dst.index_select(0, order));
  Tensor u = at::empty({p.P * B, Di}, x.options());
  bool one_per_weight = p.P == p.M;  // (then the by-weight order is the weights' order)
  for (int64_t m = 0; one_per_weight && m < p.M; ++m)
    one_per_weight = p.wgt_ptr[m + 1] - p.wgt_ptr[m] == 1;
  if (one_per_weight) {
    // one batched GEMM (an MoE layer: every expert once): BLAS threads it, where the
    // per-weight GEMMs below run one per thread (8 experts of 512x256x256, 2 threads,
    // profiled: 5.5 ms of per-weight mm -> 3.4 ms of bmm)
    Tensor out = u.view({p.P, B, Di});
    gemm_out(out, gyw, w);
  } else {
    const Tensor gyr = gyw.reshape({p.P * B, Do});
    for_each_weight_group(p, B, [&](int64_t m, int64_t r0, int64_t rows) {
      Tensor out = u.narrow(0, r0, rows);
      gemm_out(out, gyr.narrow(0, r0, rows), w[m]);
    });
  }
  std::vector<int64_t> pos(p.P);  // pathway -> its block of rows in U
  for (int64_t k = 0; k < p.P; ++k) pos[p.wgt_perm[k]] = k;
  // One pass over U: each (source, batch row) adds its pathways' gated U rows to grad_x and
  // forms their gate gradients (each pathway has one source, so each grad_gate element is
  // written once), in opmath_t with blocked dot products (vectorised; the same order for any
  // thread count).
  GATED_CPU_DISPATCH(x.scalar_type(), "pathway_grad_x_gate_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t *U = u.data_ptr<scalar_t>(), *X = x.data_ptr<scalar_t>(),
                   *GY = gy.data_ptr<scalar_t>(), *G = gate.data_ptr<scalar_t>();
    const scalar_t* bi = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t *GX = gx.data_ptr<scalar_t>(), *GG = gg.data_ptr<scalar_t>();
    const int64_t fan = std::max<int64_t>(1, p.P / std::max<int64_t>(1, S));
    at::parallel_for(0, S * B, grain_for((2 * Di + Do) * fan), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {  // (source, batch row): pathways in the table's order
        const int64_t s = i / B, b = i % B;
        scalar_t* out = GX + i * Di;
        const scalar_t* xr = X + i * Di;
        for (int64_t k = p.src_ptr[s]; k < p.src_ptr[s + 1]; ++k) {
          const int64_t q = p.src_perm[k];
          const opmath_t gv = per_sample ? G[q * B + b] : G[q];
          const scalar_t* uq = U + (pos[q] * B + b) * Di;
          for (int64_t d = 0; d < Di; ++d) out[d] = opmath_t(out[d]) + gv * opmath_t(uq[d]);
          opmath_t acc = dot_blocked<opmath_t>(uq, xr, Di);
          if (bi) {
            acc += dot_blocked<opmath_t>(GY + (p.dst[q] * B + b) * Do, bi + p.wgt[q] * Do, Do);
          }
          GG[q * B + b] = scalar_t(acc);
        }
      }
    });
  });
  return {gx, per_sample ? gg : gg.sum(1)};
}

}  // namespace cpu
}  // namespace gated_ops

// The routed (sparse) pathway matmul on the CPU: the route table (a counting sort of the active
// slots by weight), and the forward and gradients as one BLAS GEMM per weight over its slots'
// rows, so the work follows the active pathways. routed.h states the layout, cpu/common.h how
// the CPU kernels work. Every sum runs in a fixed order (slot order per output row, a weight's
// rows in slot order): deterministic for any thread count.
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/common.h"
#include "routed.h"

namespace gated_ops {
namespace cpu {
namespace {

// The slots of a call: idx (B, k) with its pathways' source and destination.
struct Slots {
  int64_t B = 0, k = 0, N = 0, P = 0;
  const int64_t* idx = nullptr;
  const int64_t* src = nullptr;  // paths rows: source, weight, destination of every pathway
  const int64_t* wgt = nullptr;
  const int64_t* dst = nullptr;
};

Slots slots_of(const Tensor& idx, const Tensor& paths) {
  Slots s;
  s.B = idx.size(0);
  s.k = idx.size(1);
  s.N = s.B * s.k;
  s.P = paths.size(1);
  s.idx = idx.data_ptr<int64_t>();
  const int64_t* pa = paths.data_ptr<int64_t>();
  s.src = pa;
  s.wgt = pa + s.P;
  s.dst = pa + 2 * s.P;
  return s;
}

// The checks of the tables a kernel reads (the route is made by pathway_route, but the
// registered ops also serve raw callers): every index in range, O(N + M).
void check_route(const RouteView& r, const Slots& s, int64_t S, int64_t T) {
  for (int64_t m = 0; m < r.M; ++m) {
    TORCH_CHECK(r.offsets[0] == 0 && r.offsets[m] <= r.offsets[m + 1],
                "route: corrupt table (offsets); rebuild it with gated_ops.make_route");
  }
  TORCH_CHECK(r.offsets[r.M] <= r.N, "route: corrupt table (offsets); rebuild it with "
              "gated_ops.make_route");
  for (int64_t i = 0; i < r.N; ++i) {
    TORCH_CHECK(r.order[i] >= 0 && r.order[i] < r.N && r.pos[i] >= 0 && r.pos[i] < r.N &&
                    r.pos[r.order[i]] == i,
                "route: corrupt table (order / pos); rebuild it with gated_ops.make_route");
  }
  for (int64_t q = r.offsets[r.M]; q < r.N; ++q) {
    TORCH_CHECK(s.idx[r.order[q]] < 0, "route: corrupt table (a used slot past offsets[M]); "
                "rebuild it with gated_ops.make_route");
  }
  for (int64_t m = 0; m < r.M; ++m) {
    for (int64_t q = r.offsets[m]; q < r.offsets[m + 1]; ++q) {
      const int64_t p = s.idx[r.order[q]];
      TORCH_CHECK(p >= 0 && p < s.P && s.wgt[p] == m, "route: corrupt table (a slot in the "
                  "group of another weight); rebuild it with gated_ops.make_route");
      TORCH_CHECK(S < 0 || (s.src[p] >= 0 && s.src[p] < S), "paths: source index ", s.src[p],
                  " of pathway ", p, " out of range [0, ", S, ")");
      TORCH_CHECK(T < 0 || (s.dst[p] >= 0 && s.dst[p] < T), "paths: destination index ",
                  s.dst[p], " of pathway ", p, " out of range [0, ", T, ")");
    }
  }
}

// Rows (valid slots, in sorted order) of x (S, B, D_in) gathered into (nv, D_in), or the first
// nv rows of a grouped x (N, D_in).
Tensor gather_rows(const Tensor& x, const RouteView& r, const Slots& s, bool grouped_in) {
  const int64_t nv = r.offsets[r.M];
  if (grouped_in) return x.narrow(0, 0, nv);
  const int64_t D = x.size(2);
  Tensor out = at::empty({nv, D}, x.options());
  const int64_t esize = x.element_size();
  const char* X = static_cast<const char*>(x.const_data_ptr());
  char* O = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, nv, grain_for(D), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t slot = r.order[q], p = s.idx[slot], b = slot / s.k;
      std::memcpy(O + q * D * esize, X + (s.src[p] * s.B + b) * D * esize, D * esize);
    }
  });
  return out;
}

// Zeroes the rows (t, b) of a (T, B, D) output that no slot of sample b reaches (by_dst: the
// slots' destinations, else their sources): the rest are written by the caller's sums.
template <typename scalar_t>
void zero_unreached_rows(scalar_t* out, const Slots& s, int64_t b, int64_t T, int64_t D,
                         bool by_dst) {
  for (int64_t t = 0; t < T; ++t) {
    bool reached = false;
    for (int64_t j = 0; j < s.k && !reached; ++j) {
      const int64_t p = s.idx[b * s.k + j];
      reached = p >= 0 && (by_dst ? s.dst[p] : s.src[p]) == t;
    }
    if (!reached) std::memset(out + (t * s.B + b) * D, 0, D * sizeof(scalar_t));
  }
}

// fn(m, q0, rows) for every weight with slots, in parallel over the weights (each GEMM on one
// thread: for an MoE layer's groups of ~128 rows x 256, 8 groups took 0.81 ms this way against
// 0.91 ms one after the other on all of BLAS's threads, 2-core Xeon).
template <typename F>
void for_each_group(const RouteView& r, const F& fn) {
  parallel_for_aten(0, r.M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t n = r.offsets[m + 1] - r.offsets[m];
      if (n > 0) fn(m, r.offsets[m], n);
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// pathway_route: a stable counting sort of the used slots by their pathway's weight.
Tensor pathway_route_cpu(const Tensor& idx_, const Tensor& paths, int64_t num_weights) {
  check_route_idx(idx_, paths, idx_);
  TORCH_CHECK(num_weights >= 0, "num_weights: expected >= 0, got ", num_weights);
  const Tensor idx = idx_.contiguous();
  const Slots s = slots_of(idx, paths);
  const int64_t N = s.N, M = num_weights;
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(s.idx[i] >= -1 && s.idx[i] < s.P, "idx: pathway index ", s.idx[i], " at (",
                i / s.k, ", ", i % s.k, ") out of range [-1, ", s.P, ") (-1 marks an unused slot)");
    if (s.idx[i] >= 0) {
      TORCH_CHECK(s.wgt[s.idx[i]] >= 0 && s.wgt[s.idx[i]] < M, "paths: weight index ",
                  s.wgt[s.idx[i]], " of pathway ", s.idx[i], " out of range [0, ", M, ")");
    }
  }
  Tensor route = at::empty({2 * N + M + 1}, idx.options());
  int64_t* order = route.data_ptr<int64_t>();
  int64_t* pos = order + N;
  int64_t* offsets = pos + N;
  std::vector<int64_t> next(M + 1, 0);
  for (int64_t i = 0; i < N; ++i) ++next[s.idx[i] >= 0 ? s.wgt[s.idx[i]] : M];
  int64_t acc = 0;
  for (int64_t m = 0; m <= M; ++m) {
    offsets[m] = acc;
    const int64_t c = next[m];
    next[m] = acc;
    acc += c;
  }
  offsets[M] = next[M];  // (the unused slots' group starts where the used ones end)
  for (int64_t i = 0; i < N; ++i) {
    const int64_t q = next[s.idx[i] >= 0 ? s.wgt[s.idx[i]] : M]++;
    order[q] = i;
    pos[i] = q;
  }
  return route;
}

// ---------------------------------------------------------------------------------------------
// routed_matmul: z[q] = x_q @ W[m]^T + bias[m] for every used slot (grouped rows, sorted), then
// y[t, b] = sum_j gate[b, j] z[pos[b k + j]] over the slots whose pathway ends in t.
std::tuple<Tensor, Tensor> routed_matmul_cpu(const Tensor& x_, const Tensor& w_,
                                             const c10::optional<Tensor>& bias_,
                                             const c10::optional<Tensor>& gate_,
                                             const Tensor& idx_, const Tensor& route,
                                             const Tensor& paths, int64_t num_dst,
                                             bool grouped_in, bool grouped_out) {
  check_route_idx(idx_, paths, x_);
  check_routed_data(x_, w_, bias_, gate_, idx_, grouped_in, grouped_out);
  check_cpu_dtype(x_, "x");
  TORCH_CHECK(num_dst >= 0, "num_dst: expected >= 0, got ", num_dst);
  const NoAutocast no_autocast;
  const Tensor x = x_.contiguous(), w = w_.contiguous(), idx = idx_.contiguous();
  const Slots s = slots_of(idx, paths);
  const RouteView r = route_view(route, s.N, w.size(0), x);
  check_route(r, s, grouped_in ? -1 : x.size(0), grouped_out ? -1 : num_dst);
  const int64_t Do = w.size(1), nv = r.offsets[r.M];
  // z: the grouped rows (N, D_out); the unused rows stay zero
  Tensor z = at::empty({s.N, Do}, x.options());
  z.narrow(0, nv, s.N - nv).zero_();
  if (nv > 0 && Do > 0) {
    const Tensor xg = gather_rows(x, r, s, grouped_in);
    for_each_group(r, [&](int64_t m, int64_t q0, int64_t n) {
      Tensor out = z.narrow(0, q0, n);
      if (bias_ && !widen_gemm(xg)) {  // the bias as the GEMM's C operand: no second pass
        at::addmm_out(out, bias_->select(0, m).expand({n, Do}), xg.narrow(0, q0, n), w[m].t());
      } else {
        gemm_out(out, xg.narrow(0, q0, n), w[m].t());
        if (bias_) out.add_(bias_->select(0, m));
      }
    });
  }
  if (grouped_out) return {z, at::empty({0}, x.options())};
  const int64_t B = s.B;
  const Tensor gate = gate_ ? gate_->contiguous() : Tensor();
  if (gate.defined() && gate.numel() > 0) {
    // (the GPU backends, which would need a host synchronisation to check, propagate the NaN)
    const Tensor bad = gate.isnan().flatten().nonzero();
    TORCH_CHECK(bad.numel() == 0, "gate: NaN routing weight at (", bad.numel() ?
                bad[0].item<int64_t>() / s.k : 0, ", ", bad.numel() ? bad[0].item<int64_t>() % s.k
                : 0, ")");
  }
  if (nv == 0 || Do == 0) return {at::zeros({num_dst, B, Do}, x.options()), z};
  // every row of y is written below (a row no slot reaches, zero): no zero fill first
  Tensor y = at::empty({num_dst, B, Do}, x.options());
  GATED_CPU_DISPATCH(x.scalar_type(), "routed_matmul_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* Z = z.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.defined() ? gate.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* Y = y.data_ptr<scalar_t>();
    // One task item per sample: its slots in order j = 0..k-1 (no two samples share a row of y)
    at::parallel_for(0, B, grain_for(s.k * Do), [&](int64_t b0, int64_t b1) {
      std::vector<opmath_t> acc(Do);
      for (int64_t b = b0; b < b1; ++b) {
        zero_unreached_rows(Y, s, b, num_dst, Do, /*by_dst=*/true);
        for (int64_t j = 0; j < s.k; ++j) {
          const int64_t slot = b * s.k + j, p = s.idx[slot];
          if (p < 0) continue;
          // the slot's destination row, accumulated in opmath over the slots that reach it
          scalar_t* yr = Y + (s.dst[p] * B + b) * Do;
          const scalar_t* zr = Z + r.pos[slot] * Do;
          const opmath_t gv = g ? static_cast<opmath_t>(g[slot]) : opmath_t(1);
          // first slot of this row among j' < j? then accumulate in opmath from y's value
          bool first = true;
          for (int64_t jj = 0; jj < j; ++jj) {
            const int64_t pp = s.idx[b * s.k + jj];
            if (pp >= 0 && s.dst[pp] == s.dst[p]) first = false;
          }
          if (!first) continue;  // (done when its first slot came by)
          for (int64_t c = 0; c < Do; ++c) acc[c] = gv * static_cast<opmath_t>(zr[c]);
          for (int64_t jj = j + 1; jj < s.k; ++jj) {
            const int64_t pp = s.idx[b * s.k + jj];
            if (pp < 0 || s.dst[pp] != s.dst[p]) continue;
            const scalar_t* zz = Z + r.pos[b * s.k + jj] * Do;
            const opmath_t gg = g ? static_cast<opmath_t>(g[b * s.k + jj]) : opmath_t(1);
            for (int64_t c = 0; c < Do; ++c) acc[c] += gg * static_cast<opmath_t>(zz[c]);
          }
          for (int64_t c = 0; c < Do; ++c) yr[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    });
  });
  return {y, z};
}

// ---------------------------------------------------------------------------------------------
// Gradients. dz: the grouped rows' pre-gate gradient (N, D_out), the unused rows zero.
Tensor routed_grad_z_cpu(const Tensor& grad_y_, const c10::optional<Tensor>& gate_,
                         const Tensor& idx_, const Tensor& route, const Tensor& paths,
                         bool grouped_out) {
  check_route_idx(idx_, paths, grad_y_);
  check_cpu_dtype(grad_y_, "grad_y");
  const Tensor gy = grad_y_.contiguous(), idx = idx_.contiguous();
  const Slots s = slots_of(idx, paths);
  const int64_t M = route.numel() - 2 * s.N - 1;
  TORCH_CHECK(M >= 0, "route: expected at least ", 2 * s.N + 1, " entries, got ", route.numel());
  const RouteView r = route_view(route, s.N, M, gy);
  if (grouped_out) {
    TORCH_CHECK(!gate_, "gate: a grouped output takes no gate");
    TORCH_CHECK(gy.dim() == 2 && gy.size(0) == s.N, "grad_y: expected grouped rows (N, D_out) "
                "with N = ", s.N, ", got shape ", gy.sizes());
    check_route(r, s, -1, -1);
    Tensor dz = gy.clone();
    const int64_t nv = r.offsets[r.M];
    dz.narrow(0, nv, s.N - nv).zero_();
    return dz;
  }
  TORCH_CHECK(gy.dim() == 3 && gy.size(1) == s.B, "grad_y: expected (T, B, D_out) with B = ",
              s.B, ", got shape ", gy.sizes());
  check_route(r, s, -1, gy.size(0));
  if (gate_) {
    check_float(*gate_, "gate", gy.scalar_type());
    GATED_CHECK_SHAPE("gate", *gate_, s.B, s.k);
  }
  const Tensor gate = gate_ ? gate_->contiguous() : Tensor();
  const int64_t Do = gy.size(2), nv = r.offsets[r.M];
  Tensor dz = at::empty({s.N, Do}, gy.options());
  dz.narrow(0, nv, s.N - nv).zero_();
  GATED_CPU_DISPATCH(gy.scalar_type(), "routed_grad_z_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* G = gy.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.defined() ? gate.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* D = dz.data_ptr<scalar_t>();
    at::parallel_for(0, nv, grain_for(Do), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t slot = r.order[q], p = s.idx[slot], b = slot / s.k;
        const scalar_t* gr = G + (s.dst[p] * s.B + b) * Do;
        const opmath_t gv = g ? static_cast<opmath_t>(g[slot]) : opmath_t(1);
        for (int64_t c = 0; c < Do; ++c) {
          D[q * Do + c] = static_cast<scalar_t>(gv * static_cast<opmath_t>(gr[c]));
        }
      }
    });
  });
  return dz;
}

// grad_x: the grouped rows dz_q @ W[m] (N, D_in), or summed back to (S, B, D_in) in slot order.
Tensor routed_grad_x_cpu(const Tensor& dz_, const Tensor& w_, const Tensor& idx_,
                         const Tensor& route, const Tensor& paths, int64_t num_sources,
                         bool grouped_in) {
  check_route_idx(idx_, paths, dz_);
  check_cpu_dtype(dz_, "grad_z");
  const NoAutocast no_autocast;
  const Tensor dz = dz_.contiguous(), w = w_.contiguous(), idx = idx_.contiguous();
  const Slots s = slots_of(idx, paths);
  TORCH_CHECK(w.dim() == 3 && dz.dim() == 2 && dz.size(0) == s.N && dz.size(1) == w.size(1),
              "grad_z: expected (N, D_out) = (", s.N, ", ", w.dim() == 3 ? w.size(1) : -1,
              "), got shape ", dz.sizes());
  check_float(w, "weight", dz.scalar_type());
  const RouteView r = route_view(route, s.N, w.size(0), dz);
  check_route(r, s, grouped_in ? -1 : num_sources, -1);
  const int64_t Di = w.size(2), nv = r.offsets[r.M];
  Tensor gx = at::empty({s.N, Di}, dz.options());
  gx.narrow(0, nv, s.N - nv).zero_();
  if (nv > 0 && Di > 0) {
    for_each_group(r, [&](int64_t m, int64_t q0, int64_t n) {
      Tensor out = gx.narrow(0, q0, n);
      gemm_out(out, dz.narrow(0, q0, n), w[m]);
    });
  }
  if (grouped_in) return gx;
  TORCH_CHECK(num_sources >= 0, "num_sources: expected >= 0, got ", num_sources);
  if (nv == 0 || Di == 0) return at::zeros({num_sources, s.B, Di}, dz.options());
  Tensor grad_x = at::empty({num_sources, s.B, Di}, dz.options());
  GATED_CPU_DISPATCH(dz.scalar_type(), "routed_grad_x_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* GX = gx.const_data_ptr<scalar_t>();
    scalar_t* O = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, s.B, grain_for(s.k * Di), [&](int64_t b0, int64_t b1) {
      std::vector<opmath_t> acc(Di);
      for (int64_t b = b0; b < b1; ++b) {
        zero_unreached_rows(O, s, b, num_sources, Di, /*by_dst=*/false);
        for (int64_t j = 0; j < s.k; ++j) {
          const int64_t p = s.idx[b * s.k + j];
          if (p < 0) continue;
          bool first = true;  // this row's sum is taken at its first slot
          for (int64_t jj = 0; jj < j && first; ++jj) {
            const int64_t pp = s.idx[b * s.k + jj];
            first = !(pp >= 0 && s.src[pp] == s.src[p]);
          }
          if (!first) continue;
          std::fill(acc.begin(), acc.end(), opmath_t(0));
          for (int64_t jj = j; jj < s.k; ++jj) {
            const int64_t pp = s.idx[b * s.k + jj];
            if (pp < 0 || s.src[pp] != s.src[p]) continue;
            const scalar_t* gr = GX + r.pos[b * s.k + jj] * Di;
            for (int64_t c = 0; c < Di; ++c) acc[c] += static_cast<opmath_t>(gr[c]);
          }
          scalar_t* orow = O + (s.src[p] * s.B + b) * Di;
          for (int64_t c = 0; c < Di; ++c) orow[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    });
  });
  return grad_x;
}

// grad_W[m] = dz_m^T x_m over weight m's rows (zero for a weight no slot used).
Tensor routed_grad_weight_cpu(const Tensor& dz_, const Tensor& x_, const Tensor& idx_,
                              const Tensor& route, const Tensor& paths, int64_t num_weights,
                              bool grouped_in) {
  check_route_idx(idx_, paths, dz_);
  check_cpu_dtype(dz_, "grad_z");
  check_float(x_, "x", dz_.scalar_type());
  TORCH_CHECK(num_weights >= 0, "num_weights: expected >= 0, got ", num_weights);
  const NoAutocast no_autocast;
  const Tensor dz = dz_.contiguous(), x = x_.contiguous(), idx = idx_.contiguous();
  const Slots s = slots_of(idx, paths);
  TORCH_CHECK(dz.dim() == 2 && dz.size(0) == s.N, "grad_z: expected (N, D_out) with N = ", s.N,
              ", got shape ", dz.sizes());
  TORCH_CHECK(grouped_in ? (x.dim() == 2 && x.size(0) == s.N) : (x.dim() == 3 && x.size(1) == s.B),
              "x: expected ", grouped_in ? "grouped rows (N, D_in)" : "(S, B, D_in)",
              " for this route, got shape ", x.sizes());
  const RouteView r = route_view(route, s.N, num_weights, dz);
  check_route(r, s, grouped_in ? -1 : x.size(0), -1);
  Tensor gw = at::empty({num_weights, dz.size(1), x.size(-1)}, dz.options());
  if (gw.numel() == 0) return gw;
  const Tensor xg = gather_rows(x, r, s, grouped_in);
  parallel_for_aten(0, r.M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t q0 = r.offsets[m], n = r.offsets[m + 1] - q0;
      Tensor out = gw[m];
      if (n == 0) {
        out.zero_();  // a weight no slot used
      } else {
        gemm_out(out, dz.narrow(0, q0, n).t(), xg.narrow(0, q0, n));
      }
    }
  });
  return gw;
}

// grad_bias[m] = sum of dz over weight m's rows, in row order (float accumulation).
Tensor routed_grad_bias_cpu(const Tensor& dz_, const Tensor& route, int64_t num_weights) {
  check_cpu_dtype(dz_, "grad_z");
  TORCH_CHECK(dz_.dim() == 2, "grad_z: expected (N, D_out), got shape ", dz_.sizes());
  TORCH_CHECK(num_weights >= 0, "num_weights: expected >= 0, got ", num_weights);
  const Tensor dz = dz_.contiguous();
  const int64_t N = dz.size(0), Do = dz.size(1);
  const RouteView r = route_view(route, N, num_weights, dz);
  for (int64_t m = 0; m < r.M; ++m) {
    TORCH_CHECK(r.offsets[0] == 0 && r.offsets[m] <= r.offsets[m + 1] && r.offsets[r.M] <= N,
                "route: corrupt table (offsets); rebuild it with gated_ops.make_route");
  }
  Tensor gb = at::empty({num_weights, Do}, dz.options());
  GATED_CPU_DISPATCH(dz.scalar_type(), "routed_grad_bias_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* D = dz.const_data_ptr<scalar_t>();
    scalar_t* O = gb.data_ptr<scalar_t>();
    at::parallel_for(0, num_weights, 1, [&](int64_t m0, int64_t m1) {
      std::vector<opmath_t> acc(Do);
      for (int64_t m = m0; m < m1; ++m) {
        std::fill(acc.begin(), acc.end(), opmath_t(0));
        for (int64_t q = r.offsets[m]; q < r.offsets[m + 1]; ++q) {
          for (int64_t c = 0; c < Do; ++c) acc[c] += static_cast<opmath_t>(D[q * Do + c]);
        }
        for (int64_t c = 0; c < Do; ++c) O[m * Do + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return gb;
}

// grad_gate[b, j] = grad_y[t, b] . z[pos[b k + j]] (z: the pre-gate rows, bias included).
Tensor routed_grad_gate_cpu(const Tensor& grad_y_, const Tensor& z_, const Tensor& idx_,
                            const Tensor& route, const Tensor& paths) {
  check_route_idx(idx_, paths, grad_y_);
  check_cpu_dtype(grad_y_, "grad_y");
  check_float(z_, "z", grad_y_.scalar_type());
  const Tensor gy = grad_y_.contiguous(), z = z_.contiguous(), idx = idx_.contiguous();
  const Slots s = slots_of(idx, paths);
  TORCH_CHECK(gy.dim() == 3 && gy.size(1) == s.B, "grad_y: expected (T, B, D_out) with B = ",
              s.B, ", got shape ", gy.sizes());
  TORCH_CHECK(z.dim() == 2 && z.size(0) == s.N && z.size(1) == gy.size(2),
              "z: expected (N, D_out) = (", s.N, ", ", gy.size(2), "), got shape ", z.sizes());
  const int64_t M = route.numel() - 2 * s.N - 1;
  TORCH_CHECK(M >= 0, "route: expected at least ", 2 * s.N + 1, " entries, got ", route.numel());
  const RouteView r = route_view(route, s.N, M, gy);
  check_route(r, s, -1, gy.size(0));
  const int64_t Do = gy.size(2);
  Tensor gg = at::empty({s.B, s.k}, gy.options());
  GATED_CPU_DISPATCH(gy.scalar_type(), "routed_grad_gate_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* G = gy.const_data_ptr<scalar_t>();
    const scalar_t* Z = z.const_data_ptr<scalar_t>();
    scalar_t* O = gg.data_ptr<scalar_t>();
    at::parallel_for(0, s.N, grain_for(Do), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t p = s.idx[i];
        if (p < 0) {
          O[i] = scalar_t(0);
          continue;
        }
        const scalar_t* gr = G + (s.dst[p] * s.B + i / s.k) * Do;
        const scalar_t* zr = Z + r.pos[i] * Do;
        opmath_t acc = 0;
        for (int64_t c = 0; c < Do; ++c) {
          acc += static_cast<opmath_t>(gr[c]) * static_cast<opmath_t>(zr[c]);
        }
        O[i] = static_cast<scalar_t>(acc);
      }
    });
  });
  return gg;
}

}  // namespace cpu
}  // namespace gated_ops

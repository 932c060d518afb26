// gated_ops: op schemas (declared once), input checks and the CPU kernels.
//
// The math of every op is gated_ops/reference.py; the plan layout is gated_ops/plan.py.
// CPU strategy: the GEMMs go to ATen (MKL/oneDNN BLAS), batched over the plan's blocks; the
// gather/scatter epilogues and the reductions are at::parallel_for loops in a fixed order, so
// every result is deterministic (no atomics, no order that depends on the thread count).
// float32 and float64, and bfloat16 / float16 storage with float arithmetic: every epilogue,
// reduction and update computes in float (at::opmath_type) and rounds once when it stores;
// ATen's 16-bit GEMMs accumulate in float and round their output (oneDNN uses AMX / AVX-512
// BF16 where the CPU has them). The hand-vectorised kernels of cpu_simd.h take float32 and
// bfloat16 weights; float16 runs the scalar loops.
#include <Python.h>

#include <ATen/AccumulateType.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_simd.h"
#include "gated_ops.h"

extern "C" {
// A plain module so that `import gated_ops._C` loads this library and runs the registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace gated_ops {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// The plan on the CPU, with the index range checks of every table the CPU kernels read: a
// PathwayPlan is validated once when it is made (gated_ops/plan.py), but the registered ops
// also serve raw callers, and O(T + S + M + P) is negligible next to the GEMMs. The GPU
// kernels trust the plan (reading its tables there would cost a host synchronisation).
Plan cpu_plan(const Tensor& paths, const Tensor& csr, at::IntArrayRef layout, int64_t S,
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

void check_cpu_dtype(const Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf, name,
              ": the CPU kernels support float32, float64, bfloat16 and float16, got ", d);
}

#define GATED_CPU_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// The bits of a bfloat16 tensor, for cpu_simd.h's bfloat16 overloads.
inline const uint16_t* bf16_bits(const Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
}

// Grouped layout: the sources of every pathway in by-weight order, (P*B, D_in).
Tensor gather_sources(const Plan& p, const Tensor& x) {
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
// bfloat16 k-path step at H=1024 took 6.8 s against 0.29 s in float32; benchmarks/NOTES.md).
// On AVX-512 CPUs (and AMX) the 16-bit GEMMs stay. GATED_OPS_CPU_WIDEN_GEMM=1 / 0 forces it
// on / off (read at each call; the tests run both).
bool widen_gemm(const Tensor& t) {
  const auto d = t.scalar_type();
  if (d != at::kBFloat16 && d != at::kHalf) return false;
  const char* v = std::getenv("GATED_OPS_CPU_WIDEN_GEMM");
  if (v != nullptr && (v[0] == '0' || v[0] == '1')) return v[0] == '1';
#if GATED_HAVE_VECTOR_EXT
  return !simd::wide_vectors();
#else
  return false;
#endif
}
// at::mm / at::bmm (by a's dimension), widened where widen_gemm says.
Tensor mm_or_bmm(const Tensor& a, const Tensor& b) {
  return a.dim() == 3 ? at::bmm(a, b) : at::mm(a, b);
}
Tensor gemm(const Tensor& a, const Tensor& b) {
  if (widen_gemm(a)) return mm_or_bmm(a.to(at::kFloat), b.to(at::kFloat)).to(a.scalar_type());
  return mm_or_bmm(a, b);
}
// out = a @ b into a (possibly strided) view
void gemm_out(Tensor& out, const Tensor& a, const Tensor& b) {
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

// At most this many activation rows per block (ns * B) take the skinny float32 forward
// (simd::skinny_xwt, the k-path encoders: 8); wider blocks go to BLAS.
constexpr int64_t kSkinnyForwardRows = 16;

// The skinny kernels of cpu_simd.h on blocked plans (the k-path encoders' forward and fused
// update), for float32 where they have a vector width that fits the CPU: 16 lanes on AVX-512,
// 8 on AVX2 (simd::skinny_lanes). Older CPUs take BLAS and a streamed update for float32 (the
// 16-lane AVX2 clone, before the 8-lane kernels, measured slower than BLAS on a 2-core AMD
// EPYC: benchmarks/NOTES.md 2026-12-02). bfloat16 keeps them everywhere (without a native bf16
// dot product BLAS is far slower still). GATED_OPS_CPU_SKINNY=1 / 0 forces them on / off (read
// at each call; the tests run both).
bool use_skinny_blocked(at::ScalarType dtype) {
#if GATED_HAVE_VECTOR_EXT
  const char* v = std::getenv("GATED_OPS_CPU_SKINNY");
  if (v != nullptr && (v[0] == '0' || v[0] == '1')) return v[0] == '1';
  return dtype != at::kFloat || simd::wide_vectors() || simd::narrow_vectors_supported();
#else
  (void)dtype;
  return false;
#endif
}

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

// ---------------------------------------------------------------------------------------------
// Fused SGD: W <- W - lr * d, buf <- momentum * buf + (g + wd * W), d = buf (or g + momentum * buf
// with nesterov), g = grad_W computed a few rows at a time and never written to memory. Per step
// this reads and writes W and buf once: at K=100, D=784, H=128 that is 4 x 40 MB instead of the
// 7 x 40 MB of autograd's grad tensor followed by torch.optim.SGD.
//
// The hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time
// (GATED_TARGET_CLONES, cpu_simd.h), since the rest of the build targets baseline x86-64.

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
// measured no different within this 2-core VM's +-30% run-to-run noise: benchmarks/NOTES.md.)
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

// The vectorised skinny update (cpu_simd.h) where there is one: float32 and bfloat16 weights
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

void pathway_bias_sgd_cpu(const Tensor& dz_, const Tensor& bias, const c10::optional<Tensor>& buf,
                          const Tensor& paths, const Tensor& csr, at::IntArrayRef layout,
                          int64_t num_sources, int64_t num_weights, double lr, double momentum,
                          double weight_decay, bool nesterov, int64_t rounding_seed,
                          const c10::optional<Tensor>& rounding_step);

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

// ---------------------------------------------------------------------------------------------
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

}  // namespace

// ---------------------------------------------------------------------------------------------
// The schemas, declared once (define_schemas in gated_ops.h).
TORCH_LIBRARY(gated_ops, m) { define_schemas(m); }

TORCH_LIBRARY_IMPL(gated_ops, CPU, m) {
  m.impl("pathway_matmul", &pathway_matmul_cpu);
  m.impl("pathway_grad_z", &pathway_grad_z_cpu);
  m.impl("pathway_grad_x", &pathway_grad_x_cpu);
  m.impl("pathway_grad_weight", &pathway_grad_weight_cpu);
  m.impl("pathway_grad_bias", &pathway_grad_bias_cpu);
  m.impl("pathway_grad_gate", &pathway_grad_gate_cpu);
  m.impl("pathway_grad_x_gate", &pathway_grad_x_gate_cpu);
  m.impl("pathway_sgd_", &pathway_sgd_cpu);
  m.impl("pathway_sgd_lookahead_", &pathway_sgd_lookahead_cpu);
  m.impl("pathway_bias_sgd_", &pathway_bias_sgd_cpu);
  m.impl("gated_cross_entropy", &gated_cross_entropy_cpu);
  m.impl("gated_cross_entropy_backward", &gated_cross_entropy_backward_cpu);
}

}  // namespace gated_ops

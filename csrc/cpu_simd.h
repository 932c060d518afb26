// Hand-vectorised float32 CPU kernels for the skinny GEMMs of the k-path step, where a few rows
// of activations (ns * B = 8 at the paper's batch size) meet a large weight that must be
// streamed from memory once: the encoder forward (Z = X W^T) and the encoder's fused
// gradient + SGD update (W -= lr * (momentum-filtered dZ^T X)). BLAS packs and tiles such
// operands for reuse that is not there; these loops instead read each weight row once, keep
// the few activation rows in L1 and hold every partial sum in vector registers.
//
// Written with GCC/Clang vector extensions (16 floats = one AVX-512 register, two AVX2
// registers) and compiled for AVX-512, AVX2+FMA and baseline x86-64 by function
// multi-versioning; the rest of the build targets baseline x86-64. Summation order is fixed
// (lanes, then a fixed lane tree), so results do not depend on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>

// (GCC 11+ knows the x86-64-v3/v4 levels; other compilers build the baseline loops only.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define GATED_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GATED_TARGET_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define GATED_HAVE_VECTOR_EXT 1
#define GATED_INLINE inline __attribute__((always_inline))
#else
#define GATED_HAVE_VECTOR_EXT 0
#define GATED_INLINE inline
#endif

#if GATED_HAVE_VECTOR_EXT && defined(__GNUC__) && !defined(__clang__)
// vf values pass between always-inline helpers only, never across a real call boundary, so
// GCC's note that their ABI differs with and without AVX-512 does not apply. (Not popped: GCC
// emits the note at the end of the translation unit, where it instantiates the clones.)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#ifndef GATED_PREFETCH
#define GATED_PREFETCH 512
#endif

namespace gated_ops {
namespace simd {

#if GATED_HAVE_VECTOR_EXT
constexpr int kLanes = 16;
constexpr int64_t kPrefetch = GATED_PREFETCH;  // floats ahead of the weight stream
// aligned(4): loads and stores through this type may be unaligned.
typedef float vf __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

GATED_INLINE vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
GATED_INLINE void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }

// The total of v's lanes by a fixed tree (16 -> 8 -> 4 -> 2 -> 1). (A shuffle tree over 8
// vectors at once, GCC 12+ only, measured no faster in the skinny forward.)
GATED_INLINE float hsum(vf v) {
  float s[kLanes];
  store(s, v);
#pragma GCC unroll 16
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
}

// z[i * ldz + r] = <x[i, :], w[r, :]> for i < NX activation rows and r < RW weight rows.
template <int NX, int RW>
GATED_INLINE void dot_tile(const float* x, const float* w, int64_t D, float* z, int64_t ldz) {
  vf acc[RW][NX];
#pragma GCC unroll 8
  for (int r = 0; r < RW; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NX; ++i) acc[r][i] = vf{};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
#pragma GCC unroll 8
    for (int r = 0; r < RW; ++r) {
      // Without it one thread streamed ~5 GB/s; a software prefetch kPrefetch floats (2 KB)
      // ahead keeps more lines in flight.
      __builtin_prefetch(w + r * D + d + kPrefetch);
      const vf wv = load(w + r * D + d);
#pragma GCC unroll 8
      for (int i = 0; i < NX; ++i) acc[r][i] += wv * load(x + i * D + d);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RW; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NX; ++i) {
      float s = hsum(acc[r][i]);
      for (int64_t t = d; t < D; ++t) s += x[i * D + t] * w[r * D + t];
      z[i * ldz + r] = s;
    }
}

template <int RW>
GATED_INLINE void dot_rows(const float* x, int nx, const float* w, int64_t D, float* z,
                           int64_t ldz) {
  switch (nx) {
    case 1: return dot_tile<1, RW>(x, w, D, z, ldz);
    case 2: return dot_tile<2, RW>(x, w, D, z, ldz);
    case 3: return dot_tile<3, RW>(x, w, D, z, ldz);
    case 4: return dot_tile<4, RW>(x, w, D, z, ldz);
    case 5: return dot_tile<5, RW>(x, w, D, z, ldz);
    case 6: return dot_tile<6, RW>(x, w, D, z, ldz);
    case 7: return dot_tile<7, RW>(x, w, D, z, ldz);
    default: return dot_tile<8, RW>(x, w, D, z, ldz);
  }
}

// z (nx, ldz)[:, :rows] = x (nx, D) @ w (rows, D)^T, both row-major and contiguous. Each weight
// row is read from memory once, one row after the other: a single sequential stream measured
// faster than two or three rows at a time (2 threads, K=100: 1.7 vs 2.1-2.3 ms at H=128, 21 vs
// 25-28 ms at H=1024). x (nx * D floats) should fit in L1/L2.
GATED_TARGET_CLONES inline void skinny_xwt(const float* x, int64_t nx, const float* w,
                                           int64_t rows, int64_t D, float* z, int64_t ldz) {
  int64_t r = 0;
  for (; r < rows; ++r)
    for (int64_t i = 0; i < nx; i += 8)
      dot_rows<1>(x + i * D, int(std::min<int64_t>(8, nx - i)), w + r * D, D,
                  z + i * ldz + r, ldz);
}

struct SgdArgs {
  float lr, momentum, weight_decay;
  bool nesterov;
};

// One SGD step on a vector of RW weight rows' elements: d = g + wd * w; buf = mom * buf + d;
// d = nesterov ? d + mom * buf : buf; w -= lr * d. (buf == nullptr: no momentum.)
GATED_INLINE void sgd_apply(vf g, float* w, float* buf, const SgdArgs& a) {
  vf wv = load(w);
  vf d = a.weight_decay != 0 ? g + a.weight_decay * wv : g;
  if (buf) {
    const vf b = a.momentum * load(buf) + d;
    store(buf, b);
    d = a.nesterov ? d + a.momentum * b : b;
  }
  store(w, wv - a.lr * d);
}
GATED_INLINE void sgd_apply1(float g, float* w, float* buf, const SgdArgs& a) {
  float d = a.weight_decay != 0 ? g + a.weight_decay * *w : g;
  if (buf) {
    const float b = a.momentum * *buf + d;
    *buf = b;
    d = a.nesterov ? d + a.momentum * b : b;
  }
  *w -= a.lr * d;
}

// RW rows of W (row stride D) and buf updated with gradient row r = sum_k a[k * lda + r] *
// x[k, :] over nr activation rows, formed 16 columns at a time in registers: W and buf are read
// and written once, x comes from L1, and the gradient never goes to memory.
template <int RW>
GATED_INLINE void grad_sgd_tile(float* w, float* buf, const float* a, int64_t lda,
                                const float* x, int64_t nr, int64_t D, const SgdArgs& s) {
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    vf g[RW];
#pragma GCC unroll 4
    for (int r = 0; r < RW; ++r) g[r] = vf{};
    for (int64_t k = 0; k < nr; ++k) {
      const vf xv = load(x + k * D + d);
#pragma GCC unroll 4
      for (int r = 0; r < RW; ++r) g[r] += a[k * lda + r] * xv;
    }
#pragma GCC unroll 4
    for (int r = 0; r < RW; ++r) {
      __builtin_prefetch(w + r * D + d + kPrefetch, 1);
      if (buf) __builtin_prefetch(buf + r * D + d + kPrefetch, 1);
      sgd_apply(g[r], w + r * D + d, buf ? buf + r * D + d : nullptr, s);
    }
  }
  for (; d < D; ++d)
    for (int r = 0; r < RW; ++r) {
      float g = 0;
      for (int64_t k = 0; k < nr; ++k) g += a[k * lda + r] * x[k * D + d];
      sgd_apply1(g, w + r * D + d, buf ? buf + r * D + d : nullptr, s);
    }
}

// All `rows` rows of one weight (rows x D): W[o] -= lr * step(sum_k a[k * lda + o] * x[k, :]).
GATED_TARGET_CLONES inline void skinny_grad_sgd(float* w, float* buf, const float* a,
                                                int64_t lda, const float* x, int64_t nr,
                                                int64_t rows, int64_t D, SgdArgs s) {
  int64_t o = 0;
  for (; o + 4 <= rows; o += 4)
    grad_sgd_tile<4>(w + o * D, buf ? buf + o * D : nullptr, a + o, lda, x, nr, D, s);
  for (; o < rows; ++o)
    grad_sgd_tile<1>(w + o * D, buf ? buf + o * D : nullptr, a + o, lda, x, nr, D, s);
}

// Overloads for the dtype-generic callers: float takes the vector path (returns true),
// double returns false and the caller runs its scalar loop.
inline bool try_skinny_grad_sgd(float* w, float* buf, const float* a, int64_t lda,
                                const float* x, int64_t nr, int64_t rows, int64_t D, float lr,
                                float momentum, float weight_decay, bool nesterov) {
  skinny_grad_sgd(w, buf, a, lda, x, nr, rows, D, {lr, momentum, weight_decay, nesterov});
  return true;
}
#endif  // GATED_HAVE_VECTOR_EXT
inline bool try_skinny_grad_sgd(double*, double*, const double*, int64_t, const double*,
                                int64_t, int64_t, int64_t, double, double, double, bool) {
  return false;
}
#if !GATED_HAVE_VECTOR_EXT
inline bool try_skinny_grad_sgd(float*, float*, const float*, int64_t, const float*, int64_t,
                                int64_t, int64_t, float, float, float, bool) {
  return false;
}
#endif

}  // namespace simd
}  // namespace gated_ops

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
#include <cstring>

// (GCC 11+ knows the x86-64-v3/v4 levels; other compilers build the baseline loops only.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define GATED_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define GATED_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#define GATED_HAVE_V3 1
#else
#define GATED_TARGET_CLONES
#define GATED_TARGET_V3
#define GATED_HAVE_V3 0
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

// (After the pragma above: hash32 is instantiated on vectors here.)
#include "hash32.h"
#include "kernel_choice.h"

#ifndef GATED_PREFETCH
#define GATED_PREFETCH 512
#endif

namespace gated_ops {
namespace simd {

// Stochastic rounding of float to bfloat16 (the fused update's option for 16-bit weights):
// add 16 random bits below the kept mantissa and truncate, so a value rounds up with
// probability equal to its distance from the lower neighbour: unbiased, and an update far
// smaller than the spacing of bfloat16 still moves the weight on average. The random bits are
// a hash of (seed, element index): deterministic, independent of the thread count, and
// reproduced by gated_ops.reference.round_stochastic_bf16.
// (The hash is gated_ops::hash32 of hash32.h, lane by lane on vectors; the seed's mix is
// gated_ops::seed_mix in rounding.h.)
// The body of the float exp of the cross-entropy (cpu/cross_entropy.cpp expf_poly, and exp8 below):
// with n = floor(x / ln 2 + 1/2) for the clamped x, exp(x) = 2^n * exp_core(x, n), from Cephes'
// range reduction by ln 2 in two parts and its degree-6 polynomial (T: float or a vector).
template <typename T>
GATED_INLINE T exp_core(T xc, T n) {
  const T r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  T p = r * 0.0f + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

inline uint16_t bf16_stochastic(float v, uint32_t bits16) {
  uint32_t u;
  __builtin_memcpy(&u, &v, sizeof(u));
  return v != v ? uint16_t(0x7fc0) : uint16_t((u + bits16) >> 16);
}
inline uint16_t bf16_stochastic(float v, int64_t index, uint32_t mix) {
  return bf16_stochastic(v, hash32<uint32_t>(uint32_t(index) + mix) & 0xffffu);
}

#if GATED_HAVE_VECTOR_EXT
constexpr int kLanes = 16;
constexpr int64_t kPrefetch = GATED_PREFETCH;  // floats ahead of the weight stream

// Whether this CPU runs the AVX-512 clones (a vf is one zmm register; on AVX2, two of 16 ymm).
inline bool wide_vectors() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool wide = __builtin_cpu_supports("avx512f");
  return wide;
#else
  return false;
#endif
}
// Whether the 8-lane kernels (compiled for AVX2 + FMA) can run on this CPU.
inline bool narrow_vectors_supported() {
#if GATED_HAVE_V3
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}
// The vector width of the skinny kernels below: 16 lanes where the CPU has AVX-512 (one zmm
// register; also older CPUs, which run the baseline clone), 8 on AVX2 without AVX-512 (one ymm:
// the 16-lane AVX2 clone, two ymm per value, measured issue-bound there on a 2-core AMD EPYC,
// Zen 2, 2026-12-02). Detected once; cpu_lanes (kernel_choice.h) forces a width (8 only where
// AVX2 runs: the tests run both on an AVX-512 CPU).
inline int skinny_lanes() {
  static const int automatic = !wide_vectors() && narrow_vectors_supported() ? 8 : 16;
  switch (forced_kernel(KernelChoice::kCpuLanes)) {
    case 8: return narrow_vectors_supported() ? 8 : 16;
    case 16: return 16;
    default: return automatic;
  }
}
// aligned(4): loads and stores through this type may be unaligned.
typedef float vf __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

// 8 lanes: one ymm register (the AVX2 kernels below; the cross-entropy's rows in lanes).
typedef float v8f __attribute__((vector_size(8 * sizeof(float)), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(8 * sizeof(int32_t)), aligned(4)));
typedef uint32_t v8u __attribute__((vector_size(8 * sizeof(uint32_t)), aligned(4)));
typedef uint16_t v8h __attribute__((vector_size(8 * sizeof(uint16_t)), aligned(2)));

GATED_INLINE vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
GATED_INLINE void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }

// bfloat16 storage (the bits of c10::BFloat16): 16 values widened to float exactly, and
// rounded back to nearest-even with NaN kept quiet, bit for bit as c10::BFloat16(float) does.
typedef uint32_t vu __attribute__((vector_size(kLanes * sizeof(uint32_t)), aligned(4)));
typedef uint16_t vh __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(2)));

// (F: the float vector, U: its bits, H: the 16-bit lanes; the 16- and 8-lane types below.
// Memory goes through memcpy: a typedef's aligned(2) attribute is dropped when it is a
// template argument, and a dereference would then assume the vector's natural alignment.)
template <typename F, typename U, typename H>
GATED_INLINE F widen_bf16(const uint16_t* p) {
  H h;
  __builtin_memcpy(&h, p, sizeof(h));
  const U u = __builtin_convertvector(h, U) << 16;
  return (F)u;  // (a cast between vector types of one size reinterprets the bits)
}
// v's lanes to bfloat16 bits: add `add` below the kept mantissa and truncate, NaN kept quiet.
template <typename H, typename U, typename F>
GATED_INLINE void narrow_bf16(uint16_t* p, F v, U add) {
  const U nan = (U)(v != v);
  const U r = (((U)v + add) >> 16 & ~nan) | (0x7fc0u & nan);
  const H h = __builtin_convertvector(r, H);
  __builtin_memcpy(p, &h, sizeof(h));
}
GATED_INLINE vf load(const uint16_t* p) { return widen_bf16<vf, vu, vh>(p); }
GATED_INLINE void store(uint16_t* p, vf v) {  // nearest-even
  narrow_bf16<vh>(p, v, (((vu)v >> 16) & 1u) + 0x7fffu);
}
// Stochastic rounding of 16 lanes whose element indices are idx (see bf16_stochastic).
GATED_INLINE void store_stochastic(uint16_t* p, vf v, vu idx, uint32_t mix) {
  narrow_bf16<vh>(p, v, hash32<vu>(idx + mix) & 0xffffu);
}
// The same for 8 lanes (v8f).
GATED_INLINE v8f load8(const float* p) { return *reinterpret_cast<const v8f*>(p); }
GATED_INLINE v8f load8(const uint16_t* p) { return widen_bf16<v8f, v8u, v8h>(p); }
GATED_INLINE void store(float* p, v8f v) { *reinterpret_cast<v8f*>(p) = v; }
GATED_INLINE void store(uint16_t* p, v8f v) {
  narrow_bf16<v8h>(p, v, (((v8u)v >> 16) & 1u) + 0x7fffu);
}
GATED_INLINE void store_stochastic(uint16_t* p, v8f v, v8u idx, uint32_t mix) {
  narrow_bf16<v8h>(p, v, hash32<v8u>(idx + mix) & 0xffffu);
}
GATED_INLINE float load1(const float* p) { return *p; }
GATED_INLINE void store1(float* p, float v) { *p = v; }
GATED_INLINE float load1(const uint16_t* p) {
  const uint32_t u = uint32_t(*p) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}
GATED_INLINE void store1(uint16_t* p, float v) {
  uint32_t u;
  __builtin_memcpy(&u, &v, sizeof(u));
  *p = v != v ? uint16_t(0x7fc0) : uint16_t((u + (((u >> 16) & 1u) + 0x7fffu)) >> 16);
}

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

// z[i * ldz + r] = hsum(acc[r][i]) + the columns d..D-1 of <x[i, :], w[r, :]>: the end of the
// dot products of dot_tile and of the lookahead's one pass (shared: the same sums, the same bits).
template <int NX, int RW, typename W_t>
GATED_INLINE void dot_finish(const vf (&acc)[RW][NX], const float* x, const W_t* w, int64_t d,
                             int64_t D, float* z, int64_t ldz) {
#pragma GCC unroll 8
  for (int r = 0; r < RW; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NX; ++i) {
      float s = hsum(acc[r][i]);
      for (int64_t t = d; t < D; ++t) s += x[i * D + t] * load1(w + r * D + t);
      z[i * ldz + r] = s;
    }
}

// z[i * ldz + r] = <x[i, :], w[r, :]> for i < NX activation rows and r < RW weight rows
// (W_t: float, or uint16_t for bfloat16 weights).
template <int NX, int RW, typename W_t>
GATED_INLINE void dot_tile(const float* x, const W_t* w, int64_t D, float* z, int64_t ldz) {
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
      __builtin_prefetch(w + r * D + d + kPrefetch * sizeof(float) / sizeof(W_t));
      const vf wv = load(w + r * D + d);
#pragma GCC unroll 8
      for (int i = 0; i < NX; ++i) acc[r][i] += wv * load(x + i * D + d);
    }
  }
  dot_finish<NX, RW>(acc, x, w, d, D, z, ldz);
}

template <int RW, typename W_t>
GATED_INLINE void dot_rows(const float* x, int nx, const W_t* w, int64_t D, float* z,
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
// 25-28 ms at H=1024). x (nx * D floats) should fit in L1/L2. W_t: float or bfloat16 bits.
template <typename W_t>
GATED_INLINE void skinny_xwt_impl(const float* x, int64_t nx, const W_t* w, int64_t rows,
                                  int64_t D, float* z, int64_t ldz) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < nx; i += 8)
      dot_rows<1>(x + i * D, int(std::min<int64_t>(8, nx - i)), w + r * D, D,
                  z + i * ldz + r, ldz);
}
GATED_TARGET_CLONES inline void skinny_xwt16(const float* x, int64_t nx, const float* w,
                                             int64_t rows, int64_t D, float* z, int64_t ldz) {
  skinny_xwt_impl(x, nx, w, rows, D, z, ldz);
}
GATED_TARGET_CLONES inline void skinny_xwt16(const float* x, int64_t nx, const uint16_t* w,
                                             int64_t rows, int64_t D, float* z, int64_t ldz) {
  skinny_xwt_impl(x, nx, w, rows, D, z, ldz);
}

struct SgdArgs {
  float lr, momentum, weight_decay;
  bool nesterov;
  bool stochastic = false;  // bfloat16 weights: stochastic rounding of W (buf: nearest)
  uint32_t mix = 0;         // seed_mix(seed) of this step
};

// Loads and stores of the SGD step by value type: vf (16 lanes) or float (one element), from a
// float or bfloat16 (uint16_t) weight; the stochastic store of a bfloat16 weight.
template <typename W_t> GATED_INLINE vf load_as(vf, const W_t* p) { return load(p); }
template <typename W_t> GATED_INLINE v8f load_as(v8f, const W_t* p) { return load8(p); }
template <typename W_t> GATED_INLINE float load_as(float, const W_t* p) { return load1(p); }
template <typename W_t> GATED_INLINE void store_as(W_t* p, vf v) { store(p, v); }
template <typename W_t> GATED_INLINE void store_as(W_t* p, v8f v) { store(p, v); }
template <typename W_t> GATED_INLINE void store_as(W_t* p, float v) { store1(p, v); }
GATED_INLINE void store_stochastic_as(uint16_t* p, vf v, int64_t idx, uint32_t mix) {
  const vu lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  store_stochastic(p, v, uint32_t(idx) + lane, mix);
}
GATED_INLINE void store_stochastic_as(uint16_t* p, v8f v, int64_t idx, uint32_t mix) {
  const v8u lane = {0, 1, 2, 3, 4, 5, 6, 7};
  store_stochastic(p, v, uint32_t(idx) + lane, mix);
}
GATED_INLINE void store_stochastic_as(uint16_t* p, float v, int64_t idx, uint32_t mix) {
  *p = bf16_stochastic(v, idx, mix);
}

// One SGD step on 16 elements (V = vf), 8 (V = v8f) or one (V = float) of a weight row: d = g + wd * w;
// buf = mom * buf + d; d = nesterov ? d + mom * buf : buf; w -= lr * d. (buf == nullptr: no
// momentum.) In float; a bfloat16 weight and buffer (W_t = uint16_t) are widened, updated in
// float and rounded once when stored. idx: the element index of w[0] within the whole weight
// tensor, for stochastic rounding.
template <typename V, typename W_t>
GATED_INLINE void sgd_apply(V g, W_t* w, W_t* buf, int64_t idx, const SgdArgs& a) {
  const V wv = load_as(V{}, w);
  V d = a.weight_decay != 0 ? g + a.weight_decay * wv : g;
  if (buf) {
    const V b = a.momentum * load_as(V{}, buf) + d;
    store_as(buf, b);
    d = a.nesterov ? d + a.momentum * b : b;
  }
  if constexpr (sizeof(W_t) == 2) {
    if (a.stochastic) return store_stochastic_as(w, wv - a.lr * d, idx, a.mix);
  }
  store_as(w, wv - a.lr * d);
}

// The SGD step on n consecutive bfloat16 weights from a stored gradient g (bfloat16 bits or
// float; null: zero gradient, decay and momentum still apply), 16 at a time. idx: the element
// index of w[0] (stochastic rounding). (The scalar loop it replaces hashed one element at a time
// and did not vectorise: the wide blocks' update, 2M weights at H=1024.)
template <typename G_t>
GATED_INLINE void sgd_stream_impl(uint16_t* w, uint16_t* buf, const G_t* g, int64_t n,
                                  int64_t idx, const SgdArgs& a) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    sgd_apply(g ? load(g + i) : vf{}, w + i, buf ? buf + i : nullptr, idx + i, a);
  for (; i < n; ++i)
    sgd_apply(g ? load1(g + i) : 0.0f, w + i, buf ? buf + i : nullptr, idx + i, a);
}
GATED_TARGET_CLONES inline void sgd_stream(uint16_t* w, uint16_t* buf, const uint16_t* g,
                                           int64_t n, int64_t idx, SgdArgs a) {
  sgd_stream_impl(w, buf, g, n, idx, a);
}
GATED_TARGET_CLONES inline void sgd_stream(uint16_t* w, uint16_t* buf, const float* g,
                                           int64_t n, int64_t idx, SgdArgs a) {
  sgd_stream_impl(w, buf, g, n, idx, a);
}

// RW rows of W (row stride D) and buf updated with gradient row r = sum_k a[k * lda + r] *
// x[k, :] over nr activation rows, formed 16 columns at a time in registers: W and buf are read
// and written once, x comes from L1, and the gradient never goes to memory.
// g[r] = sum_k a[k * lda + r] * x[k, d:d+16] for the RW rows, over k in order (the fused
// update's gradient, shared by grad_sgd_tile and the lookahead's one pass: the same bits).
template <int RW>
GATED_INLINE void grad_cols(const float* a, int64_t lda, const float* x, int64_t nr, int64_t D,
                            int64_t d, vf (&g)[RW]) {
#pragma GCC unroll 4
  for (int r = 0; r < RW; ++r) g[r] = vf{};
#pragma GCC unroll 8
  for (int64_t k = 0; k < nr; ++k) {
    const vf xv = load(x + k * D + d);
#pragma GCC unroll 4
    for (int r = 0; r < RW; ++r) g[r] += a[k * lda + r] * xv;
  }
}

// after(r, d): called once row r's columns d..d+15 are stored (the lookahead's one pass dots
// them there); returns where the vector columns ended (the scalar tail follows them).
struct NoAfter {
  GATED_INLINE void operator()(int, int64_t) const {}
};
template <int RW, typename W_t, typename After = NoAfter>
GATED_INLINE int64_t grad_sgd_tile(W_t* w, W_t* buf, int64_t idx, const float* a, int64_t lda,
                                   const float* x, int64_t nr, int64_t D, const SgdArgs& s,
                                   After after = {}) {
  constexpr int64_t kAhead = kPrefetch * sizeof(float) / sizeof(W_t);
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    vf g[RW];
    grad_cols<RW>(a, lda, x, nr, D, d, g);
#pragma GCC unroll 4
    for (int r = 0; r < RW; ++r) {
      __builtin_prefetch(w + r * D + d + kAhead, 1);
      if (buf) __builtin_prefetch(buf + r * D + d + kAhead, 1);
      sgd_apply(g[r], w + r * D + d, buf ? buf + r * D + d : nullptr, idx + r * D + d, s);
      after(r, d);
    }
  }
  const int64_t tail = d;
  for (; d < D; ++d)
    for (int r = 0; r < RW; ++r) {
      float g = 0;
      for (int64_t k = 0; k < nr; ++k) g += a[k * lda + r] * x[k * D + d];
      sgd_apply(g, w + r * D + d, buf ? buf + r * D + d : nullptr, idx + r * D + d, s);
    }
  return tail;
}

// All `rows` rows of one weight (rows x D): W[o] -= lr * step(sum_k a[k * lda + o] * x[k, :]).
// idx: the element index of w[0] in the whole weight tensor (stochastic rounding's counter).
template <typename W_t>
GATED_INLINE void skinny_grad_sgd_impl(W_t* w, W_t* buf, int64_t idx, const float* a,
                                       int64_t lda, const float* x, int64_t nr, int64_t rows,
                                       int64_t D, SgdArgs s) {
  int64_t o = 0;
  for (; o + 4 <= rows; o += 4)
    grad_sgd_tile<4>(w + o * D, buf ? buf + o * D : nullptr, idx + o * D, a + o, lda, x, nr, D,
                     s);
  for (; o < rows; ++o)
    grad_sgd_tile<1>(w + o * D, buf ? buf + o * D : nullptr, idx + o * D, a + o, lda, x, nr, D,
                     s);
}
GATED_TARGET_CLONES inline void skinny_grad_sgd16(float* w, float* buf, int64_t idx,
                                                  const float* a, int64_t lda, const float* x,
                                                  int64_t nr, int64_t rows, int64_t D,
                                                  SgdArgs s) {
  skinny_grad_sgd_impl(w, buf, idx, a, lda, x, nr, rows, D, s);
}
GATED_TARGET_CLONES inline void skinny_grad_sgd16(uint16_t* w, uint16_t* buf, int64_t idx,
                                                  const float* a, int64_t lda, const float* x,
                                                  int64_t nr, int64_t rows, int64_t D,
                                                  SgdArgs s) {
  skinny_grad_sgd_impl(w, buf, idx, a, lda, x, nr, rows, D, s);
}

// ---------------------------------------------------------------------------------------------
// The same two kernels in 8 lanes, for AVX2 (one ymm register per value; compiled for
// x86-64-v3 only and run where skinny_lanes() says 8). The 16-lane kernels' tiles, with two
// ymm registers per value, need 16 or more of AVX2's 16 registers for their accumulators (the
// update's also re-broadcasts its 4 x nr factors of dZ every 16 columns: AVX2's FMAs have no
// broadcast operand, so each is a load). Here the forward holds 8 accumulators of one ymm, and
// the update forms one weight row at a time with the row's nr <= 8 factors of dZ broadcast
// into registers once, before its pass over D. On a 2-core AMD EPYC (Zen 2), K=100 encoder,
// H=128: forward 7.4 -> 1.6 ms, fused update 19.4 -> 5.5 ms (the update's memory floor: about
// 5 ms). The update sums its gradient over the activation rows in the same order as the
// 16-lane kernel, so the two give the same bits.

GATED_INLINE float hsum8(v8f v) {
  float s[8];
  store(s, v);
#pragma GCC unroll 8
  for (int w = 4; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
}

// z[i * ldz] (+)= <x[i * ldx, :n], w[:n]> for i < NX: one weight row (a piece of n floats)
// against NX activation rows; pf: where to prefetch, pf[d] while w[d] is read.
template <int NX, typename W_t>
GATED_INLINE void dot_tile8(const float* x, int64_t ldx, const W_t* w, const W_t* pf, int64_t n,
                            float* z, int64_t ldz, bool add) {
  v8f acc[NX];
#pragma GCC unroll 8
  for (int i = 0; i < NX; ++i) acc[i] = v8f{};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    if ((d & 15) == 0) __builtin_prefetch(pf + d);  // one per 64-byte line
    const v8f wv = load8(w + d);
#pragma GCC unroll 8
    for (int i = 0; i < NX; ++i) acc[i] += wv * load8(x + i * ldx + d);
  }
#pragma GCC unroll 8
  for (int i = 0; i < NX; ++i) {
    float s = hsum8(acc[i]);
    for (int64_t t = d; t < n; ++t) s += x[i * ldx + t] * load1(w + t);
    z[i * ldz] = add ? z[i * ldz] + s : s;
  }
}

// dot_tile8 for nx <= N activation rows
template <int N, typename W_t>
GATED_INLINE void dot_rows8(const float* x, int64_t ldx, int nx, const W_t* w, const W_t* pf,
                            int64_t n, float* z, int64_t ldz, bool add) {
  if constexpr (N > 1) {
    if (nx < N) return dot_rows8<N - 1>(x, ldx, nx, w, pf, n, z, ldz, add);
  }
  dot_tile8<N>(x, ldx, w, pf, n, z, ldz, add);
}

// One weight row against up to 8 activation rows per pass, as the 16-lane kernel does: the
// weight is streamed in one continuous pass (K=100 encoder, 2 threads: H=128 1.6 ms, H=1024
// 13.7 ms against 12 ms to sum the weight). A 2 x 4 tile (2 weight rows, 4 activation rows,
// fewer loads per FMA) measured slower, 2.4 / 18.5 ms: its second pass over the 4 other
// activation rows reads the two rows from L1 and leaves memory idle; 3 x 4 no better.
// Where the activation rows outgrow L1 (D > 2 * kChunk8: CIFAR's 8 rows of D = 3072 are
// 96 KB), they are taken kChunk8 columns at a time, each piece for every weight row before the
// next, prefetching the next weight row's piece: the activations' piece stays in L1 (K=40
// CIFAR encoder, H=128: 5.1 -> 3.9 ms against 2.5 ms to sum the weight; pieces of 256: 4.5 ms;
// pieces for MNIST's D = 784 too: slower, 2.7 against 2.2 ms at H=128).
constexpr int64_t kChunk8 = 512;
template <typename W_t>
GATED_INLINE void skinny_xwt8_impl(const float* x, int64_t nx, const W_t* w, int64_t rows,
                                   int64_t D, float* z, int64_t ldz) {
  constexpr int64_t kAhead = kPrefetch * sizeof(float) / sizeof(W_t);
  const int64_t piece = D > 2 * kChunk8 ? kChunk8 : D;
  for (int64_t c = 0; c < D; c += piece) {
    const int64_t n = std::min(piece, D - c);
    for (int64_t r = 0; r < rows; ++r) {
      const W_t* wr = w + r * D + c;
      const W_t* pf = piece == D ? wr + kAhead : (r + 1 < rows ? wr + D : w + c + n);
      for (int64_t i = 0; i < nx; i += 8)
        dot_rows8<8>(x + i * D + c, D, int(std::min<int64_t>(8, nx - i)), wr, pf, n,
                     z + i * ldz + r, ldz, c > 0);
    }
  }
}
GATED_TARGET_V3 inline void skinny_xwt8(const float* x, int64_t nx, const float* w, int64_t rows,
                                        int64_t D, float* z, int64_t ldz) {
  skinny_xwt8_impl(x, nx, w, rows, D, z, ldz);
}
GATED_TARGET_V3 inline void skinny_xwt8(const float* x, int64_t nx, const uint16_t* w,
                                        int64_t rows, int64_t D, float* z, int64_t ldz) {
  skinny_xwt8_impl(x, nx, w, rows, D, z, ldz);
}

// One row of W (and buf) updated with the gradient row sum_k a[k * lda] * x[k, :], NR rows.
template <int NR, typename W_t>
GATED_INLINE void grad_sgd_row8(W_t* w, W_t* buf, int64_t idx, const float* a, int64_t lda,
                                const float* x, int64_t D, const SgdArgs& s) {
  constexpr int64_t kAhead = kPrefetch * sizeof(float) / sizeof(W_t);
  v8f av[NR];
#pragma GCC unroll 8
  for (int k = 0; k < NR; ++k) av[k] = v8f{} + a[k * lda];
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    v8f g{};
#pragma GCC unroll 8
    for (int k = 0; k < NR; ++k) g += av[k] * load8(x + k * D + d);
    if ((d & 15) == 0) {
      __builtin_prefetch(w + d + kAhead, 1);
      if (buf) __builtin_prefetch(buf + d + kAhead, 1);
    }
    sgd_apply(g, w + d, buf ? buf + d : nullptr, idx + d, s);
  }
  for (; d < D; ++d) {
    float g = 0;
    for (int k = 0; k < NR; ++k) g += a[k * lda] * x[k * D + d];
    sgd_apply(g, w + d, buf ? buf + d : nullptr, idx + d, s);
  }
}

template <int N, typename W_t>
GATED_INLINE void grad_sgd_rows8(W_t* w, W_t* buf, int64_t idx, const float* a, int64_t lda,
                                 const float* x, int nr, int64_t rows, int64_t D,
                                 const SgdArgs& s) {
  if constexpr (N > 1) {
    if (nr < N) return grad_sgd_rows8<N - 1>(w, buf, idx, a, lda, x, nr, rows, D, s);
  }
  for (int64_t o = 0; o < rows; ++o)
    grad_sgd_row8<N>(w + o * D, buf ? buf + o * D : nullptr, idx + o * D, a + o, lda, x, D, s);
}
// (nr <= 8: the caller takes the 16-lane kernel above it)
GATED_TARGET_V3 inline void skinny_grad_sgd8(float* w, float* buf, int64_t idx, const float* a,
                                             int64_t lda, const float* x, int64_t nr,
                                             int64_t rows, int64_t D, SgdArgs s) {
  grad_sgd_rows8<8>(w, buf, idx, a, lda, x, int(nr), rows, D, s);
}
GATED_TARGET_V3 inline void skinny_grad_sgd8(uint16_t* w, uint16_t* buf, int64_t idx,
                                             const float* a, int64_t lda, const float* x,
                                             int64_t nr, int64_t rows, int64_t D, SgdArgs s) {
  grad_sgd_rows8<8>(w, buf, idx, a, lda, x, int(nr), rows, D, s);
}

// ---------------------------------------------------------------------------------------------
// The fused update with the next step's forward ("lookahead", pathway_sgd_lookahead_): each
// weight row is updated and then, while it is still in L1, dotted with the next batch's
// activation rows xn, so the next forward (zn = xn W_new^T) needs no second pass over the
// weight in memory: the encoder weight is streamed once per step instead of twice. The two
// passes over a row are the update and forward kernels' own loops (same sums, same order), so
// weights and zn are bit for bit those of pathway_sgd_ followed by the forward.
// (One pass, the new values dotted with xn while in registers, measured slower on AVX2, K=100
// encoder at H=1024: 36 ms against 31 ms for the two kernels: its 8 accumulators and the
// update's 8 factors of dZ need all 16 ymm registers, so the factors spill and the loop is
// bound by its loads.)

// Rows are taken kLookaheadRows at a time, each group updated and then dotted: x's rows stay
// in L1 for the updates, then xn's for the forward, which reads the group's new rows from L2.
// (Row by row, x's and xn's 25 KB each at D = 784 evicted each other from L1: the k-path step
// was 1 ms slower at H=128 with the lookahead than without.)
#ifndef GATED_LOOKAHEAD_ROWS
#define GATED_LOOKAHEAD_ROWS 16
#endif
constexpr int64_t kLookaheadRows = GATED_LOOKAHEAD_ROWS;

// 8 lanes (nr <= 8 rows of x and of xn).
template <int N, typename W_t>
GATED_INLINE void grad_sgd_fwd_rows8(W_t* w, W_t* buf, int64_t idx, const float* a, int64_t lda,
                                     const float* x, int nr, int64_t rows, int64_t D,
                                     const SgdArgs& s, const float* xn, float* zn,
                                     int64_t ldzn) {
  if constexpr (N > 1) {
    if (nr < N)
      return grad_sgd_fwd_rows8<N - 1>(w, buf, idx, a, lda, x, nr, rows, D, s, xn, zn, ldzn);
  }
  const int64_t piece = D > 2 * kChunk8 ? kChunk8 : D;  // as skinny_xwt8_impl
  for (int64_t o0 = 0; o0 < rows; o0 += kLookaheadRows) {
    const int64_t o1 = std::min(rows, o0 + kLookaheadRows);
    for (int64_t o = o0; o < o1; ++o)
      grad_sgd_row8<N>(w + o * D, buf ? buf + o * D : nullptr, idx + o * D, a + o, lda, x, D, s);
    for (int64_t c = 0; c < D; c += piece)
      for (int64_t o = o0; o < o1; ++o)
        dot_tile8<N>(xn + c, D, w + o * D + c, w + o * D + c, std::min(piece, D - c), zn + o,
                     ldzn, c > 0);
  }
}

// 16 lanes: the update's tiles of 4 rows, then the forward of the group.
template <typename W_t>
GATED_INLINE void grad_sgd_fwd_rows16(W_t* w, W_t* buf, int64_t idx, const float* a,
                                      int64_t lda, const float* x, int64_t nr, int64_t rows,
                                      int64_t D, const SgdArgs& s, const float* xn, float* zn,
                                      int64_t ldzn) {
  for (int64_t o0 = 0; o0 < rows; o0 += kLookaheadRows) {
    const int64_t o1 = std::min(rows, o0 + kLookaheadRows);
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4)
      grad_sgd_tile<4>(w + o * D, buf ? buf + o * D : nullptr, idx + o * D, a + o, lda, x, nr,
                       D, s);
    for (; o < o1; ++o)
      grad_sgd_tile<1>(w + o * D, buf ? buf + o * D : nullptr, idx + o * D, a + o, lda, x, nr,
                       D, s);
    for (o = o0; o < o1; ++o) dot_rows<1>(xn, int(nr), w + o * D, D, zn + o, ldzn);
  }
}
// 16 lanes in one pass, for AVX-512's 32 registers: RW rows of W (and buf) updated 16 columns
// at a time, and the new values, reloaded as stored (a bfloat16 weight rounded), dotted at once
// with the NX rows of xn: 2 x 8 accumulators, the two rows' gradients and the loads fit in the
// register file, and each weight line is read and written once with no second pass from L2.
// The update is grad_sgd_tile itself and the dot products end as dot_tile's (dot_finish), so
// the results are bit for bit those of the update and then the forward.
template <int NX, int RW, typename W_t>
GATED_INLINE void grad_sgd_fwd_tile(W_t* w, W_t* buf, int64_t idx, const float* a, int64_t lda,
                                    const float* x, int64_t D, const SgdArgs& s,
                                    const float* xn, float* zn, int64_t ldzn) {
  vf acc[RW][NX];
#pragma GCC unroll 8
  for (int r = 0; r < RW; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < NX; ++i) acc[r][i] = vf{};
  auto dot = [&](int r, int64_t d) {
    const vf wv = load(w + r * D + d);  // as stored
#pragma GCC unroll 8
    for (int i = 0; i < NX; ++i) acc[r][i] += wv * load(xn + i * D + d);
  };
  const int64_t tail = grad_sgd_tile<RW>(w, buf, idx, a, lda, x, NX, D, s, dot);
  dot_finish<NX, RW>(acc, xn, w, tail, D, zn, ldzn);
}
// Dispatches nr (the rows of x and of xn, at most N) to the tile compiled for exactly that
// many rows, then runs the weight's rows two at a time and an odd last row alone.
template <int N, typename W_t>
GATED_INLINE void grad_sgd_fwd_onepass16(W_t* w, W_t* buf, int64_t idx, const float* a,
                                         int64_t lda, const float* x, int nr, int64_t rows,
                                         int64_t D, const SgdArgs& s, const float* xn,
                                         float* zn, int64_t ldzn) {
  if constexpr (N > 1) {
    if (nr < N)
      return grad_sgd_fwd_onepass16<N - 1>(w, buf, idx, a, lda, x, nr, rows, D, s, xn, zn,
                                           ldzn);
  }
  int64_t o = 0;
  for (; o + 2 <= rows; o += 2)
    grad_sgd_fwd_tile<N, 2>(w + o * D, buf ? buf + o * D : nullptr, idx + o * D, a + o, lda, x,
                            D, s, xn, zn + o, ldzn);
  for (; o < rows; ++o)
    grad_sgd_fwd_tile<N, 1>(w + o * D, buf ? buf + o * D : nullptr, idx + o * D, a + o, lda, x,
                            D, s, xn, zn + o, ldzn);
}
// Which 16-lane lookahead: the one pass for bfloat16 weights where AVX-512 gives it 32
// registers, else the groups (cpu_lookahead, kernel_choice.h, forces one). Measured on a 2-core
// AMD EPYC with AVX-512 (K=100 encoder, D=784, interleaved, ms at H=128 / 1024): bfloat16 one
// pass 4.85 / 38.7, groups 5.38 / 44.3 (the update alone 3.49 / 29.4: compute-bound, and the
// groups widen each new row a second time from L2); float32 one pass 5.28 / 41.4, groups
// 5.36 / 40.3 (the update alone 4.33 / 32.7: memory-bound, where the one pass's longer loop per
// cache line gained nothing).
inline bool lookahead_onepass(bool bf16) {
  const int64_t forced = forced_kernel(KernelChoice::kCpuLookahead);
  if (forced != kAutomatic) return forced == 1;
  return bf16 && wide_vectors();
}

// The entry points, per weight storage type (target_clones and target need non-template
// functions: one overload each for float and bfloat16 bits).
#define GATED_GRAD_SGD_FWD(NAME, TARGET, W_t, BODY)                                            \
  TARGET inline void NAME(W_t* w, W_t* buf, int64_t idx, const float* a, int64_t lda,          \
                          const float* x, int64_t nr, int64_t rows, int64_t D, SgdArgs s,      \
                          const float* xn, float* zn, int64_t ldzn) {                          \
    BODY(w, buf, idx, a, lda, x, nr, rows, D, s, xn, zn, ldzn);                                \
  }
#define GATED_FWD16_BODY(w, buf, idx, a, lda, x, nr, ...)                               \
  lookahead_onepass(sizeof(*(w)) == 2)                                                   \
      ? grad_sgd_fwd_onepass16<8>(w, buf, idx, a, lda, x, int(nr), __VA_ARGS__)          \
      : grad_sgd_fwd_rows16(w, buf, idx, a, lda, x, nr, __VA_ARGS__)
#define GATED_FWD8_BODY(w, buf, idx, a, lda, x, nr, ...) \
  grad_sgd_fwd_rows8<8>(w, buf, idx, a, lda, x, int(nr), __VA_ARGS__)
GATED_GRAD_SGD_FWD(skinny_grad_sgd_fwd16, GATED_TARGET_CLONES, float, GATED_FWD16_BODY)
GATED_GRAD_SGD_FWD(skinny_grad_sgd_fwd16, GATED_TARGET_CLONES, uint16_t, GATED_FWD16_BODY)
GATED_GRAD_SGD_FWD(skinny_grad_sgd_fwd8, GATED_TARGET_V3, float, GATED_FWD8_BODY)
GATED_GRAD_SGD_FWD(skinny_grad_sgd_fwd8, GATED_TARGET_V3, uint16_t, GATED_FWD8_BODY)
#undef GATED_FWD8_BODY
#undef GATED_FWD16_BODY
#undef GATED_GRAD_SGD_FWD

// The skinny forward and fused update at a vector width from skinny_lanes() (W_t: float or
// bfloat16 bits).
template <typename W_t>
inline void skinny_xwt(const float* x, int64_t nx, const W_t* w, int64_t rows, int64_t D,
                       float* z, int64_t ldz, int lanes) {
  if (lanes == 8) return skinny_xwt8(x, nx, w, rows, D, z, ldz);
  skinny_xwt16(x, nx, w, rows, D, z, ldz);
}
template <typename W_t>
inline void skinny_grad_sgd(W_t* w, W_t* buf, int64_t idx, const float* a, int64_t lda,
                            const float* x, int64_t nr, int64_t rows, int64_t D, SgdArgs s,
                            int lanes) {
  if (lanes == 8 && nr <= 8) return skinny_grad_sgd8(w, buf, idx, a, lda, x, nr, rows, D, s);
  skinny_grad_sgd16(w, buf, idx, a, lda, x, nr, rows, D, s);
}
// (nr <= 8 rows of x and of xn)
template <typename W_t>
inline void skinny_grad_sgd_fwd(W_t* w, W_t* buf, int64_t idx, const float* a, int64_t lda,
                                const float* x, int64_t nr, int64_t rows, int64_t D, SgdArgs s,
                                const float* xn, float* zn, int64_t ldzn, int lanes) {
  if (lanes == 8)
    return skinny_grad_sgd_fwd8(w, buf, idx, a, lda, x, nr, rows, D, s, xn, zn, ldzn);
  skinny_grad_sgd_fwd16(w, buf, idx, a, lda, x, nr, rows, D, s, xn, zn, ldzn);
}

// ---------------------------------------------------------------------------------------------
// The cross-entropy forward of one path: B rows of C float logits (contiguous), 8 rows at a
// time with one row per vector lane (the block transposed in L1), so that max, argmax, exp and
// the row sums are vector operations over the classes. (Row by row, C = 10 classes per row,
// the scalar argmax bit masks and the double-precision sums took ~70% of the CE forward.)
// expf for 8 lanes: the range reduction and polynomial of cpu/cross_entropy.cpp's expf_poly (relative
// error < 2 ulp on [-87, 88]); NaN in, NaN out; 0 below -87.33.
GATED_INLINE v8f exp8(v8f x) {
  const v8f xc = x < -87.33f ? v8f{} - 87.33f : (x > 88.72f ? v8f{} + 88.72f : x);
  const v8f t = xc * 1.44269504088896341f + 0.5f;
  v8i ni = __builtin_convertvector(t, v8i);               // truncates toward zero
  ni -= (__builtin_convertvector(ni, v8f) > t) ? 1 : 0;  // ... so floor for t < 0
  const v8f scale = (v8f)((ni + 127) << 23);
  const v8f out = exp_core(xc, __builtin_convertvector(ni, v8f)) * scale;
  return x != x ? x : (x < -87.33f ? v8f{} : out);
}

// logf for 8 lanes: Cephes' logf (mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial, the
// exponent times ln 2 added in two parts; relative error about 1e-7). For positive normal x
// (the CE's sums of exponentials lie in [1, C]); NaN in gives NaN, +inf gives +inf.
GATED_INLINE v8f log8(v8f x) {
  const v8i u = (v8i)x;
  v8i e = ((u >> 23) & 0xff) - 126;
  v8f m = (v8f)((u & 0x807fffff) | 0x3f000000);  // x = m * 2^e, m in [0.5, 1)
  const v8i small = m < 0.707106781186547524f;
  e -= small ? 1 : 0;
  m = (small ? m + m : m) - 1.0f;
  const v8f z = m * m;
  v8f p = m * 7.0376836292e-2f - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  const v8f ef = __builtin_convertvector(e, v8f);
  v8f r = p * m * z + ef * -2.12194440e-4f - 0.5f * z;
  r = m + r + ef * 0.693359375f;
  return x != x ? x : (x == __builtin_inff() ? x : r);
}

// For rows b < B (rows sb floats apart): lse[b] = log(sum_c exp(l[b, c])) (shifted by the row
// max; NaN when the row has a NaN or the max is +inf, as log_softmax gives), and returns
// sum_b (lse[b] - l[b, y[b]]) and, in hits, the rows whose argmax (first maximum; first NaN if
// any) equals y[b].
GATED_TARGET_CLONES inline double ce_rows(const float* l, int64_t sb, const int64_t* y, int64_t B,
                                          int64_t C, float* lse, int64_t& hits) {
  double nll = 0;
  hits = 0;
  float t[64 * 8];  // the transposed group: t[c * 8 + lane]
  for (int64_t b0 = 0; b0 < B; b0 += 8) {
    const int nb = int(std::min<int64_t>(8, B - b0));
    v8f best{}, sum{};
    v8i arg{}, nan_seen{};
    const int64_t chunk = std::min<int64_t>(C, 64);  // (C > 64: the classes in chunks)
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t nc = std::min(chunk, C - c0);
      for (int i = 0; i < 8; ++i)
        for (int64_t c = 0; c < nc; ++c)
          t[c * 8 + i] = i < nb ? l[(b0 + i) * sb + c0 + c] : 0.0f;
      int64_t c = 0;
      if (c0 == 0) {
        best = *reinterpret_cast<const v8f*>(t);
        nan_seen = best != best;
        c = 1;
      }
      for (; c < nc; ++c) {
        const v8f v = *reinterpret_cast<const v8f*>(t + c * 8);
        const v8i isnan = v != v;
        const v8i upd = ~nan_seen & ((v > best) | isnan);
        best = upd ? v : best;
        arg = upd ? v8i{} + int32_t(c0 + c) : arg;
        nan_seen |= isnan;
      }
    }
    // best is the row max (NaN once a NaN was seen); exp(l - max) summed over the classes
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t nc = std::min(chunk, C - c0);
      if (C > chunk)  // re-transpose this chunk (one chunk stays in t from the max pass)
        for (int i = 0; i < 8; ++i)
          for (int64_t c = 0; c < nc; ++c)
            t[c * 8 + i] = i < nb ? l[(b0 + i) * sb + c0 + c] : 0.0f;
      for (int64_t c = 0; c < nc; ++c)
        sum += exp8(*reinterpret_cast<const v8f*>(t + c * 8) - best);
    }
    float ls[8];
    int32_t as[8];
    const v8f lse8 = log8(sum) + best;
    __builtin_memcpy(ls, &lse8, sizeof(ls));
    __builtin_memcpy(as, &arg, sizeof(as));
    for (int i = 0; i < nb; ++i) {
      const int64_t b = b0 + i;
      lse[b] = ls[i];
      nll += double(ls[i]) - double(l[b * sb + y[b]]);
      hits += as[i] == y[b];
    }
  }
  return nll;
}

// The cross-entropy backward of one path, as ce_rows: B rows of C float logits (rows sb floats
// apart), 8 rows at a time in vector lanes, d[b, c] = w * (softmax(l[b])[c] - [c == y[b]]) into
// rows dsb floats apart. With lse (the forward's row log-sum-exp) softmax = exp(l - lse), as
// the scalar path computes it; with lse null (16-bit logits, whose stored lse is too coarse)
// it is recomputed in float from the row max: exp(l - max) * (w / sum). (Row by row with
// scalar exps, gathers and scatters the k-path's 10-class backward took ~2x longer.)
GATED_TARGET_CLONES inline void ce_grad_rows(const float* l, int64_t sb, const float* lse,
                                             const int64_t* y, float w, int64_t B, int64_t C,
                                             float* d, int64_t dsb) {
  float t[64 * 8];  // the transposed group: t[c * 8 + lane]
  const int64_t chunk = std::min<int64_t>(C, 64);  // (C > 64: the classes in chunks)
  for (int64_t b0 = 0; b0 < B; b0 += 8) {
    const int nb = int(std::min<int64_t>(8, B - b0));
    auto load = [&](int64_t c0, int64_t nc) {
      for (int i = 0; i < 8; ++i)
        for (int64_t c = 0; c < nc; ++c)
          t[c * 8 + i] = i < nb ? l[(b0 + i) * sb + c0 + c] : 0.0f;
    };
    v8f shift{}, scale{};
    v8i target{};
    for (int i = 0; i < nb; ++i) target[i] = int32_t(y[b0 + i]);
    if (lse != nullptr) {
      for (int i = 0; i < nb; ++i) shift[i] = lse[b0 + i];
      scale += w;
    } else {  // the row max (NaN once a NaN is seen, as max_pass), then the sum of exp
      v8f best{}, sum{};
      for (int64_t c0 = 0; c0 < C; c0 += chunk) {
        const int64_t nc = std::min(chunk, C - c0);
        load(c0, nc);
        for (int64_t c = 0; c < nc; ++c) {
          const v8f v = *reinterpret_cast<const v8f*>(t + c * 8);
          best = c0 + c == 0 ? v : (best != best ? best : (v > best || v != v ? v : best));
        }
      }
      for (int64_t c0 = 0; c0 < C; c0 += chunk) {
        const int64_t nc = std::min(chunk, C - c0);
        if (C > chunk) load(c0, nc);
        for (int64_t c = 0; c < nc; ++c) {  // (one chunk: t keeps exp(l - max))
          v8f& v = *reinterpret_cast<v8f*>(t + c * 8);
          const v8f e = exp8(v - best);
          sum += e;
          if (C <= chunk) v = e;
        }
      }
      shift = best;
      scale = w / sum;
    }
    const bool have_e = lse == nullptr && C <= chunk;
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t nc = std::min(chunk, C - c0);
      if (!have_e) load(c0, nc);
      for (int64_t c = 0; c < nc; ++c) {
        v8f& v = *reinterpret_cast<v8f*>(t + c * 8);
        const v8f e = (have_e ? v : exp8(v - shift)) * scale;
        v = target == int32_t(c0 + c) ? e - w : e;
      }
      for (int i = 0; i < nb; ++i)
        for (int64_t c = 0; c < nc; ++c) d[(b0 + i) * dsb + c0 + c] = t[c * 8 + i];
    }
  }
}
#endif  // GATED_HAVE_VECTOR_EXT

}  // namespace simd
}  // namespace gated_ops

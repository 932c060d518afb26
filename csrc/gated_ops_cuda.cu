// gated_ops: the CUDA kernels (float32, float64, and bf16 / fp16 with fp32 accumulation).
//
// The math of every op is gated_ops/reference.py; the exact semantics are the CPU kernels of
// gated_ops.cpp; the plan layout is gated_ops/plan.py. Rules kept by every launcher here:
//   * everything runs on the current stream, with no host synchronisation: plan indices are never
//     read on the host (make_plan validated them; the kernels assert the source / weight /
//     destination indices they read on the device, not zrow / zcol / CSR), only the layout ints;
//   * no float atomics: every output element is owned by one thread (or one warp / block that
//     reduces in a fixed order), so two runs are bitwise equal;
//   * scratch tensors depend only on the shapes, so a training step can be captured in a graph.
//
// Design for the k-path step (B = 8 rows per pathway, weights streamed every step):
//   * "skinny" kernels (CUDA cores, fp32 accumulation) when the batch is small: each warp streams
//     a few rows of W with 16-byte loads against the 8 staged rows of x, so W is read once per
//     step at close to DRAM bandwidth and no 128-row tensor-core tile is wasted on 8 rows;
//   * the gate multiply, the bias, the pathway sum (forward) and the SGD update (pathway_sgd_) are
//     fused into the kernels' epilogues;
//   * when the batch (or the reduction of a blocked GEMM) is large, the GEMM goes to cuBLAS
//     (at::bmm on the plan's block views, as the CPU kernels do) and a small kernel does the
//     epilogue. Grouped plans always use the skinny kernels (their group sizes live on the device).
//
// Where the CPU kernels raise on a value they read, these kernels cannot without a host sync:
//   * a gated_cross_entropy gate row summing to zero gives a NaN loss for that replica (the CPU
//     raises); the NaN shows in the loss the caller logs, and the backward is NaN/inf as well;
//   * a class index outside [0, C) and a plan index out of range trip a device-side assert
//     (CUDA_KERNEL_ASSERT, as torch's own nll_loss does), which fails the next CUDA call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "gated_ops.h"

#ifdef GATED_OPS_CUDA_EMU
// The host compiler builds this file with the CUDA execution model emulated on the CPU
// (csrc/cuda_emu/cuda_emu.h; gated_ops._cuda_emu, a testing backend): these same kernels and
// launchers, registered for CPU tensors under torch.ops.gated_ops_cudaemu.
#include "cuda_emu/cuda_emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
// Every launch is GATED_LAUNCH(kernel, grid, block)(args): no dynamic shared memory, the
// current stream.
#define GATED_LAUNCH(kernel, grid, block) \
  kernel<<<(grid), (block), 0, at::cuda::getCurrentCUDAStream()>>>
#define GATED_OPS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(gated_ops, CUDA, m)
#define GATED_KERNEL_DEVICE at::kCUDA
#endif

namespace gated_ops {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Policy: which path a call takes (host-side, from shapes and layout ints only).
//
// kSkinnyBatch: up to this many rows per pathway the skinny kernels are used (4 tiles of 8 rows;
// each tile re-reads its W rows, from L2 when the tiles of one slab run side by side).
constexpr int64_t kSkinnyBatch = 32;
// kSkinnyRows: a blocked weight whose gradient sums more rows than this (ns * B: the shared hidden
// layer and the decoders of the k-path net have 100 * 8 = 800) gets its gradient from cuBLAS;
// the same 64 as the CPU kernels' kSkinnyRows.
constexpr int64_t kSkinnyRows = 64;
// kSkinnyReduce: a blocked grad_x whose reduction (nm * D_out) is longer than this goes to cuBLAS
// (the decoders: 100 * 10 = 1000, a real GEMM), shorter ones (encoders, hidden: 128) stay skinny.
constexpr int64_t kSkinnyReduce = 512;

constexpr int kWarp = 32;
constexpr int kBT = 8;          // batch rows per tile in the skinny kernels
constexpr int kRowsPerWarp = 4;  // W rows per warp: kRowsPerWarp * kBT = 32 = one value per lane
constexpr int kMaxWarps = 8;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// 16-byte vectors: 4 floats, 8 halves, 2 doubles.
template <typename scalar_t>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* __restrict__ p, acc_t (&out)[VEC]) {
  const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = static_cast<acc_t>(pk.v[v]);
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t (&in)[VEC]) {
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int v = 0; v < VEC; ++v) pk.v[v] = static_cast<scalar_t>(in[v]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pk;
}

// The weight-gradient kernel's vector: at most 4 values (8-byte loads for 16-bit types), so that
// its 4 x VEC accumulators fit 4 blocks of 256 threads per SM (ptxas: 8 bf16 per lane took 103
// registers, 2 blocks).
template <typename scalar_t>
constexpr int wgrad_vec_of() {
  return vec_of<scalar_t>() < 4 ? vec_of<scalar_t>() : 4;
}

// A plan index read on the device, checked against its range (the host never reads them).
__device__ __forceinline__ int64_t checked(int64_t v, int64_t bound) {
  CUDA_KERNEL_ASSERT(v >= 0 && v < bound);
  return v;
}

// Warp reduce-scatter of 32 values: lane l returns the warp-wide sum of v[l]. 31 shuffles instead
// of 32 * 5 for 32 separate reductions, in a fixed pattern (deterministic). Each step halves the
// live values: a lane keeps the half whose index bit O matches its lane bit O. The steps are
// separate instantiations so that every index is a constant and v stays in registers.
template <int O, typename T>
__device__ __forceinline__ void reduce_scatter_step(T (&v)[32], int lane) {
  const bool upper = lane & O;
#pragma unroll
  for (int i = 0; i < O; ++i) {
    const T send = upper ? v[i] : v[i + O];
    const T keep = upper ? v[i + O] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
}

template <typename T>
__device__ __forceinline__ T reduce_scatter32(T (&v)[32], int lane) {
  reduce_scatter_step<16>(v, lane);
  reduce_scatter_step<8>(v, lane);
  reduce_scatter_step<4>(v, lane);
  reduce_scatter_step<2>(v, lane);
  reduce_scatter_step<1>(v, lane);
  return v[0];
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of one value per thread over a block of up to 1024 threads, in a fixed order; the result
// is valid in thread 0. `red` holds one value per warp.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < (int)(blockDim.x / kWarp); ++w) total += red[w];
  }
  return total;
}

// L2 prefetch of the 128-byte lines holding [p, p + bytes), one line per lane in turn: a hint
// (no register stays live, nothing waits for it), so that the loads that follow find their
// lines in L2 instead of paying a DRAM round trip each. Off by default until measured on a GPU:
// GATED_OPS_CUDA_PREFETCH=1 turns it on for the skinny forward and the fused SGD (prefetch_on).
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes, int lane) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
  for (uintptr_t a = (reinterpret_cast<uintptr_t>(p) & ~uintptr_t(127)) + uintptr_t(lane) * 128;
       a < end; a += uintptr_t(kWarp) * 128) {
#ifdef GATED_OPS_CUDA_EMU
    (void)a;  // a hint: nothing to emulate
#else
    asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
#endif
  }
}

// One element of torch.optim.SGD's step (dampening 0) in the accumulation type: returns the new
// parameter and updates the momentum mb (when has_buf); see sgd_rows in gated_ops.cpp.
struct SgdArgs {
  double lr, momentum, weight_decay;
  bool nesterov;
  Rounding rounding;  // bfloat16 parameters: stochastic rounding of the stored value
};

template <typename acc_t>
__device__ __forceinline__ acc_t sgd_value(acc_t w, acc_t g, acc_t& mb, bool has_buf,
                                           const SgdArgs& s) {
  const acc_t wd = s.weight_decay, mom = s.momentum;
  if (wd != acc_t(0)) g += wd * w;
  if (has_buf) {
    mb = mom * mb + g;
    g = s.nesterov ? g + mom * mb : mb;
  }
  return w - acc_t(s.lr) * g;
}

// The stored value of an updated parameter element (flat index `index` in the parameter):
// rounded to nearest, or for bfloat16 with stochastic rounding, the float's bits plus 16 random
// bits of (seed, index), truncated: bit for bit simd::bf16_stochastic (the CPU kernels) and
// reference.round_stochastic_bf16. (The momentum buffer is always rounded to nearest.) `r` is
// resolved (Rounding::resolved: the step tensor read once per thread, not per element).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t round_param(acc_t v, int64_t index, const Rounding& r) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (r.stochastic) {
      const float f = static_cast<float>(v);
      uint32_t u;
      memcpy(&u, &f, sizeof(u));
      const uint32_t bits = hash32(uint32_t(index) + r.mix) & 0xffffu;
      return at::BFloat16(f != f ? uint16_t(0x7fc0) : uint16_t((u + bits) >> 16),
                          at::BFloat16::from_bits());
    }
  }
  return static_cast<scalar_t>(v);
}

// ---------------------------------------------------------------------------------------------
// The plan as raw device pointers (pointer arithmetic on the host, no value read).
Plan dev_plan(const Tensor& paths, const Tensor& csr, at::IntArrayRef layout, int64_t S,
                 int64_t M, const Tensor& ref) {
  TORCH_CHECK(paths.device().type() == GATED_KERNEL_DEVICE &&
                  csr.device().type() == GATED_KERNEL_DEVICE,
              "paths, csr (plan): expected CUDA tensors like the data; move the plan with "
              "plan.to(x.device)");
  return make_plan_view(paths, csr, layout, S, M, ref);
}


bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

int64_t flat_blocks(int64_t n, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, int64_t(1) << 22));
}

#define GATED_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------
// Input checks: the shared ones are in gated_ops.h; the dtypes these kernels support:
void check_cuda_dtype(const Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
              ": the CUDA kernels support float32, float64, float16 and bfloat16, got ",
              t.scalar_type());
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t gate_of(const scalar_t* gate, bool per_sample, int64_t p,
                                         int64_t b, int64_t B) {
  if (!gate) return acc_t(1);
  return static_cast<acc_t>(per_sample ? gate[p * B + b] : gate[p]);
}

// =============================================================================================
// Kernel 1: Z tiles, skinny (forward and grad_gate).
//
// Z (z_rows, z_cols) has one row block of B rows per "row block" k (blocked: source s0 + k;
// grouped: the pathway of by-weight rank k) and its columns are the rows of a contiguous range of
// W (blocked: the nm weights of block i = k / ns, nm * D_out rows; grouped: one weight's D_out
// rows). A block owns (k, a tile of 32 columns, a tile of 8 batch rows); each of its 8 warps
// streams 4 rows of W with 16-byte loads, reading the 8 rows of x[s] at the same columns straight
// from global memory (L1 / L2 hits after the first warp), every lane accumulating 4 x 8 partial
// dot products that one reduce-scatter turns into one Z value per lane. At the k-path encoder
// (D_in 784, D_out 128) a block reads 32 x 784 x 4 B = 100 KB of W against 25 KB of x from cache.
// (A first version staged x in shared memory behind a barrier: on the H100 the staging loop's
// latency, not the W stream, set the time: the H=1024 encoder ran at a third of DRAM bandwidth.)
//
// Shared weights (blocked plans whose ns * B rows exceed kSkinnyRows: the k-path hidden layer and
// the decoders) do not come here: one cuBLAS GEMM per block reads each weight once, where these
// tiles would re-read it from L2 for every source. (Where Z is y, ungated, with one block or no
// bias, that GEMM writes y itself: pathway_matmul_cuda.)
//
// Epilogue kFused (forward): the lane's pathway p owns its Z value; when p is the only pathway
// of its destination t (the decoders, the encoders: every k-path layer) the lane writes
// y[t, b, o] = gate * (z + bias) directly; otherwise (a summing destination) it stores z into the
// Z scratch and gather_epilogue_kernel sums the destination in CSR order (not launched at all
// when the plan's flags say every destination has one pathway).
// Otherwise (grad_gate) every z goes to the Z scratch.
template <typename scalar_t>
struct ZTileArgs {
  const scalar_t* x;     // (S, B, Di)
  const scalar_t* w;     // (M, Do, Di)
  const scalar_t* bias;  // (M, Do) or null
  const scalar_t* gate;  // (P,) / (P, B) or null
  scalar_t* y;           // (T, B, Do)
  scalar_t* z;           // (z_rows, z_cols)
  Plan p;
  int64_t B, Di, Do, zcols;
  bool per_sample, prefetch;
  int nbt, nct;
};

template <typename scalar_t, int VEC, bool kFused>
__global__ void __launch_bounds__(kMaxWarps * kWarp)
ztile_kernel(const ZTileArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Plan& p = a.p;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t bt = blockIdx.x % a.nbt;
  const int64_t ct = (blockIdx.x / a.nbt) % a.nct;
  const int64_t k = blockIdx.x / (int64_t(a.nbt) * a.nct);
  const int64_t b0 = bt * kBT;
  const int64_t rows_per_block = int64_t(blockDim.x / kWarp) * kRowsPerWarp;
  const int64_t zc0 = ct * rows_per_block + warp * kRowsPerWarp;

  int64_t s, pg = 0;  // source; grouped: the pathway
  const scalar_t* wbase;
  if (p.blocked()) {
    s = p.s0 + k;
    wbase = a.w + (p.m0 + (k / p.ns) * p.nm) * a.Do * a.Di;
  } else {
    pg = checked(p.wgt_perm[k], p.P);
    s = checked(p.src[pg], p.S);
    wbase = a.w + checked(p.wgt[pg], p.M) * a.Do * a.Di;
  }
  const scalar_t* xrow = a.x + (s * a.B + b0) * a.Di;
  const int nb = (int)min(int64_t(kBT), a.B - b0);
  if (a.prefetch && bt == 0 && zc0 < a.zcols) {  // the warp's W rows: contiguous
    const int64_t rows = min(int64_t(kRowsPerWarp), a.zcols - zc0);
    prefetch_l2(wbase + zc0 * a.Di, rows * a.Di * int64_t(sizeof(scalar_t)), lane);
  }

  acc_t acc[kRowsPerWarp * kBT];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp * kBT; ++i) acc[i] = acc_t(0);

  // x is read straight from global memory (L1 / L2: every warp of the block reads the same 8 x
  // rows, at most 8 * Di values): no shared-memory staging, no barrier, and the 4 W loads and
  // the 8 x loads of an iteration are all in flight together.
  for (int64_t d = lane * VEC; d < a.Di; d += kWarp * VEC) {
    acc_t wv[kRowsPerWarp][VEC];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (zc0 + r < a.zcols) {
        load_vec<VEC>(wbase + (zc0 + r) * a.Di + d, wv[r]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) wv[r][v] = acc_t(0);
      }
    }
#pragma unroll
    for (int b = 0; b < kBT; ++b) {
      acc_t xv[VEC];
      if (b < nb) {
        load_vec<VEC>(xrow + b * a.Di + d, xv);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) xv[v] = acc_t(0);
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[r * kBT + b] += wv[r][v] * xv[v];
      }
    }
  }
  const acc_t zv = reduce_scatter32(acc, lane);
  const int64_t zc = zc0 + (lane / kBT), b = b0 + (lane % kBT);
  if (zc >= a.zcols || b >= a.B) return;
  if (kFused) {
    int64_t q, m, o;
    if (p.blocked()) {
      const int64_t c = zc / a.Do;
      o = zc - c * a.Do;
      q = checked(p.owner[k * p.nm + c], p.P);  // the plan's owner table
      m = p.m0 + (k / p.ns) * p.nm + c;
    } else {
      q = pg; o = zc; m = p.wgt[pg];
    }
    const int64_t t = checked(p.dst[q], p.T);
    if (p.dst_ptr[t + 1] - p.dst_ptr[t] == 1) {
      const acc_t bv = a.bias ? static_cast<acc_t>(a.bias[m * a.Do + o]) : acc_t(0);
      const acc_t g = gate_of<scalar_t, acc_t>(a.gate, a.per_sample, q, b, a.B);
      a.y[(t * a.B + b) * a.Do + o] = static_cast<scalar_t>(g * (zv + bv));
      return;
    }
  }
  a.z[(k * a.B + b) * a.zcols + zc] = static_cast<scalar_t>(zv);
}

// y[t, b, o] = sum_{k in dst CSR(t)} gate * (Z_p[b, o] + bias[m_p, o]), in CSR order; with
// only_multi, destinations with exactly one pathway are skipped (ztile_kernel wrote them).
template <typename scalar_t>
__global__ void gather_epilogue_kernel(const Plan p, const scalar_t* __restrict__ z,
                                       const scalar_t* __restrict__ bias,
                                       const scalar_t* __restrict__ gate, bool per_sample,
                                       scalar_t* __restrict__ y, int64_t B, int64_t Do,
                                       int64_t ldz, bool only_multi) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = p.T * B * Do;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / (B * Do), rem = i - t * B * Do, b = rem / Do, o = rem - b * Do;
    const int64_t k0 = p.dst_ptr[t], k1 = p.dst_ptr[t + 1];
    if (only_multi && k1 - k0 == 1) continue;
    acc_t acc = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t q = checked(p.dst_perm[k], p.P);
      const acc_t zv = static_cast<acc_t>(z[(p.zrow[q] * B + b) * ldz + p.zcol[q] * Do + o]);
      const acc_t bv = bias ? static_cast<acc_t>(bias[checked(p.wgt[q], p.M) * Do + o]) : acc_t(0);
      acc += gate_of<scalar_t, acc_t>(gate, per_sample, q, b, B) * (zv + bv);
    }
    y[i] = static_cast<scalar_t>(acc);
  }
}

// gg[p, b] = <grad_y[t_p, b], Z_p[b] + bias[m_p]>: one warp per (p, b), fixed-order warp sum.
template <typename scalar_t>
__global__ void gate_epilogue_kernel(const Plan p, const scalar_t* __restrict__ gy,
                                     const scalar_t* __restrict__ z,
                                     const scalar_t* __restrict__ bias, float* __restrict__ gg_f,
                                     double* __restrict__ gg_d, int64_t B, int64_t Do,
                                     int64_t ldz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t wi = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp; wi < p.P * B;
       wi += warps) {
    const int64_t q = wi / B, b = wi - q * B;
    const int64_t t = checked(p.dst[q], p.T), m = checked(p.wgt[q], p.M);
    const scalar_t* zr = z + (p.zrow[q] * B + b) * ldz + p.zcol[q] * Do;
    const scalar_t* gr = gy + (t * B + b) * Do;
    acc_t acc = 0;
    for (int64_t o = lane; o < Do; o += kWarp) {
      const acc_t bv = bias ? static_cast<acc_t>(bias[m * Do + o]) : acc_t(0);
      acc += static_cast<acc_t>(gr[o]) * (static_cast<acc_t>(zr[o]) + bv);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      if (gg_d) gg_d[wi] = static_cast<double>(acc);
      else gg_f[wi] = static_cast<float>(acc);
    }
  }
}

// =============================================================================================
// Kernel 2: grad_z, elementwise. dZ_p[b, o] = gate[p, b] * grad_y[t_p, b, o]; every Z cell
// belongs to exactly one pathway, so dZ is fully written.
template <typename scalar_t>
__global__ void grad_z_kernel(const Plan p, const scalar_t* __restrict__ gy,
                              const scalar_t* __restrict__ gate, bool per_sample,
                              scalar_t* __restrict__ dz, int64_t B, int64_t Do, int64_t ldz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = p.P * B * Do;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = i / (B * Do), rem = i - q * B * Do, b = rem / Do, o = rem - b * Do;
    const int64_t t = checked(p.dst[q], p.T);
    const acc_t g = gate_of<scalar_t, acc_t>(gate, per_sample, q, b, B);
    dz[(p.zrow[q] * B + b) * ldz + p.zcol[q] * Do + o] =
        static_cast<scalar_t>(g * static_cast<acc_t>(gy[(t * B + b) * Do + o]));
  }
}

// =============================================================================================
// Kernel 3: grad_x, skinny. gx[s] (B, Di) = sum over the pathways of s of dZ_p (B, Do) @ W_m.
//
// A block owns (s, a tile of 32 * VEC columns of D_in, a tile of 8 batch rows); every lane owns
// VEC columns for the 8 rows (8 * VEC accumulators), and the 4 warps split the reduction rows
// (interleaved), then add their partial sums in warp order through shared memory. The reduction
// is a list of segments: blocked, the one segment of nm * D_out concatenated rows of W_i against
// the columns of dZ's row block; grouped, one segment per pathway of s (src CSR order). dZ rows
// are staged transposed (row j -> 8 batch values) in chunks of kRedChunk.
constexpr int kGxWarps = 4;
constexpr int kRedChunk = 256;

template <typename scalar_t>
struct GradXArgs {
  const scalar_t* dz;  // (z_rows, ldz)
  const scalar_t* w;   // (M, Do, Di)
  scalar_t* gx;        // (S, B, Di)
  Plan p;
  int64_t B, Di, Do, ldz;
  int nbt, ndt;
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kGxWarps * kWarp) grad_x_kernel(const GradXArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kCols = kWarp * VEC;
  constexpr int kRed = kGxWarps * kBT * kCols;       // cross-warp partial sums
  constexpr int kStage = kRedChunk * kBT;            // staged dZ
  __shared__ __align__(16) acc_t sm[kRed > kStage ? kRed : kStage];
  const Plan& p = a.p;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t bt = blockIdx.x % a.nbt;
  const int64_t dt = (blockIdx.x / a.nbt) % a.ndt;
  const int64_t k = blockIdx.x / (int64_t(a.nbt) * a.ndt);  // blocked: row block; grouped: s
  const int64_t b0 = bt * kBT, nb = min(int64_t(kBT), a.B - b0);
  const int64_t d = dt * kCols + lane * VEC;
  const bool col_ok = d < a.Di;

  acc_t acc[kBT][VEC];
#pragma unroll
  for (int b = 0; b < kBT; ++b)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[b][v] = acc_t(0);

  const int64_t nseg = p.blocked() ? 1 : p.src_ptr[k + 1] - p.src_ptr[k];
  for (int64_t e = 0; e < nseg; ++e) {
    int64_t row0, col0 = 0, len;
    const scalar_t* wseg;
    if (p.blocked()) {
      row0 = k * a.B; len = p.nm * a.Do;
      wseg = a.w + (p.m0 + (k / p.ns) * p.nm) * a.Do * a.Di;
    } else {
      const int64_t q = checked(p.src_perm[p.src_ptr[k] + e], p.P);
      row0 = p.zrow[q] * a.B; col0 = p.zcol[q] * a.Do; len = a.Do;
      wseg = a.w + checked(p.wgt[q], p.M) * a.Do * a.Di;
    }
    for (int64_t j0 = 0; j0 < len; j0 += kRedChunk) {
      const int jc = (int)min(int64_t(kRedChunk), len - j0);
      __syncthreads();
      for (int i = threadIdx.x; i < kBT * jc; i += blockDim.x) {
        const int b = i / jc, j = i - b * jc;
        sm[j * kBT + b] =
            b < nb ? static_cast<acc_t>(a.dz[(row0 + b0 + b) * a.ldz + col0 + j0 + j])
               : acc_t(0);
      }
      __syncthreads();
      if (col_ok) {
        for (int j = warp; j < jc; j += kGxWarps) {
          acc_t wv[VEC];
          load_vec<VEC>(wseg + (j0 + j) * a.Di + d, wv);
#pragma unroll
          for (int b = 0; b < kBT; ++b) {
            const acc_t dv = sm[j * kBT + b];
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[b][v] += dv * wv[v];
          }
        }
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int b = 0; b < kBT; ++b)
#pragma unroll
    for (int v = 0; v < VEC; ++v) sm[(warp * kBT + b) * kCols + lane * VEC + v] = acc[b][v];
  __syncthreads();
  const int64_t s = p.blocked() ? p.s0 + k : k;
  for (int i = threadIdx.x; i < kBT * kCols; i += blockDim.x) {
    const int b = i / kCols, c = i - b * kCols;
    const int64_t col = dt * kCols + c;
    if (b >= nb || col >= a.Di) continue;
    acc_t sum = 0;
#pragma unroll
    for (int w = 0; w < kGxWarps; ++w) sum += sm[(w * kBT + b) * kCols + c];
    a.gx[(s * a.B + b0 + b) * a.Di + col] = static_cast<scalar_t>(sum);
  }
}

// =============================================================================================
// The bias gradient (grad_bias_kernel, and the bias step folded into a weight update's launch).
// A block owns 32 consecutive (m, o) columns and 8 row lanes: lane row j sums rows j, j + 8, ...
// of the column's rows (blocked: the ns * B rows of m's block; grouped: the B rows of each of
// m's pathways, wgt CSR order), then row lane 0 adds the 8 partial sums in order: deterministic,
// coalesced (32 columns of a dZ row per load), and 8 times the parallelism of a thread per column
// on the k-path's long shared-weight columns (800 rows). Blocks of fewer than 8 warps (a weight
// update's launch) take several row lanes per thread: the same sums, bit for bit.
constexpr int kBiasRows = 8;

// kSGD (pathway_bias_sgd_, or a weight update's launch): the column sum is the bias gradient, in
// the accumulation type (not rounded to a 16-bit bias's type), and steps the bias and its
// momentum in place. blk: the block's index among the bias blocks.
template <typename scalar_t, bool kSGD>
__device__ void grad_bias_block(const Plan& p, const scalar_t* __restrict__ dz,
                                scalar_t* __restrict__ gb, scalar_t* __restrict__ buf, int64_t B,
                                int64_t Do, int64_t ldz, const SgdArgs& sgd, int64_t blk) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kBiasRows][kWarp];
  const int tx = threadIdx.x % kWarp;
  const int64_t i = blk * int64_t(kWarp) + tx;
  for (int ty = threadIdx.x / kWarp; ty < kBiasRows; ty += blockDim.x / kWarp) {
    acc_t acc = 0;
    if (i < p.M * Do) {
      const int64_t m = i / Do, o = i - m * Do;
      if (p.blocked()) {
        if (m >= p.m0 && m < p.m0 + p.n * p.nm) {
          const int64_t j = m - p.m0, ii = j / p.nm;
          const scalar_t* col = dz + ii * p.ns * B * ldz + (j - ii * p.nm) * Do + o;
          const int64_t n = p.ns * B;
#pragma unroll 4
          for (int64_t r = ty; r < n; r += kBiasRows) acc += static_cast<acc_t>(col[r * ldz]);
        }
      } else {
        for (int64_t e = p.wgt_ptr[m]; e < p.wgt_ptr[m + 1]; ++e) {
          const int64_t q = checked(p.wgt_perm[e], p.P);
          const scalar_t* col = dz + p.zrow[q] * B * ldz + p.zcol[q] * Do + o;
          for (int64_t b = ty; b < B; b += kBiasRows) acc += static_cast<acc_t>(col[b * ldz]);
        }
      }
    }
    red[ty][tx] = acc;
  }
  __syncthreads();
  if (threadIdx.x < kWarp && i < p.M * Do) {
    acc_t sum = red[0][tx];
#pragma unroll
    for (int j = 1; j < kBiasRows; ++j) sum += red[j][tx];
    if constexpr (kSGD) {  // gb is the bias
      acc_t mb = buf ? static_cast<acc_t>(buf[i]) : acc_t(0);
      const acc_t b = static_cast<acc_t>(gb[i]);
      gb[i] = round_param<scalar_t>(sgd_value(b, sum, mb, buf != nullptr, sgd), i,
                                    sgd.rounding.resolved());
      if (buf) buf[i] = static_cast<scalar_t>(mb);
    } else {
      gb[i] = static_cast<scalar_t>(sum);
    }
  }
}

// A layer's bias step riding on its weight update's launch (pathway_sgd_ with a bias): the
// launch's blocks from `first` on are bias blocks (grad_bias_block with kSGD), the earlier ones
// update the weight. bias null: no bias step in the launch.
template <typename scalar_t>
struct BiasStep {
  Plan p;
  const scalar_t* dz = nullptr;
  scalar_t* bias = nullptr;
  scalar_t* buf = nullptr;
  int64_t B = 0, Do = 0, ldz = 0, first = 0;
  SgdArgs sgd{};
  // Runs the block's share of the bias step and returns true when this is a bias block.
  __device__ bool run_block() const {
    if (bias == nullptr || blockIdx.x < first) return false;
    grad_bias_block<scalar_t, true>(p, dz, bias, buf, B, Do, ldz, sgd, blockIdx.x - first);
    return true;
  }
};

// =============================================================================================
// Kernel 4: weight gradient, skinny, with the fused SGD epilogue (pathway_sgd_).
//
// gW[m] (Do, Di) = sum over the rows r feeding weight m of dZ[r, col0 + o] * x[r', d]. A block
// owns (m, 32 rows of D_out, 32 * VEC columns of D_in); warp w owns 4 rows, lane VEC columns:
// 4 * VEC accumulators, no cross-thread reduction, so the epilogue holds grad_W in registers and
// either stores it or applies SGD: W and the momentum buffer are read and written once each,
// with 16-byte (fp32) or 8-byte (16-bit) accesses (k-path encoder: 4 x 40 MB per step, the floor
// for an SGD step; autograd + torch.optim.SGD moves 7 x 40 MB). Rows: blocked, the ns * B rows of block i (contiguous in
// dZ and in x); grouped, the B rows of each pathway of m (wgt CSR order). Weights without a
// pathway get a zero gradient (decay and momentum still apply, as in torch.optim.SGD).
template <typename scalar_t>
struct WGradArgs {
  const scalar_t* dz;  // (z_rows, ldz)
  const scalar_t* x;   // (S, B, Di)
  scalar_t* out;       // grad: (M, Do, Di); SGD: the weight, updated in place
  scalar_t* buf;       // SGD momentum buffer or null
  Plan p;
  int64_t B, Di, Do, ldz;
  int not_, ndt;
  SgdArgs sgd;
  bool prefetch;
  // lookahead (pathway_sgd_lookahead_): the next batch (S, B, Di) and the partial sums of its
  // Z, one slice of (z_rows, ldzn) per column tile of the weight
  const scalar_t* xn = nullptr;
  at::opmath_type<scalar_t>* zpart = nullptr;
  int64_t zrows = 0, ldzn = 0;
  BiasStep<scalar_t> bias;  // the layer's bias step, in blocks after the weight's (kSGD only)
};

// kChunked: a weight's rows are summed in chunks of kBT (one pathway's batch when grouped), each
// chunk apart and then added, so a weight fed by many pathways (a k-path decoder: 100 x 8 rows)
// accumulates a chain of len / 8 + 8 additions, not len: about cuBLAS's accuracy. Blocked plans
// with ns * B <= kBT rows (the k-path encoders: the fused SGD's hot case) have one chunk and take
// the single-level loop, bitwise the same sum without the second set of accumulators.
// Registers set this kernel's occupancy (ptxas --resource-usage, sm_90, 256 threads): the fused
// SGD takes 72 (fp32 and bf16; 3 blocks per SM) with the launch bounds below. The version measured
// in H100 run b loaded W and the momentum before the sum and chunked every plan: 126 registers
// with spills in fp32 (2 blocks per SM) and 222 in bf16 (1 block); it was 9% slower than run a's.
// kLook (with kSGD, blocked plans of one chunk): the lookahead epilogue below.
template <typename scalar_t, int VEC, bool kSGD, bool kChunked, bool kLook = false>
__global__ void __launch_bounds__(kMaxWarps * kWarp, kChunked ? 2 : kSGD ? 3 : 4)
    wgrad_kernel(const WGradArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kCols = kWarp * VEC;
  if constexpr (kSGD) {
    if (a.bias.run_block()) return;  // (uniform over the block)
  }
  const Plan& p = a.p;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t dt = blockIdx.x % a.ndt;
  const int64_t ot = (blockIdx.x / a.ndt) % a.not_;
  const int64_t m = blockIdx.x / (int64_t(a.ndt) * a.not_);
  const int64_t o0 = ot * (int64_t(blockDim.x / kWarp) * kRowsPerWarp) + warp * kRowsPerWarp;
  const int64_t d = dt * kCols + lane * VEC;
  // (no __syncthreads below; the lookahead's warp shuffles need every lane of a warp, so there
  // lanes past D_in stay, inactive)
  const bool active = d < a.Di;
  if (o0 >= a.Do || (!kLook && !active)) return;
  const int nr = (int)min(int64_t(kRowsPerWarp), a.Do - o0);
  // bfloat16 stochastic rounding: the seed's mix, read and hashed here, before the sum, when
  // few registers are live (per stored row it cost 5 registers and a spill in the lookahead
  // variant's 80-register budget)
  uint32_t sr_mix = 0;
  if constexpr (kSGD && std::is_same_v<scalar_t, at::BFloat16>) {
    if (a.sgd.rounding.stochastic) sr_mix = a.sgd.rounding.resolved().mix;
  }
  if (kSGD && a.prefetch) {  // the W and momentum rows the epilogue reads, while the sum runs
    const int64_t c0 = dt * kCols;
    const int64_t span = min(int64_t(kCols), a.Di - c0) * int64_t(sizeof(scalar_t));
    for (int i = 0; i < nr; ++i) {
      const int64_t off = (m * a.Do + o0 + i) * a.Di + c0;
      prefetch_l2(a.out + off, span, lane);
      if (a.buf) prefetch_l2(a.buf + off, span, lane);
    }
  }

  acc_t acc[kRowsPerWarp][VEC];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[i][v] = acc_t(0);

  // acc[i][:] += sum over rows r0 <= r < r0 + rn of dz[r, i] * x[r, :]
  auto accumulate = [&](const scalar_t* dzp, const scalar_t* xp, int64_t r0, int rn,
                        acc_t (&out)[kRowsPerWarp][VEC]) {
#pragma unroll 2
    for (int r = 0; r < rn; ++r) {
      acc_t xv[VEC];
      load_vec<VEC>(xp + (r0 + r) * a.Di, xv);
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const acc_t g = i < nr ? static_cast<acc_t>(dzp[(r0 + r) * a.ldz + i]) : acc_t(0);
#pragma unroll
        for (int v = 0; v < VEC; ++v) out[i][v] += g * xv[v];
      }
    }
  };

  int64_t nseg = 0;
  if (!active) {
    nseg = 0;
  } else if (p.blocked()) {
    nseg = (m >= p.m0 && m < p.m0 + p.n * p.nm) ? 1 : 0;
  } else {
    nseg = p.wgt_ptr[m + 1] - p.wgt_ptr[m];
  }
  for (int64_t e = 0; e < nseg; ++e) {
    int64_t dzrow0, xrow0, len, col0;
    if (p.blocked()) {
      const int64_t j = m - p.m0, i = j / p.nm;
      dzrow0 = i * p.ns * a.B; xrow0 = (p.s0 + i * p.ns) * a.B; len = p.ns * a.B;
      col0 = (j - i * p.nm) * a.Do;
    } else {
      const int64_t q = checked(p.wgt_perm[p.wgt_ptr[m] + e], p.P);
      dzrow0 = p.zrow[q] * a.B; xrow0 = checked(p.src[q], p.S) * a.B; len = a.B;
      col0 = p.zcol[q] * a.Do;
    }
    const scalar_t* dzp = a.dz + dzrow0 * a.ldz + col0 + o0;
    const scalar_t* xp = a.x + xrow0 * a.Di + d;
    if constexpr (kChunked) {
      for (int64_t r0 = 0; r0 < len; r0 += kBT) {
        acc_t part[kRowsPerWarp][VEC];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
          for (int v = 0; v < VEC; ++v) part[i][v] = acc_t(0);
        accumulate(dzp, xp, r0, (int)min(int64_t(kBT), len - r0), part);
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[i][v] += part[i][v];
      }
    } else {
      accumulate(dzp, xp, 0, (int)len, acc);  // len <= kBT (the launcher's condition)
    }
  }
  if constexpr (!kSGD) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      if (i < nr) store_vec<VEC>(a.out + (m * a.Do + o0 + i) * a.Di + d, acc[i]);
    }
  } else {
    // torch.optim.SGD's step (sgd_value). All the W and momentum rows are loaded before the
    // first store: a store may alias a later load (the compiler cannot tell), so loads
    // interleaved with stores would be 4 DRAM round trips in a row instead of one. (Loading them
    // before the sum, instead, kept them live through it: 126 registers and spills.)
    acc_t w[kRowsPerWarp][VEC], mb[kRowsPerWarp][VEC];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      if (i < nr && active) {
        const int64_t off = (m * a.Do + o0 + i) * a.Di + d;
        load_vec<VEC>(a.out + off, w[i]);
        if (a.buf) load_vec<VEC>(a.buf + off, mb[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      if (i >= nr || !active) break;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        w[i][v] = sgd_value(w[i][v], acc[i][v], mb[i][v], a.buf != nullptr, a.sgd);
      }
      const int64_t off = (m * a.Do + o0 + i) * a.Di + d;
      if (std::is_same_v<scalar_t, at::BFloat16> && a.sgd.rounding.stochastic) {
        // w[i] becomes the stored values (the lookahead below dots what was stored)
        Pack<scalar_t, VEC> pk;
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          pk.v[v] = round_param<scalar_t>(w[i][v], off + v, Rounding{true, sr_mix});
          w[i][v] = static_cast<acc_t>(pk.v[v]);
        }
        *reinterpret_cast<Pack<scalar_t, VEC>*>(a.out + off) = pk;
      } else {
        store_vec<VEC>(a.out + off, w[i]);
      }
      if (a.buf) store_vec<VEC>(a.buf + off, mb[i]);
    }
    if constexpr (kLook) {
      // The next forward's share of this tile, from the new weights as stored (rounded to
      // scalar_t, as the forward reads them): for the block's nb <= kBT rows of the next
      // batch and the warp's 4 weight rows, the sum over this tile's columns; 32 values per
      // warp, reduce-scattered so that lane b * 4 + i holds (row b, weight row i). The tiles'
      // partial sums are added in a fixed order by lookahead_sum_kernel (deterministic).
      const int64_t j = m - p.m0;
      if (p.blocked() && j >= 0 && j < p.n * p.nm) {  // (uniform over the block)
        const int64_t blk = j / p.nm;
        const int64_t xrow0 = (p.s0 + blk * p.ns) * a.B, zrow0 = blk * p.ns * a.B;
        const int64_t col0 = (j - blk * p.nm) * a.Do;
        const int nb = (int)(p.ns * a.B);
        acc_t part[kRowsPerWarp * kBT];
#pragma unroll
        for (int b = 0; b < kBT; ++b) {
          acc_t xv[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) xv[v] = acc_t(0);
          if (active && b < nb) load_vec<VEC>(a.xn + (xrow0 + b) * a.Di + d, xv);
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) {
            acc_t sum = 0;
            if (active && i < nr) {
#pragma unroll
              for (int v = 0; v < VEC; ++v)
                sum += static_cast<acc_t>(static_cast<scalar_t>(w[i][v])) * xv[v];
            }
            part[b * kRowsPerWarp + i] = sum;
          }
        }
        const acc_t total = reduce_scatter32(part, lane);
        const int b = lane / kRowsPerWarp, i = lane % kRowsPerWarp;
        if (b < nb && i < nr)
          a.zpart[(dt * a.zrows + zrow0 + b) * a.ldzn + col0 + o0 + i] = total;
      }
    }
  }
}

// Z_next = the sum of the lookahead's ntiles partial sums, tile by tile (a fixed order).
template <typename scalar_t>
__global__ void lookahead_sum_kernel(const at::opmath_type<scalar_t>* __restrict__ zpart,
                                     scalar_t* __restrict__ z, int64_t n, int ntiles) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    acc_t sum = zpart[e];
    for (int t = 1; t < ntiles; ++t) sum += zpart[t * n + e];
    z[e] = static_cast<scalar_t>(sum);
  }
}

// SGD with a materialised gradient (the cuBLAS path of pathway_sgd_), elementwise.
// (The layer's bias step, if any, in the blocks from bias.first on.)
template <typename scalar_t>
__global__ void sgd_kernel(scalar_t* __restrict__ w, scalar_t* __restrict__ buf,
                           const scalar_t* __restrict__ g, int64_t n, const SgdArgs sgd,
                           const BiasStep<scalar_t> bias) {
  using acc_t = at::opmath_type<scalar_t>;
  if (bias.run_block()) return;
  const int64_t blocks = bias.bias != nullptr ? bias.first : int64_t(gridDim.x);
  const Rounding rd = sgd.rounding.resolved();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += blocks * blockDim.x) {
    acc_t mb = buf ? static_cast<acc_t>(buf[i]) : acc_t(0);
    w[i] = round_param<scalar_t>(
        sgd_value(static_cast<acc_t>(w[i]), static_cast<acc_t>(g[i]), mb, buf != nullptr, sgd),
        i, rd);
    if (buf) buf[i] = static_cast<scalar_t>(mb);
  }
}

// =============================================================================================
// Kernel 5: grad_bias (grad_bias_block above), and the bias step in its own launch.
template <typename scalar_t, bool kSGD>
__global__ void __launch_bounds__(kWarp * kBiasRows)
grad_bias_kernel(const Plan p, const scalar_t* __restrict__ dz, scalar_t* __restrict__ gb,
                 scalar_t* __restrict__ buf, int64_t B, int64_t Do, int64_t ldz,
                 const SgdArgs sgd) {
  grad_bias_block<scalar_t, kSGD>(p, dz, gb, buf, B, Do, ldz, sgd, blockIdx.x);
}

// =============================================================================================
// Kernel 6: gated cross-entropy. One block per (replica, path) row group: warp w takes rows
// w, w + 4, ...; lanes stride the C classes. Per row: argmax (first maximum, NaN counts as the
// maximum, as torch.argmax), the max-shifted log-sum-exp, the NLL; per block: the mean NLL and
// the hit count, summed in warp order. A second small kernel forms the gated mean per replica.
constexpr int kCeWarps = 4;

// The argmax order: NaN above every number, then value, then the smaller index first.
template <typename acc_t>
__device__ __forceinline__ bool arg_better(acc_t v, int64_t i, acc_t bv, int64_t bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn != bn) return vn;
  if (!vn && v != bv) return v > bv;
  return i < bi;
}

// Statistics of one logit row, computed by a warp and valid in every lane: the argmax in
// torch.argmax order and the log-sum-exp shifted by the max as log_softmax is (an infinite or NaN
// maximum gives NaN, as on the CPU).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_stats(const scalar_t* __restrict__ l, int64_t C, int lane,
                                          acc_t& lse, int64_t& arg) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  arg = std::numeric_limits<int64_t>::max();
  for (int64_t c = lane; c < C; c += kWarp) {
    const acc_t v = static_cast<acc_t>(l[c]);
    if (arg_better(v, c, mx, arg)) { mx = v; arg = c; }
  }
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) {
    const acc_t ov = __shfl_xor_sync(0xffffffffu, mx, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, arg, o);
    if (arg_better(ov, oi, mx, arg)) { mx = ov; arg = oi; }
  }
  acc_t sum = 0;
  for (int64_t c = lane; c < C; c += kWarp) sum += ::exp(static_cast<acc_t>(l[c]) - mx);
  lse = ::log(warp_sum(sum)) + mx;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kCeWarps * kWarp)
ce_forward_kernel(const scalar_t* __restrict__ logits, const LogitBlocks lb,
                  const int64_t* __restrict__ target, scalar_t* __restrict__ path_loss,
                  int64_t* __restrict__ correct, scalar_t* __restrict__ lse) {
  const int64_t B = lb.B, C = lb.C;
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t nll_w[kCeWarps];
  __shared__ int64_t hit_w[kCeWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t q = blockIdx.x;
  acc_t nll_sum = 0;
  int64_t hits = 0;
  for (int64_t b = warp; b < B; b += kCeWarps) {
    const int64_t row = q * B + b;
    const scalar_t* l = logits + lb.offset(q) + b * lb.sb;
    acc_t lse_b;
    int64_t arg;
    row_stats(l, C, lane, lse_b, arg);
    if (lane == 0) {
      const int64_t y = target[row];
      CUDA_KERNEL_ASSERT(y >= 0 && y < C && "target: class index out of range [0, C)");
      lse[row] = static_cast<scalar_t>(lse_b);
      nll_sum += lse_b - static_cast<acc_t>(l[y]);
      hits += (arg == y);
    }
  }
  if (lane == 0) { nll_w[warp] = nll_sum; hit_w[warp] = hits; }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t s = 0;
    int64_t h = 0;
    for (int w = 0; w < kCeWarps; ++w) { s += nll_w[w]; h += hit_w[w]; }
    path_loss[q] = static_cast<scalar_t>(s / static_cast<acc_t>(B));
    correct[q] = h;
  }
}

// row_stats computed by one thread alone (the few-class kernels below).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_stats_serial(const scalar_t* __restrict__ l, int64_t C,
                                                 acc_t& lse, int64_t& arg) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  arg = std::numeric_limits<int64_t>::max();
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(l[c]);
    if (arg_better(v, c, mx, arg)) { mx = v; arg = c; }
  }
  acc_t sum = 0;
  for (int64_t c = 0; c < C; ++c) sum += ::exp(static_cast<acc_t>(l[c]) - mx);
  lse = ::log(sum) + mx;
}

// The same for few classes (C <= kCeThreadClasses, the k-path's C = 10): one thread per path,
// each row's statistics computed serially by that thread (no idle lanes, no shuffles), the path's
// B rows summed in order. Same results as ce_forward_kernel up to the summation order of a row's
// exponentials (here sequential, there strided over lanes).
constexpr int64_t kCeThreadClasses = 32;

template <typename scalar_t>
__global__ void ce_forward_thread_kernel(const scalar_t* __restrict__ logits, const LogitBlocks lb,
                                         const int64_t* __restrict__ target,
                                         scalar_t* __restrict__ path_loss,
                                         int64_t* __restrict__ correct,
                                         scalar_t* __restrict__ lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = lb.B, C = lb.C, paths = lb.R * lb.P;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < paths;
       q += int64_t(gridDim.x) * blockDim.x) {
    acc_t nll_sum = 0;
    int64_t hits = 0;
    const scalar_t* lq = logits + lb.offset(q);  // (adjacent threads: adjacent paths)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = q * B + b;
      const scalar_t* l = lq + b * lb.sb;
      acc_t lse_b;
      int64_t arg;
      row_stats_serial(l, C, lse_b, arg);
      const int64_t y = target[row];
      CUDA_KERNEL_ASSERT(y >= 0 && y < C && "target: class index out of range [0, C)");
      lse[row] = static_cast<scalar_t>(lse_b);
      nll_sum += lse_b - static_cast<acc_t>(l[y]);
      hits += (arg == y);
    }
    path_loss[q] = static_cast<scalar_t>(nll_sum / static_cast<acc_t>(B));
    correct[q] = hits;
  }
}

// The few-class forward with one thread per row (C <= kCeThreadClasses, B <= kCeRowsMaxB): a
// block takes 32 paths (lane l: path blockIdx.x * 32 + l) and all their rows (warp b: row b), so
// R*P*B threads work at once instead of R*P. At K = 100 that is 80,000 rows in 313 blocks of 256
// threads, where ce_forward_thread_kernel runs 10,000 threads (79 blocks for 132 SMs) each
// walking its 8 rows in a chain of dependent loads (15 us in H100 run b for 3.2 MB of logits).
// The lanes of a warp read adjacent paths (in the k-path's strided view the J paths of a sample
// row are adjacent in memory). Each row's statistics as row_stats_serial computes them, and the
// path's B rows are summed in row order from shared memory: bit for bit ce_forward_thread_kernel
// (tests/test_cuda.py compares the two; GATED_OPS_CUDA_CE=thread forces that one).
constexpr int64_t kCeRowsMaxB = 32;

template <typename scalar_t>
__global__ void __launch_bounds__(kCeRowsMaxB * kWarp)
ce_forward_rows_kernel(const scalar_t* __restrict__ logits, const LogitBlocks lb,
                       const int64_t* __restrict__ target, scalar_t* __restrict__ path_loss,
                       int64_t* __restrict__ correct, scalar_t* __restrict__ lse) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t nll_s[kCeRowsMaxB][kWarp];
  __shared__ int hit_s[kCeRowsMaxB][kWarp];
  const int64_t B = lb.B, C = lb.C, paths = lb.R * lb.P;
  const int lane = threadIdx.x % kWarp, b = threadIdx.x / kWarp;
  const int64_t q = blockIdx.x * int64_t(kWarp) + lane;
  if (q < paths) {
    const scalar_t* l = logits + lb.offset(q) + b * lb.sb;
    acc_t lse_b;
    int64_t arg;
    row_stats_serial(l, C, lse_b, arg);
    const int64_t row = q * B + b;
    const int64_t y = target[row];
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "target: class index out of range [0, C)");
    lse[row] = static_cast<scalar_t>(lse_b);
    nll_s[b][lane] = lse_b - static_cast<acc_t>(l[y]);
    hit_s[b][lane] = arg == y;
  }
  __syncthreads();
  if (b == 0 && q < paths) {
    acc_t nll_sum = 0;
    int64_t hits = 0;
    for (int64_t i = 0; i < B; ++i) {
      nll_sum += nll_s[i][lane];
      hits += hit_s[i][lane];
    }
    path_loss[q] = static_cast<scalar_t>(nll_sum / static_cast<acc_t>(B));
    correct[q] = hits;
  }
}

// loss[r] = sum_p gate * path_loss / sum_p gate. A gate row summing to zero gives NaN: the CPU
// kernel raises instead, which here would need a host synchronisation (documented in ops.py).
template <typename scalar_t>
__global__ void ce_loss_kernel(const scalar_t* __restrict__ gate,
                               const scalar_t* __restrict__ path_loss, scalar_t* __restrict__ loss,
                               int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kWarp];
  const int64_t r = blockIdx.x;
  acc_t num = 0, den = 0;
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) {
    const acc_t g = static_cast<acc_t>(gate[r * P + j]);
    num += g * static_cast<acc_t>(path_loss[r * P + j]);
    den += g;
  }
  num = block_sum(num, red);
  den = block_sum(den, red);
  if (threadIdx.x == 0) {
    loss[r] = den == acc_t(0) ? static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN())
                              : static_cast<scalar_t>(num / den);
  }
}

// w[r, p] = (grad_loss[r] * gate[r, p] / sum_p gate[r, p] + grad_path_loss[r, p]) / B; a null
// grad_loss or grad_pl counts as zeros.
template <typename scalar_t>
__global__ void ce_weights_kernel(const scalar_t* __restrict__ grad_loss,
                                  const scalar_t* __restrict__ grad_pl,
                                  const scalar_t* __restrict__ gate,
                                  at::opmath_type<scalar_t>* __restrict__ wout, int64_t P,
                                  int64_t B) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kWarp];
  __shared__ acc_t den_s;
  const int64_t r = blockIdx.x;
  acc_t den = 0;
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) den += static_cast<acc_t>(gate[r * P + j]);
  den = block_sum(den, red);
  if (threadIdx.x == 0) den_s = den;
  __syncthreads();
  den = den_s;
  const acc_t gl = grad_loss ? static_cast<acc_t>(grad_loss[r]) : acc_t(0);
  for (int64_t j = threadIdx.x; j < P; j += blockDim.x) {
    const acc_t gp = grad_pl ? static_cast<acc_t>(grad_pl[r * P + j]) : acc_t(0);
    wout[r * P + j] = (gl * static_cast<acc_t>(gate[r * P + j]) / den + gp) /
                      static_cast<acc_t>(B);
  }
}

// grad[r, p, b, c] = w[r, p] * (exp(logits - lse) - [c == target]), one warp per row, or one
// thread per row (kThreadPerRow, for C <= kCeThreadClasses). For 16-bit logits the row's lse is
// recomputed in fp32 instead of read back rounded: at |lse| ~ 8 a bf16 lse is off by up to 0.03,
// a 3% error on every softmax value, far more than plain PyTorch makes (its log_softmax output
// is rounded near 0 for the rows' dominant classes).
template <typename scalar_t, bool kRecompute, bool kThreadPerRow>
__global__ void ce_backward_kernel(const scalar_t* __restrict__ logits, const LogitBlocks lb,
                                   const int64_t* __restrict__ target,
                                   const scalar_t* __restrict__ lse,
                                   const at::opmath_type<scalar_t>* __restrict__ wts,
                                   scalar_t* __restrict__ grad_out, const LogitBlocks gb) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kLanes = kThreadPerRow ? 1 : kWarp;  // threads per row
  const int64_t B = lb.B, C = lb.C, rows = lb.R * lb.P * lb.B;
  const int lane = threadIdx.x % kLanes;
  const int64_t stride = int64_t(gridDim.x) * (blockDim.x / kLanes);
  for (int64_t t = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kLanes; t < rows;
       t += stride) {
    int64_t q, b;
    lb.row_at(t, q, b);  // rows in the logits' memory order
    const int64_t row = q * B + b;
    const scalar_t* l = logits + lb.offset(q) + b * lb.sb;
    scalar_t* grad = grad_out + gb.offset(q) + b * gb.sb;
    acc_t lse_r;
    if constexpr (kRecompute) {
      int64_t arg;
      if constexpr (kThreadPerRow) {
        row_stats_serial(l, C, lse_r, arg);
      } else {
        row_stats(l, C, lane, lse_r, arg);
      }
    } else {
      lse_r = static_cast<acc_t>(lse[row]);
    }
    const acc_t w = wts[q];
    const int64_t y = target[row];
    for (int64_t c = lane; c < C; c += kLanes) {
      const acc_t sm = ::exp(static_cast<acc_t>(l[c]) - lse_r);
      grad[c] = static_cast<scalar_t>(w * (sm - (y == c ? acc_t(1) : acc_t(0))));
    }
  }
}

// =============================================================================================
// Host launchers.
// GATED_OPS_CUDA_PREFETCH=1 (read at each launch; captured graphs keep the value they saw).
bool prefetch_on() {
  const char* v = std::getenv("GATED_OPS_CUDA_PREFETCH");
  return v != nullptr && v[0] == '1';
}

// GATED_OPS_CUDA_CE=thread: the few-class cross-entropy forward on ce_forward_thread_kernel (a
// thread per path) instead of ce_forward_rows_kernel (a thread per row), for tests and A/Bs;
// read at each launch, as above.
bool ce_thread_forced() {
  const char* v = std::getenv("GATED_OPS_CUDA_CE");
  return v != nullptr && std::string(v) == "thread";
}

// Warps per block for a tile of `rows` rows at kRowsPerWarp per warp (at least 1, at most 8).
int warps_for(int64_t rows) {
  return (int)std::max<int64_t>(1, std::min<int64_t>(kMaxWarps, (rows + kRowsPerWarp - 1) /
                                                                    kRowsPerWarp));
}

// Z tiles (skinny): fused forward into y (+ Z scratch for summing destinations), or all of Z.
template <typename scalar_t>
void launch_ztile(const Plan& p, const Tensor& x, const Tensor& w, const Tensor& bias,
                  const Tensor& gate, Tensor* y, const Tensor& z, bool fused) {
  const int64_t B = x.size(1), Di = x.size(2), Do = w.size(1);
  const int64_t krows = p.blocked() ? p.n * p.ns : p.P, zc = p.z_cols(Do);
  ZTileArgs<scalar_t> a;
  a.x = x.data_ptr<scalar_t>(); a.w = w.data_ptr<scalar_t>();
  a.bias = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  a.gate = gate.defined() ? gate.data_ptr<scalar_t>() : nullptr;
  a.per_sample = gate.defined() && gate.dim() == 2;
  a.prefetch = prefetch_on();
  a.y = y ? y->data_ptr<scalar_t>() : nullptr;
  a.z = z.data_ptr<scalar_t>();
  a.p = p; a.B = B; a.Di = Di; a.Do = Do; a.zcols = zc;
  constexpr int V = vec_of<scalar_t>();
  const bool vec = Di % V == 0 && aligned16(a.w) && aligned16(a.x);
  const int warps = warps_for(zc);
  a.nbt = (int)((B + kBT - 1) / kBT);
  a.nct = (int)((zc + warps * kRowsPerWarp - 1) / (warps * kRowsPerWarp));
  const int64_t grid = krows * a.nbt * a.nct;
  if (grid == 0) return;
  TORCH_CHECK(grid < std::numeric_limits<int>::max(), "pathway_matmul: problem too large");
  auto go = [&](auto kernel) {
    GATED_LAUNCH(kernel, (unsigned)grid, warps * kWarp)(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (fused) {
    vec ? go(ztile_kernel<scalar_t, V, true>) : go(ztile_kernel<scalar_t, 1, true>);
  } else {
    vec ? go(ztile_kernel<scalar_t, V, false>) : go(ztile_kernel<scalar_t, 1, false>);
  }
}

// Z via cuBLAS (blocked layout only).
Tensor cublas_z(const Plan& p, const Tensor& x, const Tensor& w) {
  const NoAutocast no_autocast;
  return at::bmm(x_blocks(p, x), w_blocks(p, w).transpose(1, 2))
      .view({p.z_rows(x.size(1)), p.z_cols(w.size(1))});
}

// ---------------------------------------------------------------------------------------------
// pathway_matmul: y[t] = sum_{p: t_p = t} gate[p] * (Z_p + bias[m_p])
Tensor pathway_matmul_cuda(const Tensor& x_, const Tensor& w_, const c10::optional<Tensor>& bias_,
                           const c10::optional<Tensor>& gate_, const Tensor& paths,
                           const Tensor& csr, at::IntArrayRef layout) {
  check_data(x_, w_, bias_);
  check_cuda_dtype(x_, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  const Plan p = dev_plan(paths, csr, layout, x.size(0), w.size(0), x);
  check_gate(gate_, x, p.P, x.size(1));
  const int64_t B = x.size(1), Do = w.size(1);
  if (p.P == 0 || B == 0 || Do == 0) return at::zeros({p.T, B, Do}, x.options());
  const Tensor bias = bias_ ? bias_->contiguous() : Tensor();
  const Tensor gate = gate_ ? gate_->contiguous() : Tensor();
  Tensor y = at::empty({p.T, B, Do}, x.options());
  const bool skinny = !p.blocked() || (B <= kSkinnyBatch && p.ns * B <= kSkinnyRows);
  if (!skinny && p.z_is_y() && !gate.defined() && (p.n == 1 || !bias.defined())) {
    // Z is y (the k-path's hidden layer and wide decoder, R = 1): the GEMM writes y itself,
    // the bias added in cuBLASLt's epilogue (addmm with a 1-D bias): one kernel, no Z.
    const NoAutocast no_autocast;
    const Tensor xb = x_blocks(p, x), wb = w_blocks(p, w);
    if (bias.defined()) {
      Tensor y2 = y.view({p.ns * B, Do});
      at::addmm_out(y2, bias[p.m0], xb[0], wb[0].t());
    } else {
      Tensor y3 = y.view({p.n, p.ns * B, Do});
      at::bmm_out(y3, xb, wb.transpose(1, 2));
    }
    return y;
  }
  GATED_DISPATCH(x.scalar_type(), "pathway_matmul_cuda", [&] {
    Tensor z;
    if (skinny) {
      z = at::empty({p.z_rows(B), p.z_cols(Do)}, x.options());
      launch_ztile<scalar_t>(p, x, w, bias, gate, &y, z, /*fused=*/true);
      if (p.one_per_dst()) return;  // the tiles wrote every destination
    } else {
      z = cublas_z(p, x, w);
    }
    GATED_LAUNCH(gather_epilogue_kernel<scalar_t>, flat_blocks(y.numel(), 256), 256)(
        p, z.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
        gate.defined() ? gate.data_ptr<scalar_t>() : nullptr, gate.defined() && gate.dim() == 2,
        y.data_ptr<scalar_t>(), B, Do, z.size(1), /*only_multi=*/skinny);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

Tensor pathway_grad_z_cuda(const Tensor& grad_y_, const c10::optional<Tensor>& gate_,
                           const Tensor& paths, const Tensor& csr, at::IntArrayRef layout,
                           int64_t num_sources, int64_t num_weights) {
  TORCH_CHECK(grad_y_.dim() == 3, "grad_y: expected (T, B, D_out), got shape ", grad_y_.sizes());
  const c10::cuda::CUDAGuard guard(grad_y_.device());
  const Tensor gy = grad_y_.contiguous();
  const Plan p = dev_plan(paths, csr, layout, num_sources, num_weights, gy);
  TORCH_CHECK(gy.size(0) == p.T, "grad_y: expected T = ", p.T, " destinations, got shape ",
              gy.sizes());
  const int64_t B = gy.size(1), Do = gy.size(2);
  check_gate(gate_, gy, p.P, B);
  Tensor dz = at::empty({p.z_rows(B), p.z_cols(Do)}, gy.options());
  if (dz.numel() == 0) return dz;
  const Tensor gate = gate_ ? gate_->contiguous() : Tensor();
  GATED_DISPATCH(gy.scalar_type(), "pathway_grad_z_cuda", [&] {
    GATED_LAUNCH(grad_z_kernel<scalar_t>, flat_blocks(p.P * B * Do, 256), 256)(
        p, gy.data_ptr<scalar_t>(), gate.defined() ? gate.data_ptr<scalar_t>() : nullptr,
        gate.defined() && gate.dim() == 2, dz.data_ptr<scalar_t>(), B, Do, dz.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dz;
}

// grad_x[s] = sum_{p: s_p = s} dZ_p @ W[m_p]
Tensor pathway_grad_x_cuda(const Tensor& dz_, const Tensor& w_, const Tensor& paths,
                           const Tensor& csr, at::IntArrayRef layout, int64_t num_sources,
                           int64_t batch) {
  const NoAutocast no_autocast;
  TORCH_CHECK(w_.dim() == 3, "weight: expected (M, D_out, D_in), got shape ", w_.sizes());
  check_float(dz_, "grad_z", w_.scalar_type());
  check_same_device(dz_, "grad_z", w_);
  const c10::cuda::CUDAGuard guard(w_.device());
  const Tensor dz = dz_.contiguous(), w = w_.contiguous();
  const Plan p = dev_plan(paths, csr, layout, num_sources, w.size(0), w);
  const int64_t B = batch, Do = w.size(1), Di = w.size(2);
  check_grad_z(dz, p, B, Do);
  const bool covers = !p.blocked() || p.n * p.ns == p.S;  // every row written by the kernels
  Tensor gx = covers ? at::empty({p.S, B, Di}, w.options()) : at::zeros({p.S, B, Di}, w.options());
  if (gx.numel() == 0) return gx;
  if (p.P == 0) return gx.zero_();
  if (p.blocked() && (B > kSkinnyBatch || p.nm * Do > kSkinnyReduce)) {
    Tensor out = x_blocks(p, gx);
    at::bmm_out(out, dz.view({p.n, p.ns * B, p.nm * Do}), w_blocks(p, w));
    return gx;
  }
  GATED_DISPATCH(w.scalar_type(), "pathway_grad_x_cuda", [&] {
    constexpr int V = vec_of<scalar_t>();
    GradXArgs<scalar_t> a;
    a.dz = dz.data_ptr<scalar_t>(); a.w = w.data_ptr<scalar_t>(); a.gx = gx.data_ptr<scalar_t>();
    a.p = p; a.B = B; a.Di = Di; a.Do = Do; a.ldz = dz.size(1);
    const bool vec = Di % V == 0 && aligned16(a.w);
    const int cols = kWarp * (vec ? V : 1);
    a.nbt = (int)((B + kBT - 1) / kBT);
    a.ndt = (int)((Di + cols - 1) / cols);
    const int64_t grid = (p.blocked() ? p.n * p.ns : p.S) * a.nbt * a.ndt;
    if (grid == 0) return;
    auto go = [&](auto kernel) {
      GATED_LAUNCH(kernel, (unsigned)grid, kGxWarps * kWarp)(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    vec ? go(grad_x_kernel<scalar_t, V>) : go(grad_x_kernel<scalar_t, 1>);
  });
  return gx;
}

// The skinny weight-gradient kernel: into `out` (grad) or onto the weight (SGD).
// Blocks of a bias step over M * D_out columns (32 per block), and the step's arguments.
int64_t bias_blocks(const Plan& p, int64_t Do) { return (p.M * Do + kWarp - 1) / kWarp; }

template <typename scalar_t>
BiasStep<scalar_t> bias_step(const Plan& p, const Tensor& dz, const Tensor& bias,
                             const Tensor& buf, int64_t B, int64_t Do, const SgdArgs& sgd) {
  BiasStep<scalar_t> s;
  s.p = p; s.dz = dz.data_ptr<scalar_t>(); s.bias = bias.data_ptr<scalar_t>();
  s.buf = buf.defined() ? buf.data_ptr<scalar_t>() : nullptr;
  s.B = B; s.Do = Do; s.ldz = dz.size(1); s.sgd = sgd;
  return s;
}

// (x_next: the lookahead, with sgd, for blocked plans of ns * B <= kBT rows per block in both
// batches: returns Z_next; else an undefined tensor. bias: the layer's bias step, with sgd, in
// blocks of the same launch.)
template <typename scalar_t>
Tensor launch_wgrad(const Plan& p, const Tensor& dz, const Tensor& x, const Tensor& out,
                    const Tensor& buf, int64_t Do, bool sgd, const SgdArgs& sgd_args,
                    const Tensor* x_next = nullptr, const BiasStep<scalar_t>* bias = nullptr) {
  constexpr int V = wgrad_vec_of<scalar_t>();
  const int64_t Di = x.size(2);
  WGradArgs<scalar_t> a;
  a.dz = dz.data_ptr<scalar_t>(); a.x = x.data_ptr<scalar_t>(); a.out = out.data_ptr<scalar_t>();
  a.buf = buf.defined() ? buf.data_ptr<scalar_t>() : nullptr;
  a.p = p; a.B = x.size(1); a.Di = Di; a.Do = Do; a.ldz = dz.size(1);
  a.sgd = sgd_args;
  a.prefetch = sgd && prefetch_on();
  const bool vec = Di % V == 0 && aligned16(a.x) && aligned16(a.out) &&
                   (!a.buf || aligned16(a.buf)) &&
                   (!x_next || aligned16(x_next->data_ptr<scalar_t>()));
  const int cols = kWarp * (vec ? V : 1), warps = warps_for(Do);
  a.ndt = (int)((Di + cols - 1) / cols);
  a.not_ = (int)((Do + warps * kRowsPerWarp - 1) / (warps * kRowsPerWarp));
  const int64_t grid = p.M * a.ndt * a.not_;
  // one chunk of kBT rows per weight (blocked, ns * B <= kBT): the single-level sum
  const bool chunked = !(p.blocked() && p.ns * a.B <= kBT);
  Tensor zn, zpart;
  if (x_next) {
    TORCH_INTERNAL_ASSERT(sgd && !chunked && x_next->size(1) == a.B && x_next->is_contiguous());
    a.xn = x_next->data_ptr<scalar_t>();
    a.zrows = p.z_rows(a.B);
    a.ldzn = p.z_cols(Do);
    zn = at::empty({a.zrows, a.ldzn}, x.options());
    if (grid == 0) return zn.zero_();  // (no weight rows: Z_next is zero)
    using acc_t = at::opmath_type<scalar_t>;
    zpart = at::empty({a.ndt, a.zrows, a.ldzn},
                      x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    a.zpart = zpart.data_ptr<acc_t>();
  }
  if (grid == 0) return zn;
  int64_t blocks = grid;
  if (bias != nullptr) {  // the bias step's blocks after the weight's
    TORCH_INTERNAL_ASSERT(sgd);
    a.bias = *bias;
    a.bias.first = grid;
    blocks += bias_blocks(p, Do);
  }
  TORCH_CHECK(blocks < std::numeric_limits<int>::max(), "pathway weight gradient: too large");
  auto go = [&](auto kernel) {
    GATED_LAUNCH(kernel, (unsigned)blocks, warps * kWarp)(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (x_next) {
    vec ? go(wgrad_kernel<scalar_t, V, true, false, true>)
        : go(wgrad_kernel<scalar_t, 1, true, false, true>);
    const int64_t n = zn.numel();
    if (n == 0) return zn;
    GATED_LAUNCH(lookahead_sum_kernel<scalar_t>, flat_blocks(n, 256), 256)(
        zpart.data_ptr<at::opmath_type<scalar_t>>(), zn.data_ptr<scalar_t>(), n, a.ndt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return zn;
  }
  auto pick = [&](auto sgd_c, auto chunked_c) {
    constexpr bool kS = decltype(sgd_c)::value, kC = decltype(chunked_c)::value;
    vec ? go(wgrad_kernel<scalar_t, V, kS, kC>) : go(wgrad_kernel<scalar_t, 1, kS, kC>);
  };
  using T = std::true_type;
  using F = std::false_type;
  if (sgd) {
    chunked ? pick(T{}, T{}) : pick(T{}, F{});
  } else {
    chunked ? pick(F{}, T{}) : pick(F{}, F{});
  }
  return zn;
}

// grad_bias_kernel over dZ of a plan (B rows per pathway): into gb, or (sgd) onto the bias.
template <typename scalar_t>
void launch_grad_bias(const Plan& p, const Tensor& dz, const Tensor& gb, const Tensor& buf,
                      int64_t B, int64_t Do, bool sgd, const SgdArgs& sgd_args) {
  if (p.M * Do == 0) return;
  const unsigned blocks = (unsigned)((p.M * Do + kWarp - 1) / kWarp);
  auto go = [&](auto kernel) {
    GATED_LAUNCH(kernel, blocks, kWarp * kBiasRows)(
        p, dz.data_ptr<scalar_t>(), gb.data_ptr<scalar_t>(),
        buf.defined() ? buf.data_ptr<scalar_t>() : nullptr, B, Do, dz.size(1), sgd_args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  sgd ? go(grad_bias_kernel<scalar_t, true>) : go(grad_bias_kernel<scalar_t, false>);
}

// grad_W[m] = sum_{p: m_p = m} dZ_p^T @ x[s_p]
Tensor pathway_grad_weight_cuda(const Tensor& dz_, const Tensor& x_, const Tensor& paths,
                                const Tensor& csr, at::IntArrayRef layout, int64_t num_weights,
                                int64_t d_out) {
  const NoAutocast no_autocast;
  TORCH_CHECK(x_.dim() == 3, "x: expected (S, B, D_in), got shape ", x_.sizes());
  check_float(dz_, "grad_z", x_.scalar_type());
  check_same_device(dz_, "grad_z", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor dz = dz_.contiguous(), x = x_.contiguous();
  const Plan p = dev_plan(paths, csr, layout, x.size(0), num_weights, x);
  const int64_t B = x.size(1), Di = x.size(2), Do = d_out;
  check_grad_z(dz, p, B, Do);
  if (p.P == 0 || B == 0) return at::zeros({p.M, Do, Di}, x.options());
  if (p.blocked() && p.ns * B > kSkinnyRows) {
    const bool covers = p.n * p.nm == p.M;
    Tensor gw = covers ? at::empty({p.M, Do, Di}, x.options())
                       : at::zeros({p.M, Do, Di}, x.options());
    Tensor out = w_blocks(p, gw);
    at::bmm_out(out, dz.view({p.n, p.ns * B, p.nm * Do}).transpose(1, 2), x_blocks(p, x));
    return gw;
  }
  Tensor gw = at::empty({p.M, Do, Di}, x.options());  // every element written
  GATED_DISPATCH(x.scalar_type(), "pathway_grad_weight_cuda", [&] {
    launch_wgrad<scalar_t>(p, dz, x, gw, Tensor(), Do, false, SgdArgs{});
  });
  return gw;
}

Tensor pathway_grad_bias_cuda(const Tensor& dz_, const Tensor& paths, const Tensor& csr,
                              at::IntArrayRef layout, int64_t num_sources, int64_t num_weights,
                              int64_t d_out) {
  const c10::cuda::CUDAGuard guard(dz_.device());
  const Tensor dz = dz_.contiguous();
  const Plan p = dev_plan(paths, csr, layout, num_sources, num_weights, dz);
  const int64_t Do = d_out;
  const int64_t B = grad_z_batch(dz, p, Do);
  if (p.P == 0 || B == 0) return at::zeros({p.M, Do}, dz.options());
  Tensor gb = at::empty({p.M, Do}, dz.options());
  if (gb.numel() == 0) return gb;
  GATED_DISPATCH(dz.scalar_type(), "pathway_grad_bias_cuda", [&] {
    launch_grad_bias<scalar_t>(p, dz, gb, Tensor(), B, Do, false, SgdArgs{});
  });
  return gb;
}

// grad_bias and the SGD step on the bias in one kernel (see grad_bias_kernel's kSGD).
void pathway_bias_sgd_cuda(const Tensor& dz_, const Tensor& bias,
                           const c10::optional<Tensor>& buf, const Tensor& paths,
                           const Tensor& csr, at::IntArrayRef layout, int64_t num_sources,
                           int64_t num_weights, double lr, double momentum, double weight_decay,
                           bool nesterov, int64_t rounding_seed,
                           const c10::optional<Tensor>& rounding_step) {
  check_bias_sgd(bias, num_weights);
  const Rounding rd = rounding_for(rounding_seed, rounding_step, bias, "biases");
  check_sgd_state(bias, "bias", buf, momentum, dz_);
  const c10::cuda::CUDAGuard guard(dz_.device());
  const Tensor dz = dz_.contiguous();
  const Plan p = dev_plan(paths, csr, layout, num_sources, num_weights, dz);
  const int64_t Do = bias.size(1);
  const int64_t B = grad_z_batch(dz, p, Do);
  GATED_DISPATCH(dz.scalar_type(), "pathway_bias_sgd_cuda", [&] {
    // (B == 0 or no pathway: zero gradients; decay and momentum still apply, as on the CPU)
    launch_grad_bias<scalar_t>(p, dz, bias, buf ? *buf : Tensor(), B, Do, true,
                               SgdArgs{lr, momentum, weight_decay, nesterov, rd});
  });
}

// grad_gate[p, b] = <grad_y[t_p, b], Z_p[b] + bias[m_p]>  (summed over b for a (P,) gate)
Tensor pathway_grad_gate_cuda(const Tensor& grad_y_, const Tensor& x_, const Tensor& w_,
                              const c10::optional<Tensor>& bias_, const Tensor& gate,
                              const Tensor& paths, const Tensor& csr, at::IntArrayRef layout) {
  check_data(x_, w_, bias_);
  check_cuda_dtype(x_, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  check_float(grad_y_, "grad_y", x_.scalar_type());
  check_same_device(grad_y_, "grad_y", x_);
  const Tensor x = x_.contiguous(), w = w_.contiguous(), gy = grad_y_.contiguous();
  const Plan p = dev_plan(paths, csr, layout, x.size(0), w.size(0), x);
  check_gate(gate, x, p.P, x.size(1));
  const int64_t B = x.size(1), Do = w.size(1);
  GATED_CHECK_SHAPE("grad_y", gy, p.T, B, Do);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor gg = at::zeros({p.P, B}, x.options().dtype(acc_dtype));
  if (p.P > 0 && B > 0 && Do > 0) {
    const Tensor bias = bias_ ? bias_->contiguous() : Tensor();
    GATED_DISPATCH(x.scalar_type(), "pathway_grad_gate_cuda", [&] {
      Tensor z;
      if (B <= kSkinnyBatch || !p.blocked()) {
        z = at::empty({p.z_rows(B), p.z_cols(Do)}, x.options());
        launch_ztile<scalar_t>(p, x, w, Tensor(), Tensor(), nullptr, z, /*fused=*/false);
      } else {
        z = cublas_z(p, x, w);
      }
      const int64_t warps = p.P * B;
      GATED_LAUNCH(gate_epilogue_kernel<scalar_t>, flat_blocks(warps * kWarp, 256), 256)(
          p, gy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
          bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
          acc_dtype == at::kFloat ? gg.data_ptr<float>() : nullptr,
          acc_dtype == at::kDouble ? gg.data_ptr<double>() : nullptr, B, Do, z.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return (gate.dim() == 2 ? gg : gg.sum(1)).to(x.scalar_type());
}

// The layer's bias step of a weight update (pathway_sgd_ with a bias): its arguments, or none.
struct LayerBias {
  Tensor bias, buf;
  SgdArgs sgd{};
  bool defined() const { return bias.defined(); }
};
LayerBias layer_bias(const c10::optional<Tensor>& bias, const c10::optional<Tensor>& bias_buf,
                     const Tensor& w, const Tensor& x, double lr, double momentum,
                     double weight_decay, bool nesterov, int64_t bias_rounding_seed,
                     const c10::optional<Tensor>& rounding_step) {
  check_layer_bias(bias, bias_buf, w, momentum, bias_rounding_seed, rounding_step, x);
  if (!bias) return LayerBias{};
  return LayerBias{*bias, bias_buf ? *bias_buf : Tensor(),
                   SgdArgs{lr, momentum, weight_decay, nesterov,
                           rounding_for(bias_rounding_seed, rounding_step, *bias, "biases")}};
}

void pathway_sgd_cuda(const Tensor& dz_, const Tensor& x_, const Tensor& w,
                      const c10::optional<Tensor>& buf, const Tensor& paths, const Tensor& csr,
                      at::IntArrayRef layout, double lr, double momentum, double weight_decay,
                      bool nesterov, int64_t rounding_seed,
                      const c10::optional<Tensor>& rounding_step,
                      const c10::optional<Tensor>& bias_, const c10::optional<Tensor>& bias_buf,
                      int64_t bias_rounding_seed) {
  const NoAutocast no_autocast;
  TORCH_CHECK(x_.dim() == 3 && w.dim() == 3, "x, weight: expected 3-D tensors");
  check_sgd_state(w, "weight", buf, momentum, x_);
  const Rounding rd = rounding_for(rounding_seed, rounding_step, w, "weights");
  const LayerBias lbias = layer_bias(bias_, bias_buf, w, x_, lr, momentum, weight_decay,
                                     nesterov, bias_rounding_seed, rounding_step);
  check_float(dz_, "grad_z", x_.scalar_type());
  check_same_device(dz_, "grad_z", x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor dz = dz_.contiguous(), x = x_.contiguous();
  const Plan p = dev_plan(paths, csr, layout, x.size(0), w.size(0), x);
  const int64_t B = x.size(1), Do = w.size(1);
  check_grad_z(dz, p, B, Do);
  const Tensor bufv = buf ? *buf : Tensor();
  const SgdArgs sgd{lr, momentum, weight_decay, nesterov, rd};
  GATED_DISPATCH(w.scalar_type(), "pathway_sgd_cuda", [&] {
    if (w.numel() == 0) {  // (no weight to update: the bias step, if any, alone)
      if (lbias.defined())
        launch_grad_bias<scalar_t>(p, dz, lbias.bias, lbias.buf, B, Do, true, lbias.sgd);
      return;
    }
    BiasStep<scalar_t> bstep;
    if (lbias.defined())
      bstep = bias_step<scalar_t>(p, dz, lbias.bias, lbias.buf, B, Do, lbias.sgd);
    if (p.blocked() && p.ns * B > kSkinnyRows) {
      // cuBLAS gradient (a scratch of the weight's size), then the elementwise update (and the
      // bias step, in blocks of the same launch).
      const bool covers = p.n * p.nm == p.M;
      Tensor g = covers ? at::empty_like(w) : at::zeros_like(w);
      Tensor out = w_blocks(p, g);
      at::bmm_out(out, dz.view({p.n, p.ns * B, p.nm * Do}).transpose(1, 2), x_blocks(p, x));
      const int64_t blocks = flat_blocks(w.numel(), 256);
      bstep.first = blocks;
      GATED_LAUNCH(sgd_kernel<scalar_t>,
                   (unsigned)(blocks + (lbias.defined() ? bias_blocks(p, Do) : 0)), 256)(
          w.data_ptr<scalar_t>(), bufv.defined() ? bufv.data_ptr<scalar_t>() : nullptr,
          g.data_ptr<scalar_t>(), w.numel(), sgd, bstep);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      launch_wgrad<scalar_t>(p, dz, x, w, bufv, Do, true, sgd, nullptr,
                             lbias.defined() ? &bstep : nullptr);
    }
  });
}

// Z (the pre-gate pathway outputs, without bias) from cuBLAS: blocked plans as one bmm over
// views, grouped ones gathered per pathway (the lookahead where its fused kernel does not apply).
Tensor compute_z_cublas(const Plan& p, const Tensor& paths, const Tensor& x, const Tensor& w) {
  const int64_t B = x.size(1), Do = w.size(1);
  if (p.blocked())
    return at::bmm(x_blocks(p, x), w_blocks(p, w).transpose(1, 2))
        .reshape({p.z_rows(B), p.z_cols(Do)});
  Tensor z = at::empty({p.z_rows(B), Do}, x.options());
  if (z.numel() == 0) return z;
  const Tensor zp =
      at::bmm(x.index_select(0, paths[0]), w.index_select(0, paths[1]).transpose(1, 2));
  z.view({p.P, B, Do}).index_copy_(0, paths[3], zp);
  return z;
}

// pathway_sgd_ and the next forward's Z from the updated weight: for blocked plans of at most
// kBT rows per block in both batches (the k-path encoders) in the update kernel's epilogue, so
// each weight tile is read once for both (the tiles' partial sums of Z, 4 bytes per value and
// tile, are added by a second kernel); else the update, then cuBLAS.
Tensor pathway_sgd_lookahead_cuda(const Tensor& dz_, const Tensor& x_, const Tensor& w,
                                  const c10::optional<Tensor>& buf, const Tensor& paths,
                                  const Tensor& csr, at::IntArrayRef layout, double lr,
                                  double momentum, double weight_decay, bool nesterov,
                                  int64_t rounding_seed, const Tensor& x_next_,
                                  const c10::optional<Tensor>& rounding_step,
                                  const c10::optional<Tensor>& bias_,
                                  const c10::optional<Tensor>& bias_buf,
                                  int64_t bias_rounding_seed) {
  TORCH_CHECK(x_.dim() == 3 && w.dim() == 3, "x, weight: expected 3-D tensors");
  check_x_next(x_next_, x_);
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor xn = x_next_.contiguous();
  const Plan p = dev_plan(paths, csr, layout, x_.size(0), w.size(0), x_);
  const int64_t B = x_.size(1);
  const bool fuse = p.blocked() && p.ns * B <= kBT && xn.size(1) == B && w.numel() > 0;
  if (!fuse) {
    pathway_sgd_cuda(dz_, x_, w, buf, paths, csr, layout, lr, momentum, weight_decay, nesterov,
                     rounding_seed, rounding_step, bias_, bias_buf, bias_rounding_seed);
    return compute_z_cublas(p, paths, xn, w);
  }
  check_sgd_state(w, "weight", buf, momentum, x_);
  const Rounding rd = rounding_for(rounding_seed, rounding_step, w, "weights");
  const LayerBias lbias = layer_bias(bias_, bias_buf, w, x_, lr, momentum, weight_decay,
                                     nesterov, bias_rounding_seed, rounding_step);
  check_float(dz_, "grad_z", x_.scalar_type());
  check_same_device(dz_, "grad_z", x_);
  const Tensor dz = dz_.contiguous(), x = x_.contiguous();
  check_grad_z(dz, p, B, w.size(1));
  const Tensor bufv = buf ? *buf : Tensor();
  const SgdArgs sgd{lr, momentum, weight_decay, nesterov, rd};
  Tensor z;
  GATED_DISPATCH(w.scalar_type(), "pathway_sgd_lookahead_cuda", [&] {
    BiasStep<scalar_t> bstep;
    if (lbias.defined())
      bstep = bias_step<scalar_t>(p, dz, lbias.bias, lbias.buf, B, w.size(1), lbias.sgd);
    z = launch_wgrad<scalar_t>(p, dz, x, w, bufv, w.size(1), true, sgd, &xn,
                               lbias.defined() ? &bstep : nullptr);
  });
  return z;
}

// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor> gated_cross_entropy_cuda(const Tensor& logits_,
                                                                    const Tensor& target_,
                                                                    const Tensor& gate_) {
  check_cuda_dtype(logits_, "logits");
  const Tensor logits = logits_view(logits_);  // 4-D, or the k-path's strided 5-D view
  const LogitBlocks lb(logits);
  const int64_t R = lb.R, P = lb.P, B = lb.B, C = lb.C;
  check_ce_forward(logits, lb, target_, gate_);
  const c10::cuda::CUDAGuard guard(logits_.device());
  const Tensor target = target_.contiguous(), gate = gate_.contiguous();
  Tensor loss = at::empty({R}, logits.options());
  Tensor path_loss = at::empty({R, P}, logits.options());
  Tensor correct = at::empty({R, P}, target.options());
  Tensor lse = at::empty({R, P, B}, logits.options());
  if (R == 0) return {loss, path_loss, correct, lse};
  GATED_DISPATCH(logits.scalar_type(), "gated_cross_entropy_cuda", [&] {
    if (P > 0 && C <= kCeThreadClasses && B <= kCeRowsMaxB && !ce_thread_forced()) {
      const int64_t blocks = (R * P + kWarp - 1) / kWarp;
      TORCH_CHECK(blocks < std::numeric_limits<int>::max(), "gated_cross_entropy: too many paths");
      GATED_LAUNCH(ce_forward_rows_kernel<scalar_t>, (unsigned)blocks, (unsigned)(B * kWarp))(
          logits.data_ptr<scalar_t>(), lb, target.data_ptr<int64_t>(),
          path_loss.data_ptr<scalar_t>(), correct.data_ptr<int64_t>(), lse.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (P > 0 && C <= kCeThreadClasses) {
      GATED_LAUNCH(ce_forward_thread_kernel<scalar_t>, flat_blocks(R * P, 128), 128)(
          logits.data_ptr<scalar_t>(), lb, target.data_ptr<int64_t>(),
          path_loss.data_ptr<scalar_t>(), correct.data_ptr<int64_t>(), lse.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (P > 0) {
      GATED_LAUNCH(ce_forward_kernel<scalar_t>, (unsigned)(R * P), kCeWarps * kWarp)(
          logits.data_ptr<scalar_t>(), lb, target.data_ptr<int64_t>(),
          path_loss.data_ptr<scalar_t>(), correct.data_ptr<int64_t>(), lse.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    GATED_LAUNCH(ce_loss_kernel<scalar_t>, (unsigned)R, 1024)(
        gate.data_ptr<scalar_t>(), path_loss.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(), P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, path_loss, correct, lse};
}

Tensor gated_cross_entropy_backward_cuda(const c10::optional<Tensor>& grad_loss_,
                                         const c10::optional<Tensor>& grad_pl_,
                                         const Tensor& logits_, const Tensor& target_,
                                         const Tensor& gate_, const Tensor& lse_) {
  const Tensor logits = logits_view(logits_);  // 4-D, or the k-path's strided 5-D view
  const LogitBlocks lb(logits);
  const int64_t R = lb.R, P = lb.P, B = lb.B, C = lb.C;
  check_cuda_dtype(logits_, "logits");
  check_ce_backward(grad_loss_, grad_pl_, logits, lb, target_, gate_, lse_);
  const c10::cuda::CUDAGuard guard(logits_.device());
  // A missing grad_loss / grad_path_loss (an output nobody differentiates) counts as zeros:
  // no zero-filled tensor (and no fill kernel) for it.
  const Tensor target = target_.contiguous(), gate = gate_.contiguous(), lse = lse_.contiguous(),
               grad_loss = grad_loss_ ? grad_loss_->contiguous() : Tensor(),
               grad_pl = grad_pl_ ? grad_pl_->contiguous() : Tensor();
  Tensor grad = at::empty_like(logits);  // the logits' strides (a strided view stays one)
  if (grad.numel() == 0) return grad;
  const LogitBlocks gb(grad);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor wts = at::empty({R, P}, logits.options().dtype(acc_dtype));
  GATED_DISPATCH(logits.scalar_type(), "gated_cross_entropy_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GATED_LAUNCH(ce_weights_kernel<scalar_t>, (unsigned)R, 1024)(
        grad_loss.defined() ? grad_loss.data_ptr<scalar_t>() : nullptr,
        grad_pl.defined() ? grad_pl.data_ptr<scalar_t>() : nullptr, gate.data_ptr<scalar_t>(),
        wts.data_ptr<acc_t>(), P, B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr bool kRecompute = sizeof(scalar_t) == 2;
    const int64_t rows = R * P * B;
    auto go = [&](auto kernel, int64_t threads_per_row) {
      GATED_LAUNCH(kernel, flat_blocks(rows * threads_per_row, 256), 256)(
          logits.data_ptr<scalar_t>(), lb, target.data_ptr<int64_t>(), lse.data_ptr<scalar_t>(),
          wts.data_ptr<acc_t>(), grad.data_ptr<scalar_t>(), gb);
    };
    if (C <= kCeThreadClasses) {
      go(ce_backward_kernel<scalar_t, kRecompute, true>, 1);
    } else {
      go(ce_backward_kernel<scalar_t, kRecompute, false>, kWarp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

GATED_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("pathway_matmul", &pathway_matmul_cuda);
  m.impl("pathway_grad_z", &pathway_grad_z_cuda);
  m.impl("pathway_grad_x", &pathway_grad_x_cuda);
  m.impl("pathway_grad_weight", &pathway_grad_weight_cuda);
  m.impl("pathway_grad_bias", &pathway_grad_bias_cuda);
  m.impl("pathway_grad_gate", &pathway_grad_gate_cuda);
  m.impl("pathway_sgd_", &pathway_sgd_cuda);
  m.impl("pathway_sgd_lookahead_", &pathway_sgd_lookahead_cuda);
  m.impl("pathway_bias_sgd_", &pathway_bias_sgd_cuda);
  m.impl("gated_cross_entropy", &gated_cross_entropy_cuda);
  m.impl("gated_cross_entropy_backward", &gated_cross_entropy_backward_cuda);
}

}  // namespace gated_ops

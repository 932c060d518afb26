// The fused SGD on CUDA: pathway_sgd_ (the skinny weight-gradient kernel with the update in its
// epilogue, or cuBLAS and an elementwise update; a layer's bias step in blocks of the same
// launch), its lookahead (pathway_sgd_lookahead_: the next forward in the update's epilogue) and
// the bias step (pathway_bias_sgd_). The weight- and bias-gradient kernels also serve
// pathway_grad_weight / pathway_grad_bias without the update (launch_weight_grad,
// launch_bias_grad). cuda/common.cuh states the rules every launcher keeps.
#include "cuda/common.cuh"

namespace gated_ops {
namespace GATED_CUDA_NS {
namespace {

// One element of torch.optim.SGD's step (dampening 0) in the accumulation type: returns the new
// parameter and updates the momentum mb (when has_buf); see sgd_rows in cpu/sgd.cpp.
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

// The weight-gradient kernel's vector: at most 4 values (8-byte loads for 16-bit types), so that
// its 4 x VEC accumulators fit 4 blocks of 256 threads per SM (ptxas: 8 bf16 per lane took 103
// registers, 2 blocks).
template <typename scalar_t>
constexpr int wgrad_vec_of() {
  return vec_of<scalar_t>() < 4 ? vec_of<scalar_t>() : 4;
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
// SGD takes 72 (fp32 and bf16; 3 blocks per SM) with the launch bounds below. A version that
// loaded W and the momentum before the sum and chunked every plan took 126 registers with spills
// in fp32 (2 blocks per SM) and 222 in bf16 (1 block), 9% slower (benchmarks/results/h100-*).
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

// ---------------------------------------------------------------------------------------------
// Host launchers.
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

// The skinny weight-gradient kernel: into `out` (grad) or onto the weight (SGD).
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

}  // namespace

template <typename scalar_t>
void launch_weight_grad(const Plan& p, const Tensor& dz, const Tensor& x, const Tensor& out,
                        int64_t Do) {
  launch_wgrad<scalar_t>(p, dz, x, out, Tensor(), Do, false, SgdArgs{});
}
template <typename scalar_t>
void launch_bias_grad(const Plan& p, const Tensor& dz, const Tensor& gb, int64_t B, int64_t Do) {
  launch_grad_bias<scalar_t>(p, dz, gb, Tensor(), B, Do, false, SgdArgs{});
}
#define GATED_INSTANTIATE(scalar_t)                                                          \
  template void launch_weight_grad<scalar_t>(const Plan&, const Tensor&, const Tensor&,       \
                                             const Tensor&, int64_t);                         \
  template void launch_bias_grad<scalar_t>(const Plan&, const Tensor&, const Tensor&, int64_t, \
                                           int64_t);
GATED_FOR_EACH_DTYPE(GATED_INSTANTIATE)
#undef GATED_INSTANTIATE

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

}  // namespace GATED_CUDA_NS
}  // namespace gated_ops

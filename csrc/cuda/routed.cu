// The routed (sparse) pathway matmul on CUDA: the route table (pathway_route), the forward
// (routed_matmul, grouped or combined output) and its gradients. routed.h states the table's
// layout, cpu/routed.cpp the semantics these kernels match (which rows are zero, the order of
// every sum), cuda/common.cuh the rules every launcher keeps.
//
// No value of the route table reaches the host: the number of used slots and the groups' sizes
// live on the device, so the grouped GEMM's grid is sized by an upper bound and each block finds
// its group from the offsets, and a routed step can be captured in a CUDA graph. Hence, unlike
// the CPU kernels, nothing here checks the table's or idx's contents:
//   * a pathway index outside [-1, P), or a pathway whose source, weight or destination is out
//     of range, trips a device-side assert (CUDA_KERNEL_ASSERT, as a bad class index in
//     cuda/cross_entropy.cu does), which fails the next CUDA call;
//   * a NaN gate propagates into the outputs it scales (the CPU raises);
//   * a route table made by hand that is not pathway_route's is not detected (the CPU raises
//     "corrupt table"): its order / pos / offsets are used as they are.
// Every sum runs in a fixed order and no kernel uses a floating-point atomic: two runs give the
// same bits.
//
// The kernels, in the order a routed forward and backward launch them:
//   route_keys_kernel, at::sort, route_table_kernel   pathway_route: a sort of unique keys
//   route_tile_starts_kernel                         the grouped GEMM's row tiles per group
//   routed_gemm_kernel (or at::_grouped_mm, bf16 on sm90 / sm100, + routed_rows_fixup_kernel)
//                                                    z = x_q W_m^T + b_m; grad_x's dz_q W_m
//   routed_combine_kernel                            y[t, b] = sum_j gate z (and grad_x by source)
//   routed_grad_z_kernel, routed_grad_weight_kernel, routed_grad_bias_kernel,
//   routed_grad_gate_kernel
#include "cuda/common.cuh"

namespace gated_ops {
namespace GATED_CUDA_NS {
namespace {

// The slots of a call on the device: idx (B, k) and the plan's pathway rows (paths (5, P):
// source, weight, destination first).
struct RoutedSlots {
  const int64_t* idx = nullptr;  // (B, k), -1: unused
  const int64_t* src = nullptr;
  const int64_t* wgt = nullptr;
  const int64_t* dst = nullptr;
  int64_t B = 0, k = 0, N = 0, P = 0;
};

RoutedSlots routed_slots(const Tensor& idx, const Tensor& paths) {
  RoutedSlots s;
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

// The pathway of a used slot, asserted in range (the host never reads idx).
__device__ __forceinline__ int64_t slot_path(const RoutedSlots& s, int64_t slot) {
  const int64_t p = s.idx[slot];
  CUDA_KERNEL_ASSERT(p >= 0 && p < s.P && "idx: pathway index out of range [0, P)");
  return p;
}

constexpr int kFlatThreads = 256;

// =============================================================================================
// pathway_route. The CPU's table is a stable counting sort of the slots by key (the weight of
// the slot's pathway, M for an unused slot). Here key * N + slot is sorted instead: the values
// are unique, so any sort gives the one order that is stable by slot within a key (whatever
// at::sort's stability), and the sorted values carry both the key and the slot. Then one
// kernel writes order, its inverse, and offsets[m] = #values below m N (a binary search): no
// atomics, no count to read back.
__global__ void route_keys_kernel(const RoutedSlots s, int64_t M, int64_t* __restrict__ keys) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < s.N;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = s.idx[i];
    CUDA_KERNEL_ASSERT(p >= -1 && p < s.P && "idx: pathway index out of range [-1, P)");
    int64_t key = M;
    if (p >= 0) {
      key = s.wgt[p];
      CUDA_KERNEL_ASSERT(key >= 0 && key < M && "paths: weight index out of range [0, M)");
    }
    keys[i] = key * s.N + i;
  }
}

__global__ void route_table_kernel(const int64_t* __restrict__ sorted, int64_t N, int64_t M,
                                   int64_t* __restrict__ route) {
  int64_t* order = route;
  int64_t* pos = route + N;
  int64_t* offsets = route + 2 * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N + M + 1;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < N) {
      const int64_t slot = sorted[i] % N;
      order[i] = slot;
      pos[slot] = i;
    } else {
      const int64_t bound = (i - N) * N;  // offsets[m]: the number of values below m N
      int64_t lo = 0, hi = N;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (sorted[mid] < bound) lo = mid + 1;
        else hi = mid;
      }
      offsets[i - N] = lo;
    }
  }
}

// =============================================================================================
// The grouped GEMM: out[q, :] = A_q B_m (+ bias[m]) for every sorted row q of weight m's group,
// out[q, :] = 0 for the unused rows q >= offsets[M]. A_q is a row of K values: x's row (source,
// sample) of the slot at q, gathered in the tile load (kGather), or row q of a grouped operand;
// B_m (K, ncols) is weight m read through strides (the forward's W_m^T, grad_x's W_m).
//
// The groups' sizes are known on the device only, so the grid is an upper bound: blockIdx.x
// walks the row tiles of the M + 1 groups (the M weights, then the unused rows, whose tiles
// write zeros), sum_g ceil(n_g / 32) <= ceil(N / 32) + M + 1; route_tile_starts_kernel writes
// where each group's tiles start, and a block past the last tile exits (the column tile is
// the fastest-varying part of blockIdx.x). A block of 32 x 8 threads owns a 32 x 32 tile of
// out: thread (tx, ty) the column tx of rows ty, ty + 8, ty + 16, ty + 24, accumulated in
// opmath over K in steps of 32 staged in shared memory (the rows of A and B along K, each
// padded to 33 so that the column-wise reads hit 32 banks). Each output's sum runs k = 0, 1,
// ..., K - 1: deterministic.
constexpr int kRt = 32;            // rows, columns and K step of a tile
constexpr int kRtRows = 8;         // warps a block: each thread owns kRt / kRtRows rows
constexpr int kRtPer = kRt / kRtRows;

template <typename scalar_t>
struct RoutedGemmArgs {
  const scalar_t* a;     // x (S, B, K) (kGather) or grouped rows (N, K)
  const scalar_t* w;     // (M, ., .): B_m (kk, n) = w[m * w_sm + kk * w_sk + n * w_sn]
  const scalar_t* bias;  // (M, ncols) or null
  scalar_t* out;         // (N, ncols)
  const int64_t* order;    // the route table's parts
  const int64_t* offsets;  // (M + 1)
  const int64_t* tiles;    // (M + 2): the first row tile of each group, then the total
  RoutedSlots s;
  int64_t M, K, ncols, S, col_tiles;
  int64_t w_sm, w_sk, w_sn;
};

// tiles[g] = sum_{g' < g} ceil(n_g' / 32) for the M + 1 groups (group M: the unused rows), and
// tiles[M + 1] the total. One block: each thread sums a contiguous run of groups, thread 0
// scans the 256 partial sums in order, each thread writes its run.
__global__ void __launch_bounds__(kFlatThreads)
route_tile_starts_kernel(const int64_t* __restrict__ offsets, int64_t N, int64_t M,
                         int64_t* __restrict__ tiles) {
  __shared__ int64_t part[kFlatThreads];
  const int64_t G = M + 1, per = (G + kFlatThreads - 1) / kFlatThreads;
  const int64_t g0 = min(G, threadIdx.x * per), g1 = min(G, g0 + per);
  auto ntiles = [&](int64_t g) {
    const int64_t end = g < M ? offsets[g + 1] : N;
    return (end - offsets[g] + kRt - 1) / kRt;
  };
  int64_t sum = 0;
  for (int64_t g = g0; g < g1; ++g) sum += ntiles(g);
  part[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t acc = 0;
    for (int t = 0; t < kFlatThreads; ++t) {
      const int64_t v = part[t];
      part[t] = acc;
      acc += v;
    }
    tiles[G] = acc;
  }
  __syncthreads();
  int64_t acc = part[threadIdx.x];
  for (int64_t g = g0; g < g1; ++g) {
    tiles[g] = acc;
    acc += ntiles(g);
  }
}

template <typename scalar_t, bool kGather>
__global__ void __launch_bounds__(kRt * kRtRows)
routed_gemm_kernel(const RoutedGemmArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t As[kRt][kRt + 1];  // [row][kk]
  __shared__ acc_t Bs[kRt][kRt + 1];  // [column][kk]
  const int tx = threadIdx.x % kRt, ty = threadIdx.x / kRt;
  const int64_t t = blockIdx.x / a.col_tiles, ct = blockIdx.x % a.col_tiles, M = a.M;
  if (t >= a.tiles[M + 1]) return;  // past the last tile (the grid is an upper bound)
  int64_t lo = 0, hi = M;           // the group g: tiles[g] <= t < tiles[g + 1]
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (a.tiles[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  const int64_t g = lo;
  const int64_t row0 = a.offsets[g] + (t - a.tiles[g]) * kRt;
  const int64_t row_end = g < M ? a.offsets[g + 1] : a.s.N;
  const int64_t col = ct * kRt + tx;
  if (g == M) {  // the unused rows: zero
#pragma unroll
    for (int i = 0; i < kRtPer; ++i) {
      const int64_t q = row0 + ty + i * kRtRows;
      if (q < row_end && col < a.ncols) a.out[q * a.ncols + col] = scalar_t(0);
    }
    return;
  }
  // The start of each A row this thread loads (-1: past the group), fixed over K.
  int64_t arow[kRtPer];
#pragma unroll
  for (int i = 0; i < kRtPer; ++i) {
    const int64_t q = row0 + ty + i * kRtRows;
    arow[i] = -1;
    if (q < row_end) {
      if (kGather) {
        const int64_t slot = a.order[q], p = slot_path(a.s, slot);
        arow[i] = (checked(a.s.src[p], a.S) * a.s.B + slot / a.s.k) * a.K;
      } else {
        arow[i] = q * a.K;
      }
    }
  }
  const scalar_t* wm = a.w + g * a.w_sm;
  const bool k_inner = a.w_sk == 1;  // W's rows run along K (forward) or along the columns
  const int64_t col0 = ct * kRt;
  acc_t acc[kRtPer];
#pragma unroll
  for (int i = 0; i < kRtPer; ++i) acc[i] = acc_t(0);
  for (int64_t k0 = 0; k0 < a.K; k0 += kRt) {
#pragma unroll
    for (int i = 0; i < kRtPer; ++i) {
      const int r = ty + i * kRtRows;
      As[r][tx] = arow[i] >= 0 && k0 + tx < a.K ? static_cast<acc_t>(a.a[arow[i] + k0 + tx])
                                                : acc_t(0);
      // Bs[n][kk] = B_m(k0 + kk, col0 + n), the lanes along W's contiguous dimension
      const int n = k_inner ? r : tx, kk = k_inner ? tx : r;
      Bs[n][kk] = col0 + n < a.ncols && k0 + kk < a.K
                      ? static_cast<acc_t>(wm[(k0 + kk) * a.w_sk + (col0 + n) * a.w_sn])
                      : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kRt; ++kk) {
      const acc_t bv = Bs[tx][kk];
#pragma unroll
      for (int i = 0; i < kRtPer; ++i) acc[i] += As[ty + i * kRtRows][kk] * bv;
    }
    __syncthreads();
  }
  if (col >= a.ncols) return;
  const acc_t bv = a.bias ? static_cast<acc_t>(a.bias[g * a.ncols + col]) : acc_t(0);
#pragma unroll
  for (int i = 0; i < kRtPer; ++i) {
    const int64_t q = row0 + ty + i * kRtRows;
    if (q < row_end) a.out[q * a.ncols + col] = static_cast<scalar_t>(acc[i] + bv);
  }
}

// After at::_grouped_mm (which writes rows below offsets[M] only, without a bias): the used
// rows get their weight's bias, the unused ones zeros.
template <typename scalar_t>
__global__ void routed_rows_fixup_kernel(const RoutedSlots s, const int64_t* __restrict__ order,
                                         const int64_t* __restrict__ offsets, int64_t M,
                                         const scalar_t* __restrict__ bias,
                                         scalar_t* __restrict__ out, int64_t ncols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nv = offsets[M];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < s.N * ncols;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = i / ncols, c = i - q * ncols;
    if (q >= nv) {
      out[i] = scalar_t(0);
    } else if (bias) {
      const int64_t m = checked(s.wgt[slot_path(s, order[q])], M);
      out[i] = static_cast<scalar_t>(static_cast<acc_t>(out[i]) +
                                     static_cast<acc_t>(bias[m * ncols + c]));
    }
  }
}

// The rows of x (S, B, K) in sorted slot order (N, K) for at::_grouped_mm, zero past the used
// ones (the GEMM does not read those).
template <typename scalar_t>
__global__ void routed_gather_kernel(const RoutedSlots s, const int64_t* __restrict__ order,
                                     const int64_t* __restrict__ offsets, int64_t M, int64_t S,
                                     const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                     int64_t K) {
  const int64_t nv = offsets[M];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < s.N * K;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = i / K, c = i - q * K;
    if (q >= nv) {
      out[i] = scalar_t(0);
    } else {
      const int64_t slot = order[q], p = slot_path(s, slot);
      out[i] = x[(checked(s.src[p], S) * s.B + slot / s.k) * K + c];
    }
  }
}

// =============================================================================================
// The per-sample epilogues. out[r, b, c] = sum over sample b's slots j, in order, whose
// pathway's destination (kByDst; else source) is r, of gate[b, j] * rows[pos[b k + j], c]
// (gate null: ones); 0 where no slot of b reaches r. One thread per output element: it sums
// the slots j = 0..k-1 in order, the first product taken as it is, as the CPU kernel does.
template <typename scalar_t, bool kByDst>
__global__ void routed_combine_kernel(const RoutedSlots s, const int64_t* __restrict__ pos,
                                      const scalar_t* __restrict__ gate,
                                      const scalar_t* __restrict__ rows, int64_t R, int64_t D,
                                      scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = R * s.B * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / (s.B * D), rem = i - r * s.B * D, b = rem / D, c = rem - b * D;
    acc_t acc = 0;
    bool first = true;
    for (int64_t j = 0; j < s.k; ++j) {
      const int64_t slot = b * s.k + j, p = s.idx[slot];
      if (p < 0) continue;
      CUDA_KERNEL_ASSERT(p < s.P && "idx: pathway index out of range [-1, P)");
      if (checked(kByDst ? s.dst[p] : s.src[p], R) != r) continue;
      const acc_t g = gate ? static_cast<acc_t>(gate[slot]) : acc_t(1);
      const acc_t v = g * static_cast<acc_t>(rows[pos[slot] * D + c]);
      acc = first ? v : acc + v;
      first = false;
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

// dz[q] = gate[slot] * grad_y[t, b] for a used sorted row q (slot = order[q], t its
// destination), grad_y[q] itself for a grouped output; 0 for the unused rows.
template <typename scalar_t>
__global__ void routed_grad_z_kernel(const RoutedSlots s, const int64_t* __restrict__ order,
                                     const int64_t* __restrict__ offsets, int64_t M,
                                     const scalar_t* __restrict__ gy,
                                     const scalar_t* __restrict__ gate, int64_t T, bool grouped,
                                     int64_t Do, scalar_t* __restrict__ dz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nv = offsets[M];
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < s.N * Do;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = i / Do, o = i - q * Do;
    if (q >= nv) {
      dz[i] = scalar_t(0);
    } else if (grouped) {
      dz[i] = gy[i];
    } else {
      const int64_t slot = order[q], p = slot_path(s, slot);
      const int64_t t = checked(s.dst[p], T), b = slot / s.k;
      const acc_t g = gate ? static_cast<acc_t>(gate[slot]) : acc_t(1);
      dz[i] = static_cast<scalar_t>(g * static_cast<acc_t>(gy[(t * s.B + b) * Do + o]));
    }
  }
}

// grad_W[m] (Do, Di) = sum over weight m's rows q, in order, of dz[q]^T x_q. A block of 32 x 8
// threads owns a 32 x 32 tile (o, i) of one weight: thread (tx, ty) the column i = tx of rows
// o = ty, ty + 8, ...; the group's rows are staged 32 at a time (dz along o, x along i, the
// lanes along the contiguous dimension). A weight no slot used gets zeros (its loop is empty).
// grid.x = M x the tiles of (Do, Di): the weights are known on the host, the rows are not.
template <typename scalar_t, bool kGather>
__global__ void __launch_bounds__(kRt * kRtRows)
routed_grad_weight_kernel(const RoutedSlots s, const int64_t* __restrict__ order,
                          const int64_t* __restrict__ offsets, const scalar_t* __restrict__ dz,
                          const scalar_t* __restrict__ x, int64_t S, int64_t Do, int64_t Di,
                          int64_t nto, int64_t nti, scalar_t* __restrict__ gw) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t Ds[kRt][kRt + 1];  // [row][o]
  __shared__ acc_t Xs[kRt][kRt + 1];  // [row][i]
  const int tx = threadIdx.x % kRt, ty = threadIdx.x / kRt;
  const int64_t it = blockIdx.x % nti, ot = (blockIdx.x / nti) % nto, m = blockIdx.x / (nti * nto);
  const int64_t o0 = ot * kRt, i0 = it * kRt;
  const int64_t q0 = offsets[m], q1 = offsets[m + 1];
  acc_t acc[kRtPer];
#pragma unroll
  for (int j = 0; j < kRtPer; ++j) acc[j] = acc_t(0);
  for (int64_t qb = q0; qb < q1; qb += kRt) {
#pragma unroll
    for (int j = 0; j < kRtPer; ++j) {
      const int r = ty + j * kRtRows;
      const int64_t q = qb + r;
      const bool in = q < q1;
      Ds[r][tx] = in && o0 + tx < Do ? static_cast<acc_t>(dz[q * Do + o0 + tx]) : acc_t(0);
      acc_t xv = acc_t(0);
      if (in && i0 + tx < Di) {
        int64_t row = q;
        if (kGather) {
          const int64_t slot = order[q], p = slot_path(s, slot);
          row = checked(s.src[p], S) * s.B + slot / s.k;
        }
        xv = static_cast<acc_t>(x[row * Di + i0 + tx]);
      }
      Xs[r][tx] = xv;
    }
    __syncthreads();
#pragma unroll 8
    for (int r = 0; r < kRt; ++r) {
      const acc_t xv = Xs[r][tx];
#pragma unroll
      for (int j = 0; j < kRtPer; ++j) acc[j] += Ds[r][ty + j * kRtRows] * xv;
    }
    __syncthreads();
  }
  if (i0 + tx >= Di) return;
#pragma unroll
  for (int j = 0; j < kRtPer; ++j) {
    const int64_t o = o0 + ty + j * kRtRows;
    if (o < Do) gw[(m * Do + o) * Di + i0 + tx] = static_cast<scalar_t>(acc[j]);
  }
}

// grad_bias[m, o] = sum over weight m's rows, in row order, of dz[q, o] (opmath): one thread per
// (m, o), adjacent threads on adjacent columns.
template <typename scalar_t>
__global__ void routed_grad_bias_kernel(const int64_t* __restrict__ offsets, int64_t M,
                                        const scalar_t* __restrict__ dz, int64_t Do,
                                        scalar_t* __restrict__ gb) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * Do;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / Do, o = i - m * Do;
    acc_t acc = 0;
    for (int64_t q = offsets[m]; q < offsets[m + 1]; ++q) acc += static_cast<acc_t>(dz[q * Do + o]);
    gb[i] = static_cast<scalar_t>(acc);
  }
}

// grad_gate[b, j] = <grad_y[t, b], z[pos[b k + j]]> for a used slot (t its destination), 0 for
// an unused one: one warp per slot, lanes striding D_out, a fixed-order warp sum.
template <typename scalar_t>
__global__ void routed_grad_gate_kernel(const RoutedSlots s, const int64_t* __restrict__ pos,
                                        const scalar_t* __restrict__ gy,
                                        const scalar_t* __restrict__ z, int64_t T, int64_t Do,
                                        scalar_t* __restrict__ gg) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t slot = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp; slot < s.N;
       slot += warps) {
    const int64_t p = s.idx[slot];
    if (p < 0) {  // (the whole warp: p is the same in every lane)
      if (lane == 0) gg[slot] = scalar_t(0);
      continue;
    }
    CUDA_KERNEL_ASSERT(p < s.P && "idx: pathway index out of range [-1, P)");
    const int64_t t = checked(s.dst[p], T), b = slot / s.k;
    const scalar_t* gr = gy + (t * s.B + b) * Do;
    const scalar_t* zr = z + pos[slot] * Do;
    acc_t acc = 0;
    for (int64_t o = lane; o < Do; o += kWarp) {
      acc += static_cast<acc_t>(gr[o]) * static_cast<acc_t>(zr[o]);
    }
    acc = warp_sum(acc);
    if (lane == 0) gg[slot] = static_cast<scalar_t>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

// Whether the grouped GEMM of rows (N, K) against M weights into (N, ncols) goes to
// at::_grouped_mm: torch's CUTLASS grouped GEMM takes its group offsets on the device only for
// bfloat16 on sm90 / sm100 (elsewhere it falls back to a loop over the groups that copies the
// offsets to the host: a synchronisation), needs 16-byte aligned rows (K and ncols multiples
// of 8) and launches one thread per group in its setup (M <= 1024). Its groups may be empty
// (only a K-split grouped GEMM, not used here, refuses those). cuda_routed_gemm = 1
// (kernel_choice.h) takes it wherever dtype and shapes allow, the architecture aside (under the
// CPU emulation: torch's CPU grouped GEMM), 0 never.
bool use_grouped_mm(const Tensor& a, const Tensor& w, int64_t M, int64_t K, int64_t ncols) {
  if (a.scalar_type() != at::kBFloat16 || M < 1 || M > 1024 || K < 8 || K % 8 != 0 ||
      ncols % 8 != 0 || !aligned16(a.data_ptr()) || !aligned16(w.data_ptr())) {
    return false;
  }
  const int64_t forced = forced_kernel(KernelChoice::kCudaRoutedGemm);
  if (forced != kAutomatic) return forced == 1;
#if defined(GATED_OPS_CUDA_EMU) || defined(_WIN32)
  return false;  // (no device to ask; Windows builds of torch lack the CUTLASS kernels)
#else
  const int major = at::cuda::getCurrentDeviceProperties()->major;
  return major == 9 || major == 10;
#endif
}

// The group ends at::_grouped_mm takes: int32 offsets[1..M] (a device-side cast, no sync).
Tensor grouped_mm_ends(const Tensor& route, int64_t N, int64_t M) {
  return route.narrow(0, 2 * N + 1, M).to(at::kInt);
}

// The grouped GEMM (N, ncols) of a's rows (gathered from x (S, B, K) when gather) with
// B_m = w[m] (w_t: its transpose), plus bias; zero rows past the used ones.
template <typename scalar_t>
Tensor routed_gemm(const RoutedSlots& s, const RouteView& r, const Tensor& route,
                   const Tensor& a, bool gather, int64_t S, const Tensor& w, bool w_t,
                   const Tensor& bias) {
  const int64_t N = s.N, M = r.M, K = w_t ? w.size(2) : w.size(1);
  const int64_t ncols = w_t ? w.size(1) : w.size(2);
  if (N == 0 || ncols == 0) return at::empty({N, ncols}, a.options());
  const scalar_t* bias_p = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  if (use_grouped_mm(a, w, M, K, ncols)) {
    const NoAutocast no_autocast;
    Tensor rows = a;
    if (gather) {
      rows = at::empty({N, K}, a.options());
      GATED_LAUNCH(routed_gather_kernel<scalar_t>, flat_blocks(N * K, kFlatThreads),
                   kFlatThreads)(s, r.order, r.offsets, M, S, a.data_ptr<scalar_t>(),
                                 rows.data_ptr<scalar_t>(), K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // (ncols a multiple of 8: the result's rows are not padded, it is contiguous)
    Tensor out = at::_grouped_mm(rows, w_t ? w.transpose(1, 2) : w,
                                 grouped_mm_ends(route, N, M)).contiguous();
    GATED_LAUNCH(routed_rows_fixup_kernel<scalar_t>, flat_blocks(N * ncols, kFlatThreads),
                 kFlatThreads)(s, r.order, r.offsets, M, bias_p, out.data_ptr<scalar_t>(),
                               ncols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  Tensor out = at::empty({N, ncols}, a.options());
  // route_tile_starts_kernel's scratch: M + 2 int64, a function of the shapes only
  Tensor tiles = at::empty({M + 2}, route.options());
  GATED_LAUNCH(route_tile_starts_kernel, 1, kFlatThreads)(r.offsets, N, M,
                                                          tiles.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  RoutedGemmArgs<scalar_t> ga;
  ga.a = a.data_ptr<scalar_t>();
  ga.w = w.data_ptr<scalar_t>();
  ga.bias = bias_p;
  ga.out = out.data_ptr<scalar_t>();
  ga.order = r.order;
  ga.offsets = r.offsets;
  ga.tiles = tiles.data_ptr<int64_t>();
  ga.s = s;
  ga.M = M;
  ga.K = K;
  ga.ncols = ncols;
  ga.S = S;
  ga.w_sm = w.size(1) * w.size(2);
  ga.w_sk = w_t ? 1 : w.size(2);  // forward: B_m(kk, n) = W_m[n, kk]; grad_x: W_m[kk, n]
  ga.w_sn = w_t ? w.size(2) : 1;
  ga.col_tiles = (ncols + kRt - 1) / kRt;
  const int64_t blocks = ((N + kRt - 1) / kRt + M + 1) * ga.col_tiles;
  TORCH_CHECK(blocks < std::numeric_limits<int>::max(),
              "routed_matmul: problem too large for one grouped GEMM launch");
  const auto gemm_kernel =
      gather ? routed_gemm_kernel<scalar_t, true> : routed_gemm_kernel<scalar_t, false>;
  GATED_LAUNCH(gemm_kernel, (unsigned)blocks, kRt * kRtRows)(ga);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// out (R, B, D) from the grouped rows (N, D): the per-sample sums of routed_combine_kernel.
template <typename scalar_t>
void launch_combine(const RoutedSlots& s, const RouteView& r, const Tensor& gate,
                    const Tensor& rows, bool by_dst, const Tensor& out) {
  const int64_t R = out.size(0), D = out.size(2);
  if (out.numel() == 0) return;
  const scalar_t* g = gate.defined() ? gate.data_ptr<scalar_t>() : nullptr;
  const auto combine_kernel =
      by_dst ? routed_combine_kernel<scalar_t, true> : routed_combine_kernel<scalar_t, false>;
  GATED_LAUNCH(combine_kernel, flat_blocks(out.numel(), kFlatThreads), kFlatThreads)(
      s, r.pos, g, rows.data_ptr<scalar_t>(), R, D, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// M from the table's length (the gradient ops that take no weight): 2 N + M + 1 entries.
int64_t weights_of(const Tensor& route, int64_t N) {
  const int64_t M = route.numel() - 2 * N - 1;
  TORCH_CHECK(M >= 0, "route: expected at least ", 2 * N + 1, " entries, got ", route.numel());
  return M;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// pathway_route: the slots grouped by weight (route_keys_kernel, a sort, route_table_kernel).
Tensor pathway_route_cuda(const Tensor& idx_, const Tensor& paths, int64_t num_weights) {
  check_route_idx(idx_, paths, idx_);
  TORCH_CHECK(num_weights >= 0, "num_weights: expected >= 0, got ", num_weights);
  const c10::cuda::CUDAGuard guard(idx_.device());
  const Tensor idx = idx_.contiguous();
  const RoutedSlots s = routed_slots(idx, paths);
  const int64_t N = s.N, M = num_weights;
  TORCH_CHECK(N == 0 || M + 1 <= std::numeric_limits<int64_t>::max() / N,
              "idx: too many slots (", N, ") for a route over ", M, " weights");
  if (N == 0) return at::zeros({M + 1}, idx.options());
  Tensor route = at::empty({2 * N + M + 1}, idx.options());
  Tensor keys = at::empty({N}, idx.options());
  GATED_LAUNCH(route_keys_kernel, flat_blocks(N, kFlatThreads), kFlatThreads)(
      s, M, keys.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const Tensor sorted = std::get<0>(at::sort(keys));
  GATED_LAUNCH(route_table_kernel, flat_blocks(N + M + 1, kFlatThreads), kFlatThreads)(
      sorted.data_ptr<int64_t>(), N, M, route.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return route;
}

// routed_matmul: z (N, D_out) the grouped rows x_q W_m^T + b_m (zero past the used ones), then
// y[t, b] = sum_j gate[b, j] z[pos[b k + j]] over the slots whose pathway ends in t.
std::tuple<Tensor, Tensor> routed_matmul_cuda(const Tensor& x_, const Tensor& w_,
                                              const c10::optional<Tensor>& bias_,
                                              const c10::optional<Tensor>& gate_,
                                              const Tensor& idx_, const Tensor& route,
                                              const Tensor& paths, int64_t num_dst,
                                              bool grouped_in, bool grouped_out) {
  check_route_idx(idx_, paths, x_);
  check_routed_data(x_, w_, bias_, gate_, idx_, grouped_in, grouped_out);
  check_cuda_dtype(x_, "x");
  TORCH_CHECK(num_dst >= 0, "num_dst: expected >= 0, got ", num_dst);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), w = w_.contiguous(), idx = idx_.contiguous();
  const RoutedSlots s = routed_slots(idx, paths);
  const RouteView r = route_view(route, s.N, w.size(0), x);
  const int64_t Do = w.size(1);
  const Tensor bias = bias_ ? bias_->contiguous() : Tensor();
  const Tensor gate = gate_ ? gate_->contiguous() : Tensor();
  Tensor z;
  Tensor y = grouped_out ? at::empty({0}, x.options()) : at::empty({num_dst, s.B, Do}, x.options());
  GATED_DISPATCH(x.scalar_type(), "routed_matmul_cuda", [&] {
    z = routed_gemm<scalar_t>(s, r, route, x, !grouped_in, grouped_in ? 0 : x.size(0), w,
                              /*w_t=*/true, bias);
    if (!grouped_out) launch_combine<scalar_t>(s, r, gate, z, /*by_dst=*/true, y);
  });
  if (grouped_out) return {z, y};
  return {y, z};
}

// dz (N, D_out): the grouped rows' pre-gate gradient, zero past the used rows.
Tensor routed_grad_z_cuda(const Tensor& grad_y_, const c10::optional<Tensor>& gate_,
                          const Tensor& idx_, const Tensor& route, const Tensor& paths,
                          bool grouped_out) {
  check_route_idx(idx_, paths, grad_y_);
  check_cuda_dtype(grad_y_, "grad_y");
  const c10::cuda::CUDAGuard guard(grad_y_.device());
  const Tensor gy = grad_y_.contiguous(), idx = idx_.contiguous();
  const RoutedSlots s = routed_slots(idx, paths);
  const RouteView r = route_view(route, s.N, weights_of(route, s.N), gy);
  if (grouped_out) {
    TORCH_CHECK(!gate_, "gate: a grouped output takes no gate");
    TORCH_CHECK(gy.dim() == 2 && gy.size(0) == s.N, "grad_y: expected grouped rows (N, D_out) "
                "with N = ", s.N, ", got shape ", gy.sizes());
  } else {
    TORCH_CHECK(gy.dim() == 3 && gy.size(1) == s.B, "grad_y: expected (T, B, D_out) with B = ",
                s.B, ", got shape ", gy.sizes());
    if (gate_) {
      check_float(*gate_, "gate", gy.scalar_type());
      check_same_device(*gate_, "gate", gy);
      GATED_CHECK_SHAPE("gate", *gate_, s.B, s.k);
    }
  }
  const Tensor gate = gate_ ? gate_->contiguous() : Tensor();
  const int64_t Do = gy.size(-1);
  Tensor dz = at::empty({s.N, Do}, gy.options());
  if (dz.numel() == 0) return dz;
  GATED_DISPATCH(gy.scalar_type(), "routed_grad_z_cuda", [&] {
    GATED_LAUNCH(routed_grad_z_kernel<scalar_t>, flat_blocks(dz.numel(), kFlatThreads),
                 kFlatThreads)(s, r.order, r.offsets, r.M, gy.data_ptr<scalar_t>(),
                               gate.defined() ? gate.data_ptr<scalar_t>() : nullptr,
                               grouped_out ? 0 : gy.size(0), grouped_out, Do,
                               dz.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dz;
}

// grad_x: the grouped rows dz_q W_m (N, D_in), or summed back to (S, B, D_in) in slot order.
Tensor routed_grad_x_cuda(const Tensor& dz_, const Tensor& w_, const Tensor& idx_,
                          const Tensor& route, const Tensor& paths, int64_t num_sources,
                          bool grouped_in) {
  check_route_idx(idx_, paths, dz_);
  check_cuda_dtype(dz_, "grad_z");
  const c10::cuda::CUDAGuard guard(dz_.device());
  const Tensor dz = dz_.contiguous(), w = w_.contiguous(), idx = idx_.contiguous();
  const RoutedSlots s = routed_slots(idx, paths);
  TORCH_CHECK(w.dim() == 3 && dz.dim() == 2 && dz.size(0) == s.N && dz.size(1) == w.size(1),
              "grad_z: expected (N, D_out) = (", s.N, ", ", w.dim() == 3 ? w.size(1) : -1,
              "), got shape ", dz.sizes());
  check_float(w, "weight", dz.scalar_type());
  check_same_device(w, "weight", dz);
  const RouteView r = route_view(route, s.N, w.size(0), dz);
  TORCH_CHECK(grouped_in || num_sources >= 0, "num_sources: expected >= 0, got ", num_sources);
  const int64_t Di = w.size(2);
  Tensor out;
  GATED_DISPATCH(dz.scalar_type(), "routed_grad_x_cuda", [&] {
    const Tensor gx = routed_gemm<scalar_t>(s, r, route, dz, /*gather=*/false, 0, w,
                                            /*w_t=*/false, Tensor());
    if (grouped_in) {
      out = gx;
      return;
    }
    out = at::empty({num_sources, s.B, Di}, dz.options());
    launch_combine<scalar_t>(s, r, Tensor(), gx, /*by_dst=*/false, out);
  });
  return out;
}

// grad_W[m] = dz_m^T x_m over weight m's rows (zero for a weight no slot used).
Tensor routed_grad_weight_cuda(const Tensor& dz_, const Tensor& x_, const Tensor& idx_,
                               const Tensor& route, const Tensor& paths, int64_t num_weights,
                               bool grouped_in) {
  check_route_idx(idx_, paths, dz_);
  check_cuda_dtype(dz_, "grad_z");
  check_float(x_, "x", dz_.scalar_type());
  check_same_device(x_, "x", dz_);
  TORCH_CHECK(num_weights >= 0, "num_weights: expected >= 0, got ", num_weights);
  const c10::cuda::CUDAGuard guard(dz_.device());
  const Tensor dz = dz_.contiguous(), x = x_.contiguous(), idx = idx_.contiguous();
  const RoutedSlots s = routed_slots(idx, paths);
  TORCH_CHECK(dz.dim() == 2 && dz.size(0) == s.N, "grad_z: expected (N, D_out) with N = ", s.N,
              ", got shape ", dz.sizes());
  TORCH_CHECK(grouped_in ? (x.dim() == 2 && x.size(0) == s.N) : (x.dim() == 3 && x.size(1) == s.B),
              "x: expected ", grouped_in ? "grouped rows (N, D_in)" : "(S, B, D_in)",
              " for this route, got shape ", x.sizes());
  const RouteView r = route_view(route, s.N, num_weights, dz);
  const int64_t Do = dz.size(1), Di = x.size(-1);
  Tensor gw = at::empty({num_weights, Do, Di}, dz.options());
  if (gw.numel() == 0) return gw;
  const int64_t nto = (Do + kRt - 1) / kRt, nti = (Di + kRt - 1) / kRt;
  const int64_t blocks = num_weights * nto * nti;
  TORCH_CHECK(blocks < std::numeric_limits<int>::max(),
              "routed_grad_weight: problem too large for one launch");
  const int64_t S = grouped_in ? 0 : x.size(0);
  GATED_DISPATCH(dz.scalar_type(), "routed_grad_weight_cuda", [&] {
    const auto wgrad_kernel = grouped_in ? routed_grad_weight_kernel<scalar_t, false>
                                         : routed_grad_weight_kernel<scalar_t, true>;
    GATED_LAUNCH(wgrad_kernel, (unsigned)blocks, kRt * kRtRows)(
        s, r.order, r.offsets, dz.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), S, Do, Di, nto,
        nti, gw.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gw;
}

// grad_bias[m] = the sum of dz over weight m's rows, in row order.
Tensor routed_grad_bias_cuda(const Tensor& dz_, const Tensor& route, int64_t num_weights) {
  check_cuda_dtype(dz_, "grad_z");
  TORCH_CHECK(dz_.dim() == 2, "grad_z: expected (N, D_out), got shape ", dz_.sizes());
  TORCH_CHECK(num_weights >= 0, "num_weights: expected >= 0, got ", num_weights);
  const c10::cuda::CUDAGuard guard(dz_.device());
  const Tensor dz = dz_.contiguous();
  const int64_t N = dz.size(0), Do = dz.size(1);
  const RouteView r = route_view(route, N, num_weights, dz);
  Tensor gb = at::empty({num_weights, Do}, dz.options());
  if (gb.numel() == 0) return gb;
  GATED_DISPATCH(dz.scalar_type(), "routed_grad_bias_cuda", [&] {
    GATED_LAUNCH(routed_grad_bias_kernel<scalar_t>, flat_blocks(gb.numel(), kFlatThreads),
                 kFlatThreads)(r.offsets, num_weights, dz.data_ptr<scalar_t>(), Do,
                               gb.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gb;
}

// grad_gate[b, j] = grad_y[t, b] . z[pos[b k + j]] (z: the pre-gate rows, bias included).
Tensor routed_grad_gate_cuda(const Tensor& grad_y_, const Tensor& z_, const Tensor& idx_,
                             const Tensor& route, const Tensor& paths) {
  check_route_idx(idx_, paths, grad_y_);
  check_cuda_dtype(grad_y_, "grad_y");
  check_float(z_, "z", grad_y_.scalar_type());
  check_same_device(z_, "z", grad_y_);
  const c10::cuda::CUDAGuard guard(grad_y_.device());
  const Tensor gy = grad_y_.contiguous(), z = z_.contiguous(), idx = idx_.contiguous();
  const RoutedSlots s = routed_slots(idx, paths);
  TORCH_CHECK(gy.dim() == 3 && gy.size(1) == s.B, "grad_y: expected (T, B, D_out) with B = ",
              s.B, ", got shape ", gy.sizes());
  TORCH_CHECK(z.dim() == 2 && z.size(0) == s.N && z.size(1) == gy.size(2),
              "z: expected (N, D_out) = (", s.N, ", ", gy.size(2), "), got shape ", z.sizes());
  const RouteView r = route_view(route, s.N, weights_of(route, s.N), gy);
  Tensor gg = at::empty({s.B, s.k}, gy.options());
  if (gg.numel() == 0) return gg;
  constexpr int kWarpsPerBlock = kFlatThreads / kWarp;
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>((s.N + kWarpsPerBlock - 1) / kWarpsPerBlock,
                                             int64_t(1) << 22));
  GATED_DISPATCH(gy.scalar_type(), "routed_grad_gate_cuda", [&] {
    GATED_LAUNCH(routed_grad_gate_kernel<scalar_t>, blocks, kFlatThreads)(
        s, r.pos, gy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), gy.size(0), gy.size(2),
        gg.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gg;
}

}  // namespace GATED_CUDA_NS
}  // namespace gated_ops

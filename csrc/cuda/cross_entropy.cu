// The gated cross-entropy on CUDA: per-path mean losses, correct counts and the gated mean
// (gated_cross_entropy), and its gradient with respect to the logits (gated_cross_entropy_
// backward). cuda/common.cuh states the rules every launcher keeps.
#include "cuda/common.cuh"

namespace gated_ops {
namespace GATED_CUDA_NS {
namespace {

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
// walking its 8 rows in a chain of dependent loads (15 us on an H100 for 3.2 MB of logits, benchmarks/results/h100-2026-11-26b-profile.txt).
// The lanes of a warp read adjacent paths (in the k-path's strided view the J paths of a sample
// row are adjacent in memory). Each row's statistics as row_stats_serial computes them, and the
// path's B rows are summed in row order from shared memory: bit for bit ce_forward_thread_kernel
// (tests/test_cuda.py compares the two; cuda_ce, kernel_choice.h, forces that one).
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

// cuda_ce = 1 (kernel_choice.h): the few-class cross-entropy forward on ce_forward_thread_kernel
// (a thread per path) instead of ce_forward_rows_kernel (a thread per row), for tests and A/Bs;
// read at each launch (a captured graph keeps the kernel it recorded).
bool ce_thread_forced() { return forced_kernel(KernelChoice::kCudaCe) == 1; }

}  // namespace

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

}  // namespace GATED_CUDA_NS
}  // namespace gated_ops

// The backward on CUDA: the gradients of pathway_matmul with respect to Z, x, the weights, the
// biases and the gate. The skinny weight- and bias-gradient kernels are the fused SGD's
// (cuda/sgd.cu), launched without the update. cuda/common.cuh states the rules every launcher
// keeps.
#include "cuda/common.cuh"

namespace gated_ops {
namespace GATED_CUDA_NS {
namespace {

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

}  // namespace

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
    launch_weight_grad<scalar_t>(p, dz, x, gw, Do);
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
    launch_bias_grad<scalar_t>(p, dz, gb, B, Do);
  });
  return gb;
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

}  // namespace GATED_CUDA_NS
}  // namespace gated_ops

// The forward on CUDA: pathway_matmul (the skinny Z tiles with the fused epilogue, or cuBLAS and
// an epilogue kernel). cuda/common.cuh states the rules every launcher keeps.
#include "cuda/common.cuh"

namespace gated_ops {
namespace GATED_CUDA_NS {

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
//
// (ZTileArgs is outside the anonymous namespace: launch_ztile, which the gate gradient calls
// from cuda/matmul_backward.cu, holds one.)
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

namespace {

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

}  // namespace

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
#define GATED_INSTANTIATE(scalar_t)                                                             \
  template void launch_ztile<scalar_t>(const Plan&, const Tensor&, const Tensor&, const Tensor&, \
                                       const Tensor&, Tensor*, const Tensor&, bool);
GATED_FOR_EACH_DTYPE(GATED_INSTANTIATE)
#undef GATED_INSTANTIATE

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

}  // namespace GATED_CUDA_NS
}  // namespace gated_ops

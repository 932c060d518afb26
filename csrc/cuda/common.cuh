// Shared by the CUDA kernels (cuda/matmul_forward.cu, cuda/matmul_backward.cu, cuda/sgd.cu,
// cuda/cross_entropy.cu, cuda/routed.cu; registered in cuda/registration.cu): the launch macros,
// the policy constants, the device helpers, and the launchers one file lends another. Float32,
// float64, and bf16 / fp16 with fp32 accumulation.
//
// The math of every op is gated_ops/reference.py; the exact semantics are the CPU kernels of
// cpu/*.cpp; the plan layout is gated_ops/plan.py. Rules kept by every launcher:
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
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "gated_ops.h"
#include "kernel_choice.h"
#include "routed.h"

#ifdef GATED_OPS_CUDA_EMU
// The host compiler builds these sources with the CUDA execution model emulated on the CPU
// (cuda_emu/cuda_emu.h, whose top comment says what they may use; gated_ops._cuda_emu, a
// testing backend): these same kernels and launchers, registered for CPU tensors under
// torch.ops.gated_ops_cudaemu, in a namespace of their own (a library loaded beside _C).
#include "cuda_emu/cuda_emu.h"
#define GATED_CUDA_NS cuda_emu
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
// Every launch is GATED_LAUNCH(kernel, grid, block)(args): no dynamic shared memory, the
// current stream.
#define GATED_LAUNCH(kernel, grid, block) \
  kernel<<<(grid), (block), 0, at::cuda::getCurrentCUDAStream()>>>
#define GATED_OPS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(gated_ops, CUDA, m)
#define GATED_KERNEL_DEVICE at::kCUDA
#define GATED_CUDA_NS cuda
#endif

#define GATED_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
// M(scalar_t) for each dtype the kernels take (explicit instantiations of a launcher template
// that another file calls).
#define GATED_FOR_EACH_DTYPE(M) M(float) M(double) M(at::Half) M(at::BFloat16)

namespace gated_ops {
namespace GATED_CUDA_NS {

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

// L2 prefetch of the 128-byte lines holding [p, p + bytes), one line per lane in turn: a hint
// (no register stays live, nothing waits for it), so that the loads that follow find their
// lines in L2 instead of paying a DRAM round trip each. Off by default until measured on a GPU:
// cuda_prefetch (kernel_choice.h) turns it on for the skinny forward and the fused SGD
// (prefetch_on).
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

// Whether the skinny forward and the fused SGD prefetch (prefetch_l2): read at each launch, so a
// captured graph keeps the value it saw.
inline bool prefetch_on() { return forced_kernel(KernelChoice::kCudaPrefetch) == 1; }

// ---------------------------------------------------------------------------------------------
// The plan as raw device pointers (pointer arithmetic on the host, no value read).
inline Plan dev_plan(const Tensor& paths, const Tensor& csr, at::IntArrayRef layout, int64_t S,
                     int64_t M, const Tensor& ref) {
  TORCH_CHECK(paths.device().type() == GATED_KERNEL_DEVICE &&
                  csr.device().type() == GATED_KERNEL_DEVICE,
              "paths, csr (plan): expected CUDA tensors like the data; move the plan with "
              "plan.to(x.device)");
  return make_plan_view(paths, csr, layout, S, M, ref);
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

inline int64_t flat_blocks(int64_t n, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, int64_t(1) << 22));
}

// ---------------------------------------------------------------------------------------------
// Input checks: the shared ones are in checks.h and plan.h; the dtypes these kernels support:
inline void check_cuda_dtype(const Tensor& t, const char* name) {
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

// Warps per block for a tile of `rows` rows at kRowsPerWarp per warp (at least 1, at most 8).
inline int warps_for(int64_t rows) {
  return (int)std::max<int64_t>(1, std::min<int64_t>(kMaxWarps, (rows + kRowsPerWarp - 1) /
                                                                    kRowsPerWarp));
}

// Z via cuBLAS (blocked layout only).
inline Tensor cublas_z(const Plan& p, const Tensor& x, const Tensor& w) {
  const NoAutocast no_autocast;
  return at::bmm(x_blocks(p, x), w_blocks(p, w).transpose(1, 2))
      .view({p.z_rows(x.size(1)), p.z_cols(w.size(1))});
}

// ---------------------------------------------------------------------------------------------
// Launchers one file lends another (explicitly instantiated for GATED_FOR_EACH_DTYPE there).

// cuda/matmul_forward.cu: the skinny Z tiles (ztile_kernel): fused forward into *y (and the Z
// scratch for summing destinations), or all of Z (y null, fused false: the gate gradient).
template <typename scalar_t>
void launch_ztile(const Plan& p, const Tensor& x, const Tensor& w, const Tensor& bias,
                  const Tensor& gate, Tensor* y, const Tensor& z, bool fused);

// cuda/sgd.cu: the fused SGD's kernels without the update: the skinny weight gradient into out
// (M, D_out, D_in), and the bias gradient into gb (M, D_out) (B rows per pathway in dZ).
template <typename scalar_t>
void launch_weight_grad(const Plan& p, const Tensor& dz, const Tensor& x, const Tensor& out,
                        int64_t Do);
template <typename scalar_t>
void launch_bias_grad(const Plan& p, const Tensor& dz, const Tensor& gb, int64_t B, int64_t Do);

// ---------------------------------------------------------------------------------------------
// The ops' CUDA kernels, one file per op family (registered in cuda/registration.cu).

// cuda/matmul_forward.cu
Tensor pathway_matmul_cuda(const Tensor& x, const Tensor& weight,
                           const c10::optional<Tensor>& bias, const c10::optional<Tensor>& gate,
                           const Tensor& paths, const Tensor& csr, at::IntArrayRef layout);

// cuda/matmul_backward.cu
Tensor pathway_grad_z_cuda(const Tensor& grad_y, const c10::optional<Tensor>& gate,
                           const Tensor& paths, const Tensor& csr, at::IntArrayRef layout,
                           int64_t num_sources, int64_t num_weights);
Tensor pathway_grad_x_cuda(const Tensor& grad_z, const Tensor& weight, const Tensor& paths,
                           const Tensor& csr, at::IntArrayRef layout, int64_t num_sources,
                           int64_t batch);
Tensor pathway_grad_weight_cuda(const Tensor& grad_z, const Tensor& x, const Tensor& paths,
                                const Tensor& csr, at::IntArrayRef layout, int64_t num_weights,
                                int64_t d_out);
Tensor pathway_grad_bias_cuda(const Tensor& grad_z, const Tensor& paths, const Tensor& csr,
                              at::IntArrayRef layout, int64_t num_sources, int64_t num_weights,
                              int64_t d_out);
Tensor pathway_grad_gate_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                              const c10::optional<Tensor>& bias, const Tensor& gate,
                              const Tensor& paths, const Tensor& csr, at::IntArrayRef layout);

// cuda/sgd.cu
void pathway_sgd_cuda(const Tensor& grad_z, const Tensor& x, const Tensor& weight,
                      const c10::optional<Tensor>& momentum_buffer, const Tensor& paths,
                      const Tensor& csr, at::IntArrayRef layout, double lr, double momentum,
                      double weight_decay, bool nesterov, int64_t rounding_seed,
                      const c10::optional<Tensor>& rounding_step,
                      const c10::optional<Tensor>& bias, const c10::optional<Tensor>& bias_buf,
                      int64_t bias_rounding_seed);
Tensor pathway_sgd_lookahead_cuda(const Tensor& grad_z, const Tensor& x, const Tensor& weight,
                                  const c10::optional<Tensor>& momentum_buffer,
                                  const Tensor& paths, const Tensor& csr, at::IntArrayRef layout,
                                  double lr, double momentum, double weight_decay, bool nesterov,
                                  int64_t rounding_seed, const Tensor& x_next,
                                  const c10::optional<Tensor>& rounding_step,
                                  const c10::optional<Tensor>& bias,
                                  const c10::optional<Tensor>& bias_buf,
                                  int64_t bias_rounding_seed);
void pathway_bias_sgd_cuda(const Tensor& grad_z, const Tensor& bias,
                           const c10::optional<Tensor>& momentum_buffer, const Tensor& paths,
                           const Tensor& csr, at::IntArrayRef layout, int64_t num_sources,
                           int64_t num_weights, double lr, double momentum, double weight_decay,
                           bool nesterov, int64_t rounding_seed,
                           const c10::optional<Tensor>& rounding_step);

// cuda/cross_entropy.cu
std::tuple<Tensor, Tensor, Tensor, Tensor> gated_cross_entropy_cuda(const Tensor& logits,
                                                                    const Tensor& target,
                                                                    const Tensor& gate);
Tensor gated_cross_entropy_backward_cuda(const c10::optional<Tensor>& grad_loss,
                                         const c10::optional<Tensor>& grad_path_loss,
                                         const Tensor& logits, const Tensor& target,
                                         const Tensor& gate, const Tensor& lse);

// cuda/routed.cu (routed.h states the route table)
Tensor pathway_route_cuda(const Tensor& idx, const Tensor& paths, int64_t num_weights);
std::tuple<Tensor, Tensor> routed_matmul_cuda(const Tensor& x, const Tensor& weight,
                                              const c10::optional<Tensor>& bias,
                                              const c10::optional<Tensor>& gate,
                                              const Tensor& idx, const Tensor& route,
                                              const Tensor& paths, int64_t num_dst,
                                              bool grouped_in, bool grouped_out);
Tensor routed_grad_z_cuda(const Tensor& grad_y, const c10::optional<Tensor>& gate,
                          const Tensor& idx, const Tensor& route, const Tensor& paths,
                          bool grouped_out);
Tensor routed_grad_x_cuda(const Tensor& grad_z, const Tensor& weight, const Tensor& idx,
                          const Tensor& route, const Tensor& paths, int64_t num_sources,
                          bool grouped_in);
Tensor routed_grad_weight_cuda(const Tensor& grad_z, const Tensor& x, const Tensor& idx,
                               const Tensor& route, const Tensor& paths, int64_t num_weights,
                               bool grouped_in);
Tensor routed_grad_bias_cuda(const Tensor& grad_z, const Tensor& route, int64_t num_weights);
Tensor routed_grad_gate_cuda(const Tensor& grad_y, const Tensor& z, const Tensor& idx,
                             const Tensor& route, const Tensor& paths);

}  // namespace GATED_CUDA_NS
}  // namespace gated_ops

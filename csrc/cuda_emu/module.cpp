// gated_ops._cuda_emu: the CUDA kernels (csrc/cuda/*.cu) compiled by the host compiler with the
// CUDA execution model emulated on the CPU (cuda_emu.h, whose top comment holds the rules the
// CUDA sources keep for it), their launchers registered for CPU tensors as
// torch.ops.gated_ops_cudaemu.* with the schemas of torch.ops.gated_ops.*. A testing backend
// (gated_ops/cuda_emu.py, backend="cuda_emu"): it runs the CUDA kernels' own code, slowly, where
// there is no GPU. Built when GATED_OPS_CUDA_EMU=1 (setup.py).
#include <Python.h>

#define GATED_OPS_CUDA_EMU 1
// Every CUDA source, in one translation unit (setup.py builds csrc/cuda/*.cu for _C).
#include "../cuda/matmul_forward.cu"
#include "../cuda/matmul_backward.cu"
#include "../cuda/sgd.cu"
#include "../cuda/cross_entropy.cu"
#include "../cuda/routed.cu"
#include "../cuda/registration.cu"
// This library's own kernel choices (the hook _force_kernel in its namespace: kernel_choice.h).
#include "../kernel_choice.cpp"

// ---------------------------------------------------------------------------------------------
// The emulator's own test kernels (tests/test_cuda_emu.py): what it must compute, and the misuse
// it must refuse.
namespace emu_selftest {

// out[block] = sum over the block's 256 threads of (block * 1000 + thread): shuffles inside each
// of the 8 warps, then shared memory across warps behind a barrier, then thread 0.
__global__ void block_sum_kernel(int64_t* out) {
  __shared__ int64_t warp_sums[8];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t v = int64_t(blockIdx.x) * 1000 + threadIdx.x;
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < 8; ++w) total += warp_sums[w];
    out[blockIdx.x] = total;
  }
}

// Lane 0 waits at __syncthreads while lanes 1..31 wait for it at a full-mask shuffle: neither can
// go on (undefined on a GPU, a deadlock here).
__global__ void divergent_barrier_kernel(int64_t* out) {
  int64_t v = threadIdx.x;
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// Lanes 16..31 leave before the full-mask shuffle of lanes 0..15: undefined on a GPU.
__global__ void exited_lanes_kernel(int64_t* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int64_t(threadIdx.x), 1);
}

// Thread 5 of block 1 fails a device-side assert.
__global__ void assert_kernel(int64_t* out) {
  CUDA_KERNEL_ASSERT(!(blockIdx.x == 1 && threadIdx.x == 5) && "planted failure");
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

at::Tensor run(int64_t which) {
  at::Tensor out = at::zeros({4096}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  switch (which) {
    case 0: GATED_LAUNCH(block_sum_kernel, 3, 256)(o); return out.narrow(0, 0, 3);
    case 1: GATED_LAUNCH(divergent_barrier_kernel, 1, 64)(o); return out;
    case 2: GATED_LAUNCH(exited_lanes_kernel, 1, 32)(o); return out;
    case 3: GATED_LAUNCH(assert_kernel, 2, 64)(o); return out;
  }
  TORCH_CHECK(false, "_emulator_selftest: case 0 to 3, got ", which);
}

}  // namespace emu_selftest

TORCH_LIBRARY(gated_ops_cudaemu, m) {
  gated_ops::define_schemas(m);
  gated_ops::define_kernel_choice_hook(m);
  m.def("_emulator_selftest(int case) -> Tensor");
}

TORCH_LIBRARY_IMPL(gated_ops_cudaemu, CompositeExplicitAutograd, m) {
  m.impl("_emulator_selftest", &emu_selftest::run);
}

extern "C" {
PyObject* PyInit__cuda_emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda_emu", nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}

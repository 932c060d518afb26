// The CUDA kernels' registrations, in one place: every op's CUDA entry point (one file per op
// family, declared in cuda/common.cuh). Under the CPU emulation, the same registrations for CPU
// tensors in the namespace gated_ops_cudaemu (cuda_emu/module.cpp).
#include "cuda/common.cuh"

namespace gated_ops {
namespace GATED_CUDA_NS {

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
  m.impl("pathway_route", &pathway_route_cuda);
  m.impl("routed_matmul", &routed_matmul_cuda);
  m.impl("routed_grad_z", &routed_grad_z_cuda);
  m.impl("routed_grad_x", &routed_grad_x_cuda);
  m.impl("routed_grad_weight", &routed_grad_weight_cuda);
  m.impl("routed_grad_bias", &routed_grad_bias_cuda);
  m.impl("routed_grad_gate", &routed_grad_gate_cuda);
}

}  // namespace GATED_CUDA_NS
}  // namespace gated_ops

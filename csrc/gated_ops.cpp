// gated_ops._C: the extension module, the op schemas (declared once, gated_ops.h) and the CPU
// kernels' registrations. The kernels are one file per op family and backend: cpu/*.cpp here,
// cuda/*.cu (registered in cuda/registration.cu) when built with CUDA.
#include <Python.h>

#include <torch/library.h>

#include "cpu/common.h"
#include "gated_ops.h"

extern "C" {
// A plain module so that `import gated_ops._C` loads this library and runs the registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace gated_ops {

TORCH_LIBRARY(gated_ops, m) {
  define_schemas(m);
  define_kernel_choice_hook(m);
}

TORCH_LIBRARY_IMPL(gated_ops, CPU, m) {
  m.impl("pathway_matmul", &cpu::pathway_matmul_cpu);
  m.impl("pathway_grad_z", &cpu::pathway_grad_z_cpu);
  m.impl("pathway_grad_x", &cpu::pathway_grad_x_cpu);
  m.impl("pathway_grad_weight", &cpu::pathway_grad_weight_cpu);
  m.impl("pathway_grad_bias", &cpu::pathway_grad_bias_cpu);
  m.impl("pathway_grad_gate", &cpu::pathway_grad_gate_cpu);
  m.impl("pathway_grad_x_gate", &cpu::pathway_grad_x_gate_cpu);
  m.impl("pathway_sgd_", &cpu::pathway_sgd_cpu);
  m.impl("pathway_sgd_lookahead_", &cpu::pathway_sgd_lookahead_cpu);
  m.impl("pathway_bias_sgd_", &cpu::pathway_bias_sgd_cpu);
  m.impl("gated_cross_entropy", &cpu::gated_cross_entropy_cpu);
  m.impl("gated_cross_entropy_backward", &cpu::gated_cross_entropy_backward_cpu);
  m.impl("pathway_route", &cpu::pathway_route_cpu);
  m.impl("routed_matmul", &cpu::routed_matmul_cpu);
  m.impl("routed_grad_z", &cpu::routed_grad_z_cpu);
  m.impl("routed_grad_x", &cpu::routed_grad_x_cpu);
  m.impl("routed_grad_weight", &cpu::routed_grad_weight_cpu);
  m.impl("routed_grad_bias", &cpu::routed_grad_bias_cpu);
  m.impl("routed_grad_gate", &cpu::routed_grad_gate_cpu);
}

}  // namespace gated_ops

// The op schemas, declared once, and what holds inside every op. Every backend includes this
// header: it brings the plan view and the argument checks (plan.h, checks.h) and the rounding of
// the fused SGD (rounding.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "checks.h"
#include "kernel_choice.h"
#include "plan.h"
#include "rounding.h"

namespace gated_ops {

// The op schemas, declared once: TORCH_LIBRARY(gated_ops) in gated_ops.cpp, and the CUDA
// kernels' CPU emulation (csrc/cuda_emu/module.cpp) under its own namespace. `paths`, `csr`,
// `layout` come from gated_ops.make_plan. Last, the private hook that forces a kernel choice
// (kernel_choice.h), with its one implementation for every device: each library keeps its own
// choices.
inline void define_schemas(torch::Library& m) {
  m.def("pathway_matmul(Tensor x, Tensor weight, Tensor? bias, Tensor? gate, Tensor paths, "
        "Tensor csr, int[] layout) -> Tensor");
  m.def("pathway_grad_z(Tensor grad_y, Tensor? gate, Tensor paths, Tensor csr, int[] layout, "
        "int num_sources, int num_weights) -> Tensor");
  m.def("pathway_grad_x(Tensor grad_z, Tensor weight, Tensor paths, Tensor csr, int[] layout, "
        "int num_sources, int batch) -> Tensor");
  m.def("pathway_grad_weight(Tensor grad_z, Tensor x, Tensor paths, Tensor csr, int[] layout, "
        "int num_weights, int d_out) -> Tensor");
  m.def("pathway_grad_bias(Tensor grad_z, Tensor paths, Tensor csr, int[] layout, "
        "int num_sources, int num_weights, int d_out) -> Tensor");
  m.def("pathway_grad_gate(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor gate, "
        "Tensor paths, Tensor csr, int[] layout) -> Tensor");
  m.def("pathway_grad_x_gate(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor gate, "
        "Tensor paths, Tensor csr, int[] layout) -> (Tensor grad_x, Tensor grad_gate)");
  m.def("pathway_sgd_(Tensor grad_z, Tensor x, Tensor(a!) weight, Tensor(b!)? momentum_buffer, "
        "Tensor paths, Tensor csr, int[] layout, float lr, float momentum, float weight_decay, "
        "bool nesterov, int rounding_seed=-1, Tensor? rounding_step=None, "
        "Tensor(c!)? bias=None, Tensor(d!)? bias_momentum_buffer=None, "
        "int bias_rounding_seed=-1) -> ()");
  m.def("pathway_sgd_lookahead_(Tensor grad_z, Tensor x, Tensor(a!) weight, "
        "Tensor(b!)? momentum_buffer, Tensor paths, Tensor csr, int[] layout, float lr, "
        "float momentum, float weight_decay, bool nesterov, int rounding_seed, Tensor x_next, "
        "Tensor? rounding_step=None, Tensor(c!)? bias=None, "
        "Tensor(d!)? bias_momentum_buffer=None, int bias_rounding_seed=-1) -> Tensor");
  m.def("pathway_bias_sgd_(Tensor grad_z, Tensor(a!) bias, Tensor(b!)? momentum_buffer, "
        "Tensor paths, Tensor csr, int[] layout, int num_sources, int num_weights, float lr, "
        "float momentum, float weight_decay, bool nesterov, int rounding_seed=-1, "
        "Tensor? rounding_step=None) -> ()");
  m.def("gated_cross_entropy(Tensor logits, Tensor target, Tensor gate) "
        "-> (Tensor loss, Tensor path_loss, Tensor correct, Tensor lse)");
  m.def("gated_cross_entropy_backward(Tensor? grad_loss, Tensor? grad_path_loss, Tensor logits, "
        "Tensor target, Tensor gate, Tensor lse) -> Tensor");
  // The routed (sparse) form: k active pathways per sample (routed.h states the route table).
  m.def("pathway_route(Tensor idx, Tensor paths, int num_weights) -> Tensor");
  m.def("routed_matmul(Tensor x, Tensor weight, Tensor? bias, Tensor? gate, Tensor idx, "
        "Tensor route, Tensor paths, int num_dst, bool grouped_in=False, "
        "bool grouped_out=False) -> (Tensor y, Tensor z)");
  m.def("routed_grad_z(Tensor grad_y, Tensor? gate, Tensor idx, Tensor route, Tensor paths, "
        "bool grouped_out=False) -> Tensor");
  m.def("routed_grad_x(Tensor grad_z, Tensor weight, Tensor idx, Tensor route, Tensor paths, "
        "int num_sources, bool grouped_in=False) -> Tensor");
  m.def("routed_grad_weight(Tensor grad_z, Tensor x, Tensor idx, Tensor route, Tensor paths, "
        "int num_weights, bool grouped_in=False) -> Tensor");
  m.def("routed_grad_bias(Tensor grad_z, Tensor route, int num_weights) -> Tensor");
  m.def("routed_grad_gate(Tensor grad_y, Tensor z, Tensor idx, Tensor route, Tensor paths) "
        "-> Tensor");
}

// The private hook of a library with compiled kernels (gated_ops, and the emulation's namespace):
// tests force one kernel choice through it (kernel_choice.h). Not part of define_schemas, so a
// backend that reuses the schemas (Triton) does not inherit it.
inline void define_kernel_choice_hook(torch::Library& m) {
  m.def("_force_kernel(str name, int value) -> int", &force_kernel);
}

// Inside an op its ATen calls (the BLAS paths) run in the op's dtype: autocast decided the dtype
// at the op's boundary (gated_ops/ops.py: a fused-SGD layer runs in its parameters' dtype), and
// the Autocast keys, falling through our ops, would otherwise recast a nested bmm's inputs.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace gated_ops

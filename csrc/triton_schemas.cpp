// The ops of the Triton backend, torch.ops.gated_ops_triton.*: the schemas of
// torch.ops.gated_ops.* (define_schemas in gated_ops.h), declared when gated_ops._C loads, as
// csrc/cuda_emu/module.cpp declares its namespace. gated_ops/triton/ registers the Triton
// launchers as their CUDA kernels (and CPU ones, for TRITON_INTERPRET=1), with the fake kernels
// and autograd that every namespace gets (gated_ops/ops.py, register_python_parts).
#include "gated_ops.h"

TORCH_LIBRARY(gated_ops_triton, m) { gated_ops::define_schemas(m); }

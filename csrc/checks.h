// The argument checks every backend makes (CPU, CUDA, and the CUDA kernels' CPU emulation), so
// that each rejects bad input with the same words: the message names the argument as the user
// passed it and what was expected. The checks of a plan's or a loss's shapes are in plan.h.
#pragma once

#include <ATen/ATen.h>

#include "rounding.h"

namespace gated_ops {

// Names the argument as the user passed it (name), and the shape it should have had.
#define GATED_CHECK_SHAPE(name, t, ...)                                                        \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), name ": expected shape ",        \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(),
              " (the device of x / logits), got ", t.device());
}

inline void check_float(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype,
              " (the dtype of the data), got ", t.scalar_type());
}

// x (S, B, D_in), weight (M, D_out, D_in), bias (M, D_out): shapes, dtypes, devices agree.
// (Which dtypes a backend supports is checked by the backend.)
inline void check_data(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 3, "x: expected (S, B, D_in), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 3, "weight: expected (M, D_out, D_in), got shape ", weight.sizes());
  check_float(weight, "weight", x.scalar_type());
  check_same_device(weight, "weight", x);
  TORCH_CHECK(weight.size(2) == x.size(2), "weight: expected D_in = ", x.size(2),
              " (x.size(2)), got weight of shape ", weight.sizes());
  if (bias) {
    check_float(*bias, "bias", x.scalar_type());
    check_same_device(*bias, "bias", x);
    GATED_CHECK_SHAPE("bias", *bias, weight.size(0), weight.size(1));
  }
}

// `ref` carries the dtype and device the gate must have; B is the batch size.
inline void check_gate(const c10::optional<at::Tensor>& gate, const at::Tensor& ref, int64_t P,
                       int64_t B) {
  if (!gate) return;
  check_float(*gate, "gate", ref.scalar_type());
  check_same_device(*gate, "gate", ref);
  TORCH_CHECK((gate->dim() == 1 && gate->size(0) == P) ||
                  (gate->dim() == 2 && gate->size(0) == P && gate->size(1) == B),
              "gate: expected (P,) or (P, B) = (", P, ",) or (", P, ", ", B, "), got shape ",
              gate->sizes());
}

// A fused SGD step's parameter (name: "weight" or "bias") and momentum buffer: the data's dtype
// and device, contiguous (updated in place through raw pointers), and a buffer exactly when
// momentum != 0, laid out like the parameter.
inline void check_sgd_state(const at::Tensor& param, const char* name,
                            const c10::optional<at::Tensor>& buf, double momentum,
                            const at::Tensor& ref) {
  check_float(param, name, ref.scalar_type());
  check_same_device(param, name, ref);
  TORCH_CHECK(param.is_contiguous(), name, ": the fused SGD update needs a contiguous ", name);
  TORCH_CHECK((momentum != 0) == buf.has_value(),
              "momentum_buffer: expected a buffer exactly when momentum != 0");
  if (buf) {
    TORCH_CHECK(buf->sizes() == param.sizes() && buf->is_contiguous() &&
                    buf->scalar_type() == param.scalar_type(),
                "momentum_buffer: expected a contiguous tensor like ", name, " ", param.sizes(),
                ", got ", buf->sizes());
    check_same_device(*buf, "momentum_buffer", ref);
  }
}

// x_next (S, B', D_in) of a lookahead step: like x but for its batch size.
inline void check_x_next(const at::Tensor& x_next, const at::Tensor& x) {
  TORCH_CHECK(x_next.dim() == 3 && x_next.size(0) == x.size(0) && x_next.size(2) == x.size(2),
              "x_next: expected (S, B_next, D_in) with S = ", x.size(0), ", D_in = ", x.size(2),
              " (those of x), got shape ", x_next.sizes());
  TORCH_CHECK(x_next.scalar_type() == x.scalar_type(), "x_next: expected dtype ",
              x.scalar_type(), " (x's), got ", x_next.scalar_type());
  check_same_device(x_next, "x_next", x);
}

// bias (M, D_out) of a fused bias step.
inline void check_bias_sgd(const at::Tensor& bias, int64_t num_weights) {
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == num_weights, "bias: expected (M, D_out) with M = ",
              num_weights, " weights, got shape ", bias.sizes());
}

// The bias a weight update also steps (pathway_sgd_'s bias, bias_momentum_buffer): (M, D_out)
// like the weight's rows, its buffer as check_sgd_state asks. Checked before either is touched.
inline void check_layer_bias(const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& bias_buf, const at::Tensor& weight,
                             double momentum, int64_t bias_rounding_seed,
                             const c10::optional<at::Tensor>& rounding_step,
                             const at::Tensor& ref) {
  if (!bias) {
    TORCH_CHECK(!bias_buf, "bias_momentum_buffer: given without a bias");
    return;
  }
  TORCH_CHECK(bias->dim() == 2 && bias->size(0) == weight.size(0) &&
                  bias->size(1) == weight.size(1),
              "bias: expected (M, D_out) = (", weight.size(0), ", ", weight.size(1),
              ") like the weight's rows, got shape ", bias->sizes());
  check_sgd_state(*bias, "bias", bias_buf, momentum, ref);
  rounding_for(bias_rounding_seed, rounding_step, *bias, "biases");  // (its checks)
}

}  // namespace gated_ops

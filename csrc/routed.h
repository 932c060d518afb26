// The routed (sparse) form of the pathway matmul, shared by every backend: the route table's
// layout and the argument checks. The math is gated_ops/reference.py (routed_pathway_matmul_ref);
// docs/design.md ("Sparse routing") states the layout and the determinism rules.
//
// Per sample b, k slots: slot s = b * k + j names pathway idx[b, j] of the plan (-1: unused) with
// gate[b, j]. The result equals the dense op with the (P, B) gate that is gate[b, j] at pathway
// idx[b, j] and 0 elsewhere. A route table (int64, 2N + M + 1 entries for N = B k slots and M
// weights) groups the slots by their pathway's weight once per call:
//   order[r], r < N   the slot at sorted position r: valid slots by weight, stably (slot order
//                     within a weight), then the unused slots in slot order;
//   pos[s], s < N     the sorted position of slot s (order's inverse);
//   offsets[m], m <= M  where weight m's group starts; offsets[M] = the number of valid slots.
// A "grouped" activation has one row per sorted position (N rows: the valid ones first, in the
// weights' groups, then zero rows), the layout between the two layers of an expert MLP.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace gated_ops {

// Read-only view of a route table: pointers on its device.
struct RouteView {
  int64_t N = 0, M = 0;
  const int64_t *order = nullptr, *pos = nullptr, *offsets = nullptr;
};

inline RouteView route_view(const at::Tensor& route, int64_t N, int64_t M, const at::Tensor& ref) {
  TORCH_CHECK(route.scalar_type() == at::kLong && route.dim() == 1 && route.is_contiguous(),
              "route: expected a contiguous 1-D int64 route table (gated_ops.make_route), got ",
              route.scalar_type(), " of shape ", route.sizes());
  TORCH_CHECK(route.numel() == 2 * N + M + 1, "route: expected ", 2 * N + M + 1,
              " entries for N = ", N, " slots and M = ", M, " weights (a table made for other "
              "sizes?), got ", route.numel());
  check_same_device(route, "route", ref);
  RouteView r;
  r.N = N;
  r.M = M;
  const int64_t* t = route.data_ptr<int64_t>();
  r.order = t;
  r.pos = t + N;
  r.offsets = t + 2 * N;
  return r;
}

// idx (B, k) int64 on ref's device; paths (5, P) int64 (the plan's table).
inline void check_route_idx(const at::Tensor& idx, const at::Tensor& paths, const at::Tensor& ref) {
  TORCH_CHECK(idx.dim() == 2 && idx.scalar_type() == at::kLong,
              "idx: expected (B, k) int64 pathway indices, got ", idx.scalar_type(), " of shape ",
              idx.sizes());
  check_same_device(idx, "idx", ref);
  TORCH_CHECK(paths.scalar_type() == at::kLong && paths.dim() == 2 && paths.size(0) == 5 &&
                  paths.is_contiguous(),
              "paths: expected the plan's contiguous (5, P) int64 table, got ", paths.sizes());
  check_same_device(paths, "paths (plan)", ref);
}

// The data of routed_matmul: x (S, B, D_in), or grouped (N, D_in); weight (M, D_out, D_in);
// bias (M, D_out); gate (B, k) or None, never with a grouped output.
inline void check_routed_data(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& gate, const at::Tensor& idx,
                              bool grouped_in, bool grouped_out) {
  const int64_t B = idx.size(0), k = idx.size(1);
  if (grouped_in) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == B * k, "x: expected grouped rows (N, D_in) with "
                "N = B * k = ", B * k, " (idx's slots), got shape ", x.sizes());
  } else {
    TORCH_CHECK(x.dim() == 3 && x.size(1) == B, "x: expected (S, B, D_in) with B = ", B,
                " (idx.size(0)), got shape ", x.sizes());
  }
  TORCH_CHECK(weight.dim() == 3, "weight: expected (M, D_out, D_in), got shape ", weight.sizes());
  check_float(weight, "weight", x.scalar_type());
  check_same_device(weight, "weight", x);
  TORCH_CHECK(weight.size(2) == x.size(-1), "weight: expected D_in = ", x.size(-1),
              " (x's last dimension), got weight of shape ", weight.sizes());
  if (bias) {
    check_float(*bias, "bias", x.scalar_type());
    check_same_device(*bias, "bias", x);
    GATED_CHECK_SHAPE("bias", *bias, weight.size(0), weight.size(1));
  }
  if (gate) {
    TORCH_CHECK(!grouped_out, "gate: a grouped output takes no gate (the gate scales the "
                "combined output; pass it to the layer that combines)");
    check_float(*gate, "gate", x.scalar_type());
    check_same_device(*gate, "gate", x);
    GATED_CHECK_SHAPE("gate", *gate, B, k);
  }
}

}  // namespace gated_ops

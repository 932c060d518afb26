"""Explicit byte and FLOP counts of the benchmarked computations, for GB/s, TFLOP/s and the floor.

Every count is of the *ideal* algorithm for the computation, not of what any provider does: the
floor (max(bytes / peak bandwidth, flops / peak FLOP rate)) is then one number per shape and mode
that every provider is measured against. Conventions:

* fp32 data: 4 bytes per element; int64 targets: 8 bytes.
* A GEMM (m, k) x (k, n) is 2*m*k*n FLOPs; elementwise work is counted where it is not negligible.
* Bytes = compulsory DRAM traffic when nothing of size O(weights) stays in cache between the
  phases of a step (true for the paper shapes: the MNIST encoders are 40 MB at H=128 and 321 MB at
  H=1024, far above any last-level cache). Small tensors (biases, gates) are counted once.
* A k-path step is forward, then backward, then the update: the loss needs every logit before any
  gradient exists, so the weights are read twice per step: once by the forward, once more by the
  fused update, which also reads the momenta and writes both back. Minimum weight traffic of a
  step is therefore 5 passes over (weights + biases): fwd read + update read/write of W and buf.
  Unfused autograd + torch.optim.SGD needs ~8 (grad written by backward and read by the optimizer,
  which reads W and buf and writes both): the floor does not charge that to anybody.

Symbols (docs/math.md section 3): R replicas, K transformations, B batch, D input size, H hidden width,
C classes. MoE: E experts, B tokens, Di -> Do.
"""
from __future__ import annotations

from dataclasses import dataclass

F32 = 4  # bytes per fp32 element
I64 = 8  # bytes per int64 element


@dataclass(frozen=True)
class Counts:
    """Compulsory traffic and arithmetic of one timed call."""

    bytes: float
    flops: float

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.bytes + other.bytes, self.flops + other.flops)


# ------------------------------------------------------------------------------------------------
# k-path network: K encoders D -> H, one shared hidden H -> H, K decoders H -> C, R replicas.
def kpath_params(R: int, K: int, D: int, H: int, C: int) -> int:
    """Number of learned scalars (weights + biases) of R k-path networks."""
    encoders = R * K * (H * D + H)
    hidden = R * (H * H + H)
    decoders = R * K * (C * H + C)
    return encoders + hidden + decoders


def kpath_gemm_flops(R: int, K: int, B: int, D: int, H: int, C: int) -> int:
    """FLOPs of the three forward GEMMs. Each of the R*K encoders sees its B transformed samples;
    the hidden layer maps all R*K*B hidden rows; every hidden row goes through all K decoders."""
    encoders = 2 * R * K * B * D * H
    hidden = 2 * R * K * B * H * H
    decoders = 2 * R * K * B * H * (K * C)
    return encoders + hidden + decoders


def kpath_logits(R: int, K: int, B: int, C: int) -> int:
    """Elements of the logits (R, K*K, B, C): one C-vector per replica, path and sample."""
    return R * K * K * B * C


def kpath_forward(R: int, K: int, B: int, D: int, H: int, C: int, elem: int = F32) -> Counts:
    """Forward + gated loss, no grad, from the transformed inputs xk (R*K, B, D)."""
    logits = kpath_logits(R, K, B, C)
    elems = (
        kpath_params(R, K, D, H, C)  # every weight read once
        + R * K * B * D  # xk read once by the encoders
        + 2 * 2 * R * K * B * H  # h1, h2: each written once and read once
        + 2 * logits  # logits written by the decoders, read by the loss
        + R * K * K  # gate
    )
    loss_out = R * K * K * (elem + I64)  # path_loss, correct
    nbytes = elem * elems + I64 * R * K * K * B + loss_out  # + int64 targets
    # log-sum-exp per logit row: max, subtract, exp, sum (~4 FLOPs per logit) + argmax
    flops = kpath_gemm_flops(R, K, B, D, H, C) + 5 * logits
    return Counts(nbytes, flops)


def kpath_backward(R: int, K: int, B: int, D: int, H: int, C: int, elem: int = F32) -> Counts:
    """Autograd backward of a prepared forward, gradients written (not applied).

    Loss backward reads the logits and writes dlogits; each layer reads its grad_z and its saved
    input and writes its weight gradient; the hidden and decoder layers also read their weights
    and write the gradient of their input (the encoders' input xk needs none).
    """
    logits = kpath_logits(R, K, B, C)
    params = kpath_params(R, K, D, H, C)
    small_weights = R * (H * H + H) + R * K * (C * H + C)  # hidden + decoders, read for grad_x
    elems = (
        2 * logits  # logits read, dlogits written
        + logits  # dlogits read by the decoder backward
        + params  # every weight gradient written once
        + small_weights
        + R * K * B * D  # xk read for the encoder weight gradient
        + 2 * R * K * B * H  # h1, h2 read for the weight gradients
        + 2 * 2 * R * K * B * H  # dh2, dh1 written and read
    )
    nbytes = elem * elems + I64 * R * K * K * B
    gemm = kpath_gemm_flops(R, K, B, D, H, C)  # weight gradients: the same GEMMs transposed
    grad_inputs = 2 * R * K * B * (H * H + H * K * C)  # dh2, dh1 (no dx for the encoders)
    flops = gemm + grad_inputs + 4 * logits  # softmax - onehot, scaled
    return Counts(nbytes, flops)


def kpath_transform(R: int, K: int, B: int, D: int, elem: int = F32) -> Counts:
    """Input transformation on device: read the batch (R, B, D), write xk (R*K, B, D)."""
    return Counts(elem * (R * B * D + R * K * B * D), 0)


def kpath_step(R: int, K: int, B: int, D: int, H: int, C: int, elem: int = F32) -> Counts:
    """Full SGD step (momentum): transform, forward, fused loss, backward, update.

    The backward's gradient write (one pass over the parameters) is replaced by the fused update:
    read W and buf, write W and buf (4 passes); with the forward's read that is 5 passes.
    """
    params = kpath_params(R, K, D, H, C)
    bwd = kpath_backward(R, K, B, D, H, C, elem)
    bwd_no_grad_write = Counts(bwd.bytes - elem * params, bwd.flops)
    update = Counts(elem * 4 * params, 4 * params)  # buf = m*buf + g; w -= lr*buf: 4 FLOPs
    return (kpath_transform(R, K, B, D, elem) + kpath_forward(R, K, B, D, H, C, elem)
            + bwd_no_grad_write + update)


def kpath(mode: str, R: int, K: int, B: int, D: int, H: int, C: int, elem: int = F32) -> Counts:
    """Counts of one timed call of ``mode`` (forward | backward | step); ``elem``: bytes per
    weight, activation and logit (4: float32; 2: bfloat16 storage, the floors halve)."""
    if mode == "forward":
        return kpath_forward(R, K, B, D, H, C, elem)
    if mode == "backward":
        return kpath_backward(R, K, B, D, H, C, elem)
    if mode == "step":
        return kpath_step(R, K, B, D, H, C, elem)
    raise ValueError(f"mode: expected forward, backward or step, got {mode!r}")


# ------------------------------------------------------------------------------------------------
# Mixture-of-experts layer: y[b] = sum_e gate[e, b] * (x[b] W_e^T + bias_e), dense (every token
# through every expert, unrouted tokens with gate 0), gradients for x, W, bias and the gate.
def moe_forward(E: int, B: int, Di: int, Do: int) -> Counts:
    """Read x, the weights and the gate once, write y; Z_e = x W_e^T stays on chip."""
    elems = B * Di + E * (Do * Di + Do) + E * B + B * Do
    flops = 2 * E * B * Di * Do + 2 * E * B * Do  # GEMMs + gate multiply-add
    return Counts(F32 * elems, flops)


def moe_backward(E: int, B: int, Di: int, Do: int) -> Counts:
    """grad_x = sum_e gate_e (gy W_e); grad_W_e = (gate_e gy)^T x; grad_gate[e, b] =
    <(gy W_e)[b], x[b]> + <gy[b], bias_e>: the product gy W_e serves both grad_x and grad_gate,
    so no Z is recomputed or saved. Reads gy, x, W, gate; writes grad_x, grad_W, grad_bias,
    grad_gate."""
    elems = (B * Do + B * Di + E * Do * Di + E * B  # reads
             + B * Di + E * (Do * Di + Do) + E * B)  # writes
    flops = 4 * E * B * Di * Do + 2 * E * B * Di + 2 * E * B * Do
    return Counts(F32 * elems, flops)


def moe(mode: str, E: int, B: int, Di: int, Do: int) -> Counts:
    """Counts of one timed call of ``mode`` (forward | backward | full = forward + backward)."""
    if mode == "forward":
        return moe_forward(E, B, Di, Do)
    if mode == "backward":
        return moe_backward(E, B, Di, Do)
    if mode == "full":
        return moe_forward(E, B, Di, Do) + moe_backward(E, B, Di, Do)
    raise ValueError(f"mode: expected forward, backward or full, got {mode!r}")


def floor_seconds(c: Counts, peak_bytes_per_s: float, peak_flops_per_s: float) -> float:
    """The roofline floor: the slower of moving the bytes and doing the FLOPs at measured peaks."""
    return max(c.bytes / peak_bytes_per_s, c.flops / peak_flops_per_s)


def routed(mode: str, T: int, D: int, E: int, k: int, elem: int = F32) -> Counts:
    """One routed expert layer (D -> D, top-k of E): the active work only. FLOPs: the T k
    (token, expert) GEMM rows, forward 2 T k D^2, backward 4 T k D^2 (grad_x, grad_W) and the
    gate multiply / dot products. Bytes: x, y and the experts a token chose (at most
    min(E, T k) of them), read once; backward reads gy, x, those weights and writes grad_x,
    their gradients and the routing weights' gradients."""
    used = min(E, T * k)
    w = used * (D * D + D)
    fwd = Counts(elem * (T * D + w + 2 * T * k + T * D), 2 * T * k * D * D + 2 * T * k * D)
    bwd = Counts(elem * (T * D + T * D + w + 2 * T * k + T * D + w + T * k),
                 4 * T * k * D * D + 4 * T * k * D)
    if mode == "forward":
        return fwd
    if mode == "full":
        return fwd + bwd
    raise ValueError(f"mode: expected forward or full, got {mode!r}")


def gdln_routing(mode: str, M: int, K: int, H: int, D: int, items: int) -> Counts:
    """A routing network step (forward + backward) on its active pathways: every sample (one of
    the K M trained contexts x ``items``) goes through one input module (D -> H), the hidden
    layer (H -> H) and one output module (H -> D); weights read once, activations of the active
    nodes only."""
    B = K * M * items
    flops = 3 * 2 * B * (D * H + H * H + H * D)
    weights = M * D * H + H * H + M * H * D
    elems = 3 * weights + 2 * B * (D + H + H + D)
    return Counts(F32 * elems, flops)

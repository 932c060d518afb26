"""The kernels a GPU would launch for one fused k-path training step, listed without a GPU.

On a CUDA graph a step costs at least its kernel count times a node's launch and drain time
(about 2-4 us on an H100), so at the paper's small sizes (K=100, H=128: a 0.08 ms bandwidth
floor) the count matters as much as the kernels' speed. This script runs one step of KPathNet
on the CUDA kernels emulated on the CPU (gated_ops.cuda_emu: every ``GATED_LAUNCH`` is a
profiler event) and lists, in order, the emulated launches and the ATen operations that launch
a kernel on a GPU (the cuBLAS GEMMs of the shared layers, elementwise ops, fills, copies).
It measures no time (gated_ops.testing.kernel_census does the listing). Tiny shapes by default (the emulation is slow); the kernel count does not
depend on them, except through the shape thresholds of the launchers (e.g. the forward takes
cuBLAS for a shared weight once ns * B > 64, hence K * B = 80 here).

    python benchmarks/kernel_census.py                       # the eager fused step
    python benchmarks/kernel_census.py --lookahead           # the captured step's lookahead form
    python benchmarks/kernel_census.py --json census.json    # also write the list
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from gated_ops import SGDConfig
from experiments.kpath_net import KPathNet, kpath_gate, transform_batch
from gated_ops.testing import kernel_census

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--D", type=int, default=32)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--C", type=int, default=10)
    ap.add_argument("--R", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lookahead", action="store_true",
                    help="the static lookahead step (KPathNet.loss(..., lookahead=)), as captured")
    ap.add_argument("--json", default=None, help="write the list here")
    a = ap.parse_args()
    from gated_ops import cuda_emu  # noqa: F401  (raises with the build command if not built)

    torch.manual_seed(0)
    dt = getattr(torch, a.dtype)
    net = KPathNet(a.K, a.D, a.H, a.C, replicas=a.R, dtype=dt, backend="cuda_emu")
    net.fuse_sgd(SGDConfig(lr=0.01, momentum=0.9))
    x = torch.rand(a.R, a.B, a.D).to(dt)
    y = torch.randint(0, a.C, (a.R, a.B))
    perms = torch.stack([torch.randperm(a.D) for _ in range(a.K)])
    maps = torch.stack([torch.randperm(a.C) for _ in range(a.K)])
    gate = torch.stack([kpath_gate(a.K, max(1, a.K // 2), "N_plus_mod_permute", seed=r).flatten()
                        for r in range(a.R)]).to(dt)
    enc = net.prime_lookahead(transform_batch(x, None, perms, maps)[0]) if a.lookahead else None

    def step() -> None:
        xk, target = transform_batch(x, y, perms, maps)
        if enc is None:
            net.loss(xk, target, gate)[0].sum().backward()
        else:
            xk_next = transform_batch(x, None, perms, maps)[0]
            net.loss(xk, target, gate, lookahead=(xk_next, enc))[0].sum().backward()

    step()  # warm-up: the momentum buffers' first step
    census = kernel_census(step)
    print(f"{len(census)} kernels per fused k-path step (K={a.K} B={a.B} D={a.D} H={a.H} "
          f"R={a.R} {a.dtype}{', lookahead' if a.lookahead else ''}; emulated CUDA kernels)")
    for i, (name, where) in enumerate(census):
        print(f"{i + 1:3d}  {name:72s} {where}")
    print("by kernel:", dict(Counter(n for n, _ in census).most_common()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "kernels": census}, f, indent=1)


if __name__ == "__main__":
    main()

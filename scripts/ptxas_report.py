"""Registers and spills per CUDA kernel from a build log made with nvcc --resource-usage
(GATED_OPS_PTXAS_REPORT=1 python setup.py build_ext), as scripts/cuda_build_check.sh runs it.

    python scripts/ptxas_report.py BUILD_LOG [--all]

Prints the hot kernels (forward tiles, weight gradient / fused SGD, grad_x, grad_bias, the routed
grouped GEMM and weight gradient) with their registers, the warps an SM's 64K registers then
hold, and spills; --all prints every kernel. Exits 1 if a float32 / float16 / bfloat16 kernel
spills to local memory (float64 ones are only reported): in these memory-bound loops a spill is
extra memory traffic, and it is the sign that a change raised the register count past the launch
bounds.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

HOT = ("ztile_kernel", "wgrad_kernel", "grad_x_kernel", "grad_bias_kernel", "routed_gemm_kernel",
       "routed_grad_weight_kernel")


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return out.splitlines() if len(out.splitlines()) == len(names) else names


def parse(text: str) -> list[tuple[str, int, int, int]]:
    """(kernel, registers, spill store bytes, spill load bytes) per compiled entry function."""
    rows = []
    for block in text.split("Compiling entry function")[1:]:
        name = re.search(r"'([^']+)'", block)
        regs = re.search(r"Used (\d+) registers", block)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        if name and regs and spill:
            rows.append((name.group(1), int(regs.group(1)), int(spill.group(1)),
                         int(spill.group(2))))
    names = demangle([r[0] for r in rows])
    # (csrc/cuda/*.cu's kernels are gated_ops::cuda::(anonymous namespace)::<kernel>)
    scope = r"gated_ops::(cuda::)?\(anonymous namespace\)::"
    short = [re.sub(r"\(.*$", "", re.sub(scope, "", n)).replace("void ", "") for n in names]
    return [(s, *r[1:]) for s, r in zip(short, rows)]


def warps_per_sm(regs: int) -> int:
    """Resident warps an SM's 64K registers allow (at most 64), whole blocks aside."""
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    return min(64, 65536 // per_warp)


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rows = parse(open(sys.argv[1], errors="replace").read())
    if not rows:
        print("no ptxas resource lines in the log (built without --resource-usage?)")
        return 1
    show_all = "--all" in sys.argv
    bad = []
    for name, regs, st, ld in sorted(rows):
        # (demangled "<double, ...>"; mangled, without c++filt: a first template argument "Id")
        wide = "double" in name or re.search(r"Id[EL]", name) is not None
        if (st or ld) and not wide:
            bad.append(name)
        if show_all or name.startswith(HOT) or ((st or ld) and not wide):
            print(f"  {regs:4d} regs  {warps_per_sm(regs):2d} warps/SM  spill {st}/{ld} B  {name}")
    print(f"  ({len(rows)} kernels compiled)")
    if bad:
        print(f"FAIL: {len(bad)} float32/16-bit kernels spill registers: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

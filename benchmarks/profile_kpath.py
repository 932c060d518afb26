"""Where the fused k-path step spends its time: torch.profiler over the cpu (or cuda) provider.

    .venv/bin/python benchmarks/profile_kpath.py --hidden 128 1024 --steps 10 [--threads 1]
        [--force-kernel NAME=VALUE ...]   (a kernel choice forced: gated_ops.testing.force_kernel)

For each H: wall time per step (median of the profiled steps, after warm-up), the floor of
benchmarks/flops.py at peaks measured now, and the self time of every op per step with each big
op's own memory floor (bytes it must move / measured copy bandwidth). Feeds benchmarks/NOTES.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from gated_ops.testing import force_kernel, parse_kernel_choices

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402
from conftest import measure_peaks  # noqa: E402
from providers import KPathCase, make_kpath, sync  # noqa: E402


def op_floors(case: KPathCase) -> dict[str, float]:
    """Bytes each fused op must move at least, per step (fp32), for the ops that matter."""
    R, K, B, D, H, C = case.R, case.K, case.B, case.D, case.H, case.C
    f = flops.F32
    enc_w, hid_w, dec_w = R * K * H * D, R * H * H, R * K * C * H
    logits = R * K * K * B * C
    return {
        # forward: every weight read once; the decoder also writes the logits
        "gated_ops::pathway_matmul": f * (enc_w + hid_w + dec_w + R * K * B * D + logits),
        # update: W and momentum read and written
        "gated_ops::pathway_sgd_": f * 4 * (enc_w + hid_w + dec_w) + f * R * K * B * D,
        "gated_ops::gated_cross_entropy": f * logits,
        "gated_ops::gated_cross_entropy_backward": f * 2 * logits,
        "gated_ops::pathway_grad_z": f * 2 * logits,
        "gated_ops::pathway_grad_x": f * (hid_w + dec_w + logits),
    }


def profile(H: int, steps: int, provider: str, device: torch.device, peaks: dict,
            dtype: str = "float32") -> None:
    suffix = "" if dtype == "float32" else "-bf16"
    case = KPathCase(f"mnist-K100-B8-H{H}{suffix}", "mnist", 100, 8, 784, H, dtype=dtype)
    prov = make_kpath(provider, case, "step", device)
    step, _ = prov.fns("step")
    for _ in range(3):
        step()
    sync(device)
    walls = []
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            sync(device)
            walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    elem = 2 if dtype == "bfloat16" else flops.F32
    c = flops.kpath("step", case.R, case.K, case.B, case.D, case.H, case.C, elem)
    bw = peaks["peak_gbs"] * 1e9
    fl = peaks["peak_tflops_bf16" if dtype == "bfloat16" else "peak_tflops"] * 1e12
    floor = flops.floor_seconds(c, bw, fl)
    print(f"\n## {provider} step, {case.name}: median {wall * 1e3:.1f} ms (min "
          f"{min(walls) * 1e3:.1f}) over {steps} profiled steps; floor {floor * 1e3:.1f} ms "
          f"(bytes {c.bytes / 1e6:.0f} MB -> {c.bytes / bw * 1e3:.1f} ms, FLOPs "
          f"{c.flops / 1e9:.2f} G -> {c.flops / fl * 1e3:.1f} ms); x floor {wall / floor:.1f}; "
          f"load avg {os.getloadavg()[0]:.2f}")
    floors = {k: v * elem / flops.F32 for k, v in op_floors(case).items()}
    if device.type == "cuda":  # GPU time per kernel (what bounds the step there)
        krows = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                       key=lambda e: e.self_device_time_total, reverse=True)
        ktotal = sum(e.self_device_time_total for e in krows)
        print(f"GPU busy {ktotal / 1e3 / steps:.3f} ms/step of wall {wall * 1e3:.3f} ms/step")
        print("| GPU kernel / op | calls/step | GPU ms/step | share |")
        print("|---|--:|--:|--:|")
        for e in krows[:20]:
            print(f"| {e.key[:100]} | {e.count / steps:.0f} | "
                  f"{e.self_device_time_total / 1e3 / steps:.4f} "
                  f"| {e.self_device_time_total / ktotal:.0%} |")
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    print("| op | calls/step | self ms/step | share | total ms/step | op floor ms |")
    print("|---|--:|--:|--:|--:|--:|")
    for e in rows[:14]:
        fl_ms = floors.get(e.key)
        print(f"| {e.key} | {e.count / steps:.0f} | {e.self_cpu_time_total / 1e3 / steps:.2f} "
              f"| {e.self_cpu_time_total / total:.0%} | {e.cpu_time_total / 1e3 / steps:.2f} "
              f"| {'-' if fl_ms is None else f'{fl_ms / bw * 1e3:.2f}'} |")
    # The same, split by input shapes: tells the encoder, hidden and decoder calls apart.
    by_shape = sorted(prof.key_averages(group_by_input_shape=True),
                      key=lambda e: e.cpu_time_total, reverse=True)
    print("\n| op (by input shapes) | calls/step | total ms/step | self ms/step | shapes |")
    print("|---|--:|--:|--:|---|")
    for e in by_shape:
        if not (e.key.startswith("gated_ops::") or e.key in ("aten::bmm", "aten::mm")):
            continue
        if e.cpu_time_total / steps < 0.02 * wall * 1e6:
            continue
        shapes = str(e.input_shapes)[:90]
        print(f"| {e.key} | {e.count / steps:.0f} | {e.cpu_time_total / 1e3 / steps:.2f} "
              f"| {e.self_cpu_time_total / 1e3 / steps:.2f} | {shapes} |")
    print(f"(profiled self CPU total {total / 1e3 / steps:.1f} ms/step vs wall "
          f"{wall * 1e3:.1f} ms/step: the difference is time outside ops or waiting)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "torch", "naive"))
    ap.add_argument("--device", default=None, help="device of torch / naive (default: cuda for "
                    "the cuda provider, else cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="storage of weights, momenta and activations (bfloat16: the -bf16 "
                         "benchmark cases, fp32 arithmetic)")
    ap.add_argument("--force-kernel", action="append", default=[], metavar="NAME=VALUE",
                    help="force a kernel choice the code otherwise makes itself (e.g. "
                         "cuda_prefetch=1: an A/B); repeatable")
    args = ap.parse_args()
    try:
        forced = parse_kernel_choices(args.force_kernel)
    except ValueError as e:
        ap.error(f"--force-kernel: {e}")
    if forced:
        print(f"forced kernel choices: {forced}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if args.provider == "cuda" else "cpu"))
    peaks = measure_peaks(device)
    print(f"peaks on {device}: {peaks['peak_gbs']:.1f} GB/s (read {peaks['read_gbs']:.1f}, "
          f"update {peaks['update_gbs']:.1f}, copy {peaks['copy_gbs']:.1f}), "
          f"{peaks['peak_tflops'] * 1e3:.0f} GFLOP/s fp32 mm (load avg "
          f"{peaks['load_avg_at_peak']:.2f}); threads {torch.get_num_threads()}")
    with force_kernel(**forced):
        for H in args.hidden:
            profile(H, args.steps, args.provider, device, peaks, args.dtype)


if __name__ == "__main__":
    main()

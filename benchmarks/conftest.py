"""Benchmark harness: markers, options, machine facts, measured peaks, the timing helper.

``pytest benchmarks/`` collects ``bench_*.py`` (tests and benchmarks are separate roots, so the
markers are registered here, not in pyproject.toml). See benchmarks/README.md for the commands.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import flops as flops_mod
from providers import (GDLN_PROVIDERS, PROVIDERS, ROUTED_PROVIDERS, Unavailable, provider_device,
                       sync)

MARKERS = {
    "smoke": "the tiny cases for CI: pytest benchmarks -q --benchmark-disable -m smoke",
    "tiny": "CPU cost class: K=4 B=2 D=16 H=8 (and a tiny MoE), milliseconds",
    "small": "CPU cost class: a step well under 0.1 s on 2 CPU cores",
    "medium": "CPU cost class: ~0.1-1 s per call on 2 CPU cores (H=1024, R=8)",
    "large": "CPU cost class: seconds per call or GBs of memory (B=512, R=54, big MoE): GPU runs",
    "paper": "the paper's MNIST (K=100, D=784) and CIFAR-10 (K=40, D=3072) shapes at B=8",
    "mnist": "MNIST shapes (K pixel permutations)",
    "cifar": "CIFAR-10 shapes (K rotations)",
    "large_batch": "K=100, B=512, H=128",
    "replicas": "R configurations of the K=100 H=128 model in one call",
    "moe": "mixture-of-experts layer with per-sample router gates",
    "bf16": "bfloat16 storage (reported apart from float32)",
    "routed": "a top-k routed expert layer (sparse routing: bench_routed.py)",
    "gdln": "a GDLN with context gates, dense against routed (bench_routed.py)",
    **{p: f"provider {p}" for p in (*PROVIDERS, *ROUTED_PROVIDERS, *GDLN_PROVIDERS)},
}
ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    g = parser.getgroup("gated_ops benchmarks")
    g.addoption("--bench-device", choices=("auto", "cpu", "cuda"), default="auto",
                help="device of the device-agnostic providers (naive, torch, torch_compile, "
                     "reference); auto = CUDA when present")
    g.addoption("--bench-seconds", type=float, default=2.0,
                help="target timed seconds per benchmark (rounds = seconds / warm-up time)")
    g.addoption("--bench-min-rounds", type=int, default=3)
    g.addoption("--bench-max-rounds", type=int, default=200)
    g.addoption("--bench-warmup", type=int, default=3,
                help="untimed calls before timing (compile, allocator, caches); at least 1. "
                     "torch_compile needs 3: forward/backward, then the optimizer, compile "
                     "in the first two")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch.set_num_threads for the session (default: torch's, one per core)")
    g.addoption("--force-kernel", action="append", default=[], metavar="NAME=VALUE",
                help="force a kernel choice the code otherwise makes itself, for the session "
                     "(gated_ops.testing.force_kernel; e.g. cuda_prefetch=1 for the L2-prefetch "
                     "A/B); repeatable; recorded in the results' machine_info")
    g.addoption("--bench-compile-backend", default=None,
                help="torch.compile backend of torch_compile. Default: inductor when timing; "
                     "aot_eager under --benchmark-disable (Dynamo + AOTAutograd trace the same "
                     "step in ~1 s, where Inductor's cold C++ compile takes 30-60 s)")


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    from gated_ops.testing import force_kernel, parse_kernel_choices

    try:  # a bad --force-kernel stops the run here, once, naming what it accepts
        choices = parse_kernel_choices(config.getoption("--force-kernel", []))
        with force_kernel(**choices):
            pass
    except ValueError as e:
        raise pytest.UsageError(f"--force-kernel: {e}") from None
    config._gated_ops_forced_kernels = choices
    threads = config.getoption("--bench-threads", None)
    if threads:
        torch.set_num_threads(threads)


def pytest_collect_file(file_path, parent):
    # bench_*.py files are not test_*.py; a file named on the command line is collected by
    # pytest's own Python plugin already, so only a directory walk needs this hook
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# ------------------------------------------------------------------------------------------------
# Facts about this machine and this checkout, gathered once.
def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # no /proc: fall back to what platform knows
        return platform.processor() or platform.machine()
    return platform.processor() or platform.machine()


def machine_facts() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # GATED_OPS_COMMIT: the commit of the tree when git here cannot say (a copy of a working
    # tree whose .git is another state, as on the lent GPU machines)
    commit = os.environ.get("GATED_OPS_COMMIT") or _git("rev-parse", "HEAD") or "unknown"
    import gated_ops._C as ext  # the kernels timed: their hash, since a rebuild changes them
    ext_sha = hashlib.sha256(Path(ext.__file__).read_bytes()).hexdigest()[:12]
    facts = {
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": commit,
        "dirty": (False if os.environ.get("GATED_OPS_COMMIT")
                  else bool(_git("status", "--porcelain", "--untracked-files=no"))),
        "extension_sha256": ext_sha,
    }
    return facts


def measure_peaks(device: torch.device) -> dict:
    """Measured peaks of ``device``, best of a few repetitions after a warm-up.

    Bandwidth: the fastest of three streams over a tensor far larger than any cache: a read
    (sum: 1 pass), an in-place update (add_: read + write, the fused SGD's pattern) and a copy
    (read + write counted, STREAM's convention, though write-allocate makes a CPU copy move 3
    passes). The best is the floor's bandwidth, so that no kernel can beat its floor by using a
    pattern the measurement did not. FLOP rate: an fp32 matmul, and a bf16 one (fp32
    accumulation: AMX / AVX-512 BF16 on CPUs that have them, tensor cores on GPUs) for the
    floors of the bfloat16 cases.
    """
    if device.type == "cuda":
        n, n_mm, reps = 1 << 28, 8192, 10  # 1 GiB streams; 8192^3 matmul (1.1 TFLOP)
    else:
        n, n_mm, reps = 1 << 26, 2048, 10  # 256 MiB streams (>> LLC); 17 GFLOP matmul
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(n_mm, n_mm, device=device)
    b = torch.randn(n_mm, n_mm, device=device)

    def best(fn: Callable) -> float:
        fn()
        sync(device)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return min(times)

    nbytes = 4 * n
    streams = {
        "read_gbs": nbytes / best(lambda: src.sum()) / 1e9,
        "update_gbs": 2 * nbytes / best(lambda: src.add_(1.0)) / 1e9,
        "copy_gbs": 2 * nbytes / best(lambda: dst.copy_(src)) / 1e9,
    }
    t_mm = best(lambda: torch.mm(a, b))
    a16, b16 = a.bfloat16(), b.bfloat16()
    t_mm16 = best(lambda: torch.mm(a16, b16))
    return {
        "peak_gbs": max(streams.values()),
        **streams,
        "peak_tflops": 2 * n_mm ** 3 / t_mm / 1e12,
        "peak_tflops_bf16": 2 * n_mm ** 3 / t_mm16 / 1e12,
        "peak_method": f"max of read / in-place update / copy of {nbytes >> 20} MiB fp32; "
                       f"fp32 and bf16 mm {n_mm}^3; best of {reps}",
        "load_avg_at_peak": os.getloadavg()[0],
    }


class BenchEnv:
    """Session state: options, machine facts, peaks measured lazily once per device."""

    def __init__(self, config):
        self.config = config
        self.device_choice = config.getoption("--bench-device")
        self.seconds = config.getoption("--bench-seconds")
        self.min_rounds = config.getoption("--bench-min-rounds")
        self.max_rounds = config.getoption("--bench-max-rounds")
        self.warmup = max(1, config.getoption("--bench-warmup"))
        disabled = config.getoption("benchmark_disable", False)
        self.compile_backend = config.getoption("--bench-compile-backend") or (
            "aot_eager" if disabled else "inductor")
        self.facts = machine_facts()
        self.peaks: dict[str, dict] = {}

    def device(self, provider: str) -> torch.device:
        try:
            return provider_device(provider, self.device_choice)
        except Unavailable as e:
            pytest.skip(str(e))

    def peak(self, device: torch.device) -> dict:
        if device.type not in self.peaks:
            self.peaks[device.type] = measure_peaks(device)
        return self.peaks[device.type]


@pytest.fixture(scope="session", autouse=True)
def forced_kernels(request):
    """The session's --force-kernel choices (checked in pytest_configure), in force while the
    benchmarks run."""
    from gated_ops.testing import force_kernel

    choices = request.config._gated_ops_forced_kernels
    with force_kernel(**choices):
        yield choices


@pytest.fixture(scope="session")
def bench_env(request) -> BenchEnv:
    env = BenchEnv(request.config)
    request.config._gated_ops_bench_env = env
    return env


def pytest_benchmark_update_machine_info(config, machine_info):
    env = getattr(config, "_gated_ops_bench_env", None)
    facts = env.facts if env else machine_facts()
    machine_info["gated_ops"] = {**facts, "peaks": env.peaks if env else {},
                                 "forced_kernels": getattr(config, "_gated_ops_forced_kernels",
                                                           {})}


# ------------------------------------------------------------------------------------------------
# Timing.
@pytest.fixture
def measure(benchmark, bench_env):
    """measure(fn, setup, device, counts, info, per=1): time fn with pytest-benchmark's pedantic
    and record the derived figures in extra_info.

    * fn runs ``--bench-warmup`` times untimed first (compile, allocator, caches); the fastest
      warm-up sets the rounds so that a benchmark takes about ``--bench-seconds``.
    * setup (or None) runs before every call, untimed, and returns fn's (args, kwargs).
    * On CUDA both are followed by a device synchronisation, so a timed call spans its kernels.
    * ``per`` divides the time for a per-unit figure (replicas).
    """

    def run(fn: Callable, setup: Callable | None, device: torch.device,
            counts: flops_mod.Counts, info: dict, per: int = 1):
        def timed(*args, **kwargs):
            out = fn(*args, **kwargs)
            sync(device)
            return out

        def prepared():
            out = setup() if setup is not None else None
            sync(device)
            return out

        env = bench_env
        facts = env.facts
        machine = facts["gpu"] if device.type == "cuda" else facts["cpu"]
        benchmark.extra_info.update({
            **info, "device": str(device), "machine": machine, "torch": facts["torch"],
            "triton": facts["triton"], "commit": facts["commit"], "dirty": facts["dirty"],
            "extension_sha256": facts["extension_sha256"],
            "threads": torch.get_num_threads(), "bytes": counts.bytes, "flops": counts.flops,
        })
        if benchmark.disabled:  # smoke: the real body, once
            return benchmark.pedantic(timed, setup=prepared if setup else None, rounds=1)
        warm = []
        for _ in range(env.warmup):
            args, kwargs = prepared() or ((), {})
            t0 = time.perf_counter()
            timed(*args, **kwargs)
            warm.append(time.perf_counter() - t0)
        est = max(min(warm), 1e-6)
        rounds = int(min(env.max_rounds, max(env.min_rounds, math.ceil(env.seconds / est))))
        load0 = os.getloadavg()[0]
        result = benchmark.pedantic(timed, setup=prepared if setup else None, rounds=rounds,
                                    iterations=1, warmup_rounds=0)
        peaks = env.peak(device)
        st = benchmark.stats.stats
        t = st.median
        # (bfloat16 cases: the bf16 matmul peak; bytes are already counted at 2 per element)
        tflops = peaks["peak_tflops_bf16" if info.get("dtype") == "bfloat16" else "peak_tflops"]
        floor = flops_mod.floor_seconds(counts, peaks["peak_gbs"] * 1e9, tflops * 1e12)
        benchmark.extra_info.update({
            "time_s": t, "time_min_s": st.min, "rounds": rounds,
            "time_per_unit_s": t / per, "per": per,
            "gbs": counts.bytes / t / 1e9, "tflops": counts.flops / t / 1e12,
            "peak_gbs": peaks["peak_gbs"], "peak_tflops": peaks["peak_tflops"],
            "peak_tflops_bf16": peaks["peak_tflops_bf16"],
            "floor_s": floor, "ratio_to_floor": t / floor,
            "load_avg": [load0, os.getloadavg()[0]],  # 1-min load before / after: noise witness
        })
        return result

    return run

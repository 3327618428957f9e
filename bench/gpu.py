"""GPU figures (issue #5, item 5): what moving CLIP costs against what the PCIe link allows, what an NVML reading
costs, and how much VRAM really comes back after CLIP leaves the GPU.

    HF_HUB_OFFLINE=1 python -m bench.gpu [--n N] [--device-index I] [--json] [--quick]

Measured in one run on the first (or given) GPU:
- copy limit: a plain uint8 tensor of CLIP's footprint copied host → device from pinned and from pageable memory
  (median of N): the bandwidth any move of those bytes is bounded by;
- CLIP moves: `OpenClipAdapter` (ViT-B-32, random weights: the bytes are what matters) cpu → cuda from its pinned
  master (one flat buffer page-locked in place at its exact size, the parameters as views), cuda → cpu, and, for comparison, the same model moved from pageable memory with a plain `.to()`;
  each next to the pinned copy limit as a ratio;
- NVML: the cost of one `NvmlProbe.snapshot()` (p50/p99 over N×50 readings), the VRAM sampler's unit of work;
- VRAM returned: NVML's used bytes before the move, on the GPU, and after the move back, as a share of CLIP's
  footprint (the CUDA context stays with the process and is reported apart).

Without CUDA or NVML it says why and exits 0 with nothing measured (`"skipped"` in `--json`); CI runs that path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # NVML and CUDA number devices alike

MiB = 2**20


def _no_gpu_reason(device_index: int) -> str | None:
    import torch

    from backends.vram import NvmlProbe
    from messages.errors import NoGpu

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if device_index >= torch.cuda.device_count():
        return f"device index {device_index} out of range: torch sees {torch.cuda.device_count()} device(s)"
    try:
        NvmlProbe(device_index).close()
    except NoGpu as exc:
        return f"NVML unavailable: {exc}"
    return None


def _median_s(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def copy_limit(nbytes: int, device: Any, n: int) -> dict[str, float]:
    """Host → device bandwidth for `nbytes` from pinned and from pageable memory (GB/s, median of n)."""
    import torch

    pinned = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    result = {}
    for name, host in (("pinned", pinned), ("pageable", pageable)):
        host.to(device, non_blocking=True)  # warm-up: allocator, context
        torch.cuda.synchronize(device)

        def copy(host: Any = host) -> None:
            host.to(device, non_blocking=True)
            torch.cuda.synchronize(device)

        seconds = _median_s(copy, n)
        result[f"{name}_s"] = seconds
        result[f"{name}_gb_s"] = nbytes / seconds / 1e9
    torch.cuda.empty_cache()
    return result


def clip_moves(device_index: int, n: int) -> dict[str, float]:
    """CLIP cpu → cuda (pinned master, Mai's path), cuda → cpu, and a pageable `.to()` for comparison."""
    import open_clip
    import torch

    from backends.clip import OpenClipAdapter

    adapter = OpenClipAdapter("ViT-B-32", None, "fp32", seed=0)
    adapter.to_gpu(device_index)  # warm-up: context, pinning the master once
    adapter.to_cpu()
    pinned = all(t.is_pinned() for t in adapter._master.parameters())  # else the moves below are pageable ones
    to_gpu, to_cpu = [], []
    for _ in range(n):  # each call times itself (synchronised)
        to_gpu.append(adapter.to_gpu(device_index))
        to_cpu.append(adapter.to_cpu())
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    device = torch.device("cuda", device_index)
    pageable_s = []
    for _ in range(n):  # time only the upload half of each round trip
        began = time.perf_counter()
        model.to(device)
        torch.cuda.synchronize(device)
        pageable_s.append(time.perf_counter() - began)
        model.to("cpu")
        torch.cuda.empty_cache()
    return {"footprint_bytes": adapter.footprint_bytes, "master_pinned": pinned, "to_gpu_s": statistics.median(to_gpu),
            "to_cpu_s": statistics.median(to_cpu), "pageable_to_gpu_s": statistics.median(pageable_s)}


def nvml_cost(device_index: int, n: int) -> dict[str, float]:
    from backends.vram import NvmlProbe

    probe = NvmlProbe(device_index)
    try:
        probe.snapshot()
        samples = []
        for _ in range(n):
            began = time.perf_counter()
            probe.snapshot()
            samples.append(time.perf_counter() - began)
    finally:
        probe.close()
    samples.sort()
    return {"p50_us": samples[len(samples) // 2] * 1e6, "p99_us": samples[int(len(samples) * 0.99) - 1] * 1e6}


def vram_returned(device_index: int) -> dict[str, int]:
    """NVML's used bytes around a CLIP round trip: what the move took and what came back."""
    import torch

    from backends.clip import OpenClipAdapter
    from backends.vram import NvmlProbe

    torch.cuda.init()
    torch.empty(1, device=f"cuda:{device_index}")  # the CUDA context first: it stays, and is not CLIP's
    probe = NvmlProbe(device_index)
    try:
        adapter = OpenClipAdapter("ViT-B-32", None, "fp32", seed=0)
        before = probe.snapshot().used_bytes
        adapter.to_gpu(device_index)
        on_gpu = probe.snapshot().used_bytes
        adapter.to_cpu()
        after = probe.snapshot().used_bytes
    finally:
        probe.close()
    return {"footprint_bytes": adapter.footprint_bytes, "used_before": before, "used_on_gpu": on_gpu,
            "used_after": after, "taken_bytes": on_gpu - before, "returned_bytes": on_gpu - after}


def run(n: int, device_index: int) -> dict[str, Any]:
    import torch

    machine = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    reason = _no_gpu_reason(device_index)
    if reason is not None:
        return {"bench": "gpu", "machine": machine, "skipped": reason}
    device = torch.device("cuda", device_index)
    machine["gpu"] = torch.cuda.get_device_name(device)
    moves = clip_moves(device_index, n)
    limit = copy_limit(moves["footprint_bytes"], device, n)
    returned = vram_returned(device_index)
    return {
        "bench": "gpu", "machine": machine, "n": n, "copy_limit": limit, "clip": moves,
        "to_gpu_vs_pinned_limit": moves["to_gpu_s"] / limit["pinned_s"],
        "pageable_vs_pinned_move": moves["pageable_to_gpu_s"] / moves["to_gpu_s"],
        "nvml": nvml_cost(device_index, n * 50), "vram": returned,
        "returned_share": returned["returned_bytes"] / returned["footprint_bytes"],
    }


def render(result: dict[str, Any]) -> str:
    machine = result["machine"]
    if "skipped" in result:
        return f"GPU figures: nothing measured: {result['skipped']} (Python {machine['python']}, torch {machine['torch']})"
    limit, clip, nvml, vram = result["copy_limit"], result["clip"], result["nvml"], result["vram"]
    mib = clip["footprint_bytes"] / MiB
    return "\n".join([
        f"GPU figures on {machine['gpu']} (torch {machine['torch']}, Python {machine['python']}), median of {result['n']}",
        "",
        f"copy limit for {mib:.0f} MiB host -> device: pinned {limit['pinned_gb_s']:.1f} GB/s "
        f"({limit['pinned_s'] * 1000:.1f} ms), pageable {limit['pageable_gb_s']:.1f} GB/s ({limit['pageable_s'] * 1000:.1f} ms)",
        f"CLIP ViT-B-32 fp32 cpu -> cuda ({'pinned' if clip['master_pinned'] else 'PAGEABLE'} master): "
        f"{clip['to_gpu_s'] * 1000:.1f} ms = "
        f"{result['to_gpu_vs_pinned_limit']:.2f}x the pinned copy limit",
        f"CLIP cuda -> cpu (drop the GPU copy, empty_cache): {clip['to_cpu_s'] * 1000:.1f} ms",
        f"the same model by a plain .to() from pageable memory: {clip['pageable_to_gpu_s'] * 1000:.1f} ms = "
        f"{result['pageable_vs_pinned_move']:.2f}x Mai's pinned move",
        f"NVML snapshot: p50 {nvml['p50_us']:.0f} us, p99 {nvml['p99_us']:.0f} us",
        f"VRAM: CLIP took {vram['taken_bytes'] / MiB:.0f} MiB by NVML ({mib:.0f} MiB of weights); after the move back "
        f"{vram['returned_bytes'] / MiB:.0f} MiB returned = {result['returned_share']:.0%} of its footprint",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help="repetitions of each move and copy (default 20; --quick: 3)")
    parser.add_argument("--device-index", type=int, default=0, help="the GPU to measure (NVML/PCI order; default 0)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quick", action="store_true", help="a few repetitions: checks the benchmark runs")
    args = parser.parse_args(argv)
    n = args.n if args.n is not None else (3 if args.quick else 20)
    if n < 1:
        parser.error(f"--n must be at least 1, got {n}")
    if args.device_index < 0:
        parser.error(f"--device-index must be >= 0, got {args.device_index}")
    result = run(n, args.device_index)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Footprints Mai measures: how much free VRAM a model's own load took, read under the GPU gate.

Rule 1: a footprint is learned only from the change of VRAM readings across the model's own load, with both
readings exact (same source; nothing else of Mai's moved between them, which the coordinator checks). Never from
what a server says: LM Studio's `sizeBytes` is the model file's size (no KV cache, no compute buffers, no CUDA
context; real-servers.md L1), Ollama's `size_vram` leaves out its runner's CUDA context (O19), and CLIP's parameter
bytes leave out its context and workspaces (T3, T4).
Rule 2: other programs move VRAM too. Where both readings carry NVML's per-process rows and the loading part's own
processes are among them (mai.core.attribution), the footprint is what those processes grew by, whatever other
programs did meanwhile. Otherwise (WDDM reports no figures, WSL2 refuses, a container sees host PIDs: N2) it is the
device-wide change, and an implausible one (not positive, or more than `MAX_OVER_DECLARED` times the declared
footprint) is rejected with its reason, and the declared footprint stays.
Rule 3: a footprint depends on the context length (the KV cache grows with it), so it is kept per model and
context: `qwen2.5vl:7b@8192`; `ViT-B-32@-` for a model without one.

Pure: no I/O, no clock. The coordinator measures and its shell persists (`footprints.json`, key → bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from mai.core.attribution import Owner, growth
from messages.resources import VramSnapshot

FOOTPRINTS_FILE = "footprints.json"  # in the state directory
MAX_OVER_DECLARED = 2.0  # a larger change than this many times the declared footprint: something else loaded too
NO_CONTEXT = "-"


def footprint_key(model: str, context_length: int | None) -> str:
    """`model@context` (`model@-` for a model without a context length, such as CLIP)."""
    return f"{model}@{context_length if context_length else NO_CONTEXT}"


def parse_footprints(raw: object) -> tuple[dict[str, int], tuple[str, ...]]:
    """footprints.json as (measured footprints by key, keys ignored). Keys without `@` are the old format: learned
    from Ollama's `size_vram` (no CUDA context, so too small to plan with): read, kept in the file, not used."""
    learned: dict[str, int] = {}
    ignored: list[str] = []
    if not isinstance(raw, Mapping):
        return learned, ()
    for key, value in raw.items():
        ok = isinstance(key, str) and "@" in key and isinstance(value, int) and not isinstance(value, bool)
        if ok and value > 0:
            learned[key] = value
        else:
            ignored.append(str(key))
    return learned, tuple(ignored)


@dataclass(frozen=True)
class Verdict:
    nbytes: int | None  # None: rejected
    reason: str  # "process_delta" or "vram_delta" when accepted, else why not


def judge_delta(before: VramSnapshot, after: VramSnapshot, declared_bytes: int,
                owner: Owner | None = None, clip_pid: int = 0, floor_bytes: int = 0) -> Verdict:
    """The footprint a load by `owner` (the part whose processes load it) shows between two readings (numbered as in
    the code):
    (1) both readings must come from one GPU source (NVML's v1 and v2, torch and NVML differ in what "used" holds);
    (2) with per-process rows in both and the owner's processes in the second, what they grew by ("process_delta");
    (3) else the change in free bytes must be positive: a load that freed memory means something else left meanwhile;
    (4) and, either way, at most `MAX_OVER_DECLARED` × the declared footprint: more means something else loaded
        meanwhile (another program, or another client's model in the same Ollama);
    (5) and at least `floor_bytes`, what the part itself says it holds on the GPU (Ollama's `size_vram`, which leaves
        out only the CUDA context): less means something else freed memory meanwhile (a lagging release, another
        program), and planning with it would over-commit the GPU (invariant 12)."""
    # (1)
    if not (before.gpu_present and after.gpu_present) or before.source != after.source:
        return Verdict(None, f"readings from different sources ({before.source} -> {after.source})")
    if before.total_bytes != after.total_bytes:
        return Verdict(None, "the GPU's total changed between the readings")
    # (2)
    grown = None
    if owner is not None and before.per_process and after.per_process:
        grown = growth(before.processes, after.processes, owner, clip_pid)
    if grown:
        delta, how = grown, "process_delta"
    else:
        # (3)
        delta, how = before.free_bytes - after.free_bytes, "vram_delta"
        if delta <= 0:
            return Verdict(None, f"free VRAM did not drop across the load ({delta} bytes): another program freed "
                                 "memory")
    # (4)
    if declared_bytes > 0 and delta > MAX_OVER_DECLARED * declared_bytes:
        return Verdict(None, f"{delta} bytes is more than {MAX_OVER_DECLARED:g}x the declared {declared_bytes}: "
                             "another program allocated memory meanwhile")
    # (5)
    if delta < floor_bytes:
        return Verdict(None, f"{delta} bytes is less than the {floor_bytes} the part itself reports holding: "
                             "memory was freed meanwhile")
    return Verdict(delta, how)

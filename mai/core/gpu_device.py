"""Which CUDA device is the GPU Mai arbitrates: one physical GPU, one name, in the sampler and in CLIP.

NVML numbers GPUs in PCI bus order and ignores CUDA_VISIBLE_DEVICES; CUDA numbers them fastest first unless
CUDA_DEVICE_ORDER=PCI_BUS_ID was set before CUDA started, and renumbers what CUDA_VISIBLE_DEVICES leaves visible
(real-servers.md T7, N5). So CLIP finds its device by UUID, never by trusting that two indices agree. Pure: the
UUIDs come in (from torch's device properties and NVML), the decision goes out."""

from __future__ import annotations

from typing import Sequence

from messages.errors import NoGpu


def normalise_uuid(text: str) -> str:
    """NVML says "GPU-5d1c...", torch's `_CUuuid` prints "5d1c..." without the prefix: one form for comparing."""
    bare = text.strip().lower()
    return "GPU-" + (bare[4:] if bare.startswith("gpu-") else bare)


def resolve_cuda_index(device: int | str, cuda_uuids: Sequence[str], nvml_uuid: str | None) -> tuple[int, str | None]:
    """The CUDA index of the configured GPU, and a sentence when CUDA's numbering differs from NVML's (log it).

    1. `device` is a UUID: the CUDA device with that UUID.
    2. `device` is an NVML index and NVML named its UUID: the CUDA device with that UUID.
    3. `device` is an index and NVML is unusable: the same CUDA index (PCI_BUS_ID order makes it NVML's).
    The GPU not among CUDA's devices (hidden by CUDA_VISIBLE_DEVICES, or CUDA sees other GPUs) is NoGpu naming both
    sides: CLIP must not silently use another GPU than the one whose memory the sampler reads."""
    visible = [normalise_uuid(u) for u in cuda_uuids]
    wanted = normalise_uuid(device) if isinstance(device, str) else (normalise_uuid(nvml_uuid) if nvml_uuid else None)
    if wanted is None:  # (3)
        if not 0 <= device < len(visible):
            raise NoGpu(f"CUDA device index {device} out of range: {len(visible)} device(s) visible",
                        details={"cause": "index_out_of_range", "device": device, "cuda_uuids": visible})
        return device, None
    if wanted not in visible:  # (1), (2): the GPU exists for NVML but not for CUDA
        named = f"NVML device {device} ({wanted})" if isinstance(device, int) else wanted
        raise NoGpu(
            f"CLIP cannot use the GPU Mai watches: {named} is not among CUDA's devices "
            f"({', '.join(visible) or 'none'}); check CUDA_VISIBLE_DEVICES",
            details={"cause": "uuid_mismatch", "device": device, "uuid": wanted, "cuda_uuids": visible},
        )
    index = visible.index(wanted)
    if isinstance(device, int) and index != device:
        return index, f"NVML device {device} ({wanted}) is CUDA device {index}: CUDA numbers devices differently"
    return index, None

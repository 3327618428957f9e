"""The cost model every policy runs on: the GPU, the models' true and declared footprints, and how long each thing
takes. One `Params` per GPU size; every policy in a run gets the same one, so the comparison is about decisions only.

Defaults are published figures (`/work/shared/reference/peers.md`, `ollama.md`) or Mai's own configuration:
- VLM: qwen2.5vl:7b takes 7 421 698 048 bytes at num_ctx 8192 (the `/api/ps` example in ollama.md; peers.md: a 7B
  VLM takes 5-8 GB) while `config/default.yaml` declares 6000 MiB until the first load measures it; it loads in 4 s
  (2-6 s published) and its VRAM comes back 0.5 s after the unload returns (Ollama: 0.5-1.5 s typical).
- CLIP ViT-B-32: 0.6 GB in fp32, moved in 30 ms (peers.md E1: 12-50 ms); an embedding takes 20 ms on the GPU and
  300 ms on the CPU (estimates: a batch of screen crops).
- Chat models: the `chat` role's chain in `config/models.yaml` with their declared footprints (2-9 GB published),
  loaded in 3 s.
- A llama.cpp model (the VLM, a chat model) that does not fit runs partially offloaded, the rest of its layers on
  the CPU, where they are `cpu_slowdown` times slower (an estimate).
- The desktop holds `external_bytes` (an estimate) on every GPU, whatever the policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mai.sim.world import GIB, MIB, ChatModelSpec, Timings

VLM_TRUE_BYTES = 7_421_698_048  # qwen2.5vl:7b, num_ctx 8192, per Ollama's /api/ps (reference/ollama.md)
GPU_SIZES_GIB = (8, 12, 16, 24)


def bench_timings() -> Timings:
    """The simulated world's timings with the published figures above."""
    return Timings(vlm_load_s=4.0, vlm_unload_s=0.4, vlm_release_lag_s=0.5, clip_move_s=0.03, chat_load_s=3.0,
                   chat_unload_s=0.2, ack_s=0.005, fail_s=0.05, sample_interval_s=0.25)


@dataclass(frozen=True)
class Params:
    gpu_total_bytes: int
    vlm_model: str
    vlm_declared_bytes: int  # what a policy plans with before it has measured a load
    vlm_true_bytes: int  # what a load really takes
    clip_bytes: int
    chat_models: tuple[ChatModelSpec, ...]  # best first: the fallback chain
    reserve_bytes: int  # Mai's gpu.reserve_mb; the strict policy keeps the same margin
    idle_timeout_s: float  # Mai's ollama.idle_timeout_s; the strict policy uses the same
    external_bytes: int = 400 * MIB
    timings: Timings = field(default_factory=bench_timings)
    clip_embed_gpu_s: float = 0.02
    clip_embed_cpu_s: float = 0.30
    cpu_slowdown: float = 10.0
    retry_s: float = 5.0  # a request refused (no room, a failed load) is asked again this much later...
    give_up_s: float = 300.0  # ...until it has waited this long: then it counts as failed

    def __post_init__(self) -> None:
        problems = []
        for name in ("gpu_total_bytes", "vlm_declared_bytes", "vlm_true_bytes", "clip_bytes"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: got {getattr(self, name)!r}; accepted: an integer > 0")
        if not self.chat_models:
            problems.append("chat_models: got none; accepted: at least one")
        if self.clip_embed_cpu_s < self.clip_embed_gpu_s or self.cpu_slowdown < 1:
            problems.append("the CPU must not be faster than the GPU (clip_embed_cpu_s, cpu_slowdown)")
        if problems:
            raise ValueError("Params " + "; ".join(problems))

    @property
    def gpu_gib(self) -> float:
        return self.gpu_total_bytes / GIB

    def offload_slowdown(self, gpu_bytes: int, true_bytes: int) -> float:
        """How much slower a llama.cpp model runs with only `gpu_bytes` of its `true_bytes` on the GPU."""
        cpu_fraction = max(0.0, 1.0 - gpu_bytes / true_bytes) if true_bytes else 0.0
        return 1.0 + (self.cpu_slowdown - 1.0) * cpu_fraction

    def chat_model(self, key: str) -> ChatModelSpec:
        return next(m for m in self.chat_models if m.key == key)

    def with_gpu(self, gib: float) -> "Params":
        return replace(self, gpu_total_bytes=int(gib * GIB))


def default_params(gpu_gib: float = 12, cfg: Any = None) -> Params:
    """Params for a GPU of `gpu_gib` GiB from Mai's default configuration (the user's environment is ignored, so a
    run is reproducible anywhere)."""
    if cfg is None:
        from config.loader import load_config

        cfg = load_config(env={})
    footprints = {m.key: m.footprint_mb * MIB for m in cfg.models}
    chain = tuple(ChatModelSpec(key, footprints[key], footprints[key]) for key in cfg.roles[cfg.chat.role])
    return Params(
        gpu_total_bytes=int(gpu_gib * GIB),
        vlm_model=cfg.ollama.vlm_model,
        vlm_declared_bytes=int(cfg.ollama.vlm_footprint_mb * MIB),
        vlm_true_bytes=VLM_TRUE_BYTES,
        clip_bytes=int((cfg.clip.footprint_mb or 600) * MIB),
        chat_models=chain,
        reserve_bytes=int(cfg.gpu.reserve_mb * MIB),
        idle_timeout_s=float(cfg.ollama.idle_timeout_s),
    )

"""ClipMover: owns the OpenCLIP model and its device. Moves cpu↔gpu when the coordinator grants the step (the
coordinator checked the VRAM first), embeds images (file paths or shared memory) and texts, reports where the
weights really are. torch is imported only here, inside this leaf actor's process, so CUDA never meets fork.

One GPU, one name (real-servers.md T7, N5): CUDA_DEVICE_ORDER=PCI_BUS_ID is set before torch starts CUDA, and the
CUDA device is found by UUID: `gpu.device`'s own, or the one NVML gives its index (NVML creates no context, so this
process may ask it). A GPU CUDA cannot see is reported as degraded, never swapped for another. Where NVML is
missing, this process answers the sampler's ReadCudaMemory with `torch.cuda.mem_get_info` (N3)."""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Callable

from thespian.actors import WakeupMessage

from actors.base import MaiActor
from bootstrap.paths import ledger_path
from mai.core.clip_creation import creation_failure
from mai.core.gpu_device import normalise_uuid, resolve_cuda_index
from messages.errors import MaiError, NoGpu, NotRunning
from messages.failure import Failure
from messages.requests import CLIP_UNAVAILABLE, ClipDeviceIs, EmbedImages, EmbedTexts, Embeddings, GetClipDevice
from messages.resources import CudaMemory, ReadCudaMemory, VramSnapshot
from messages.steps import ClipMoved, ClipObserved, MoveClip, PartHealth, Reobserve, StepFailed
from messages.system import Init

RETRY_CREATE = "create_clip"  # the wakeup that tries to create the model again
CUDA_DEVICE_ORDER = "PCI_BUS_ID"  # NVML's order; read by CUDA only at its start, so set before the first CUDA call


class ClipMover(MaiActor):
    role = "clip"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter: Any = None
        self.failure: str | None = None
        self.nvml: Any = None  # an NvmlProbe on Mai's GPU in this process: its UUID, and the free bytes around a move
        self.cuda_index: int | None = None  # resolved once, at the first CUDA use
        self.gpu_uuid = ""
        self.memory_reader: Any = None  # the sampler, once it asked for torch readings: pushed one after each move
        self.measured_bytes: int | None = None  # what the last move to the GPU took by NVML (context included)
        self.create_failures = 0  # tries to create the model that failed in a row (the retry backoff counts them)

    def on_init(self, init: Init) -> None:
        if os.environ.get("CUDA_DEVICE_ORDER") != CUDA_DEVICE_ORDER:
            self.log.info("clip.cuda_device_order", was=os.environ.get("CUDA_DEVICE_ORDER", ""),
                          now=CUDA_DEVICE_ORDER, reason="match NVML's PCI bus order")
            os.environ["CUDA_DEVICE_ORDER"] = CUDA_DEVICE_ORDER
        if self.adapter is None:
            coordinator = self.peers.get("coordinator")
            if coordinator is not None:  # a fresh mover holds nothing on the GPU: say so before the (slow) creation
                self.send(coordinator, ClipObserved("cpu", 0, False, self.config.clip.model, os.getpid(),
                                                    observed_at=time.time()))
            self._create()
        self._observe()

    def _create(self) -> None:
        """Create the model; any failure becomes the degraded reason naming its cause (mai.core.clip_creation), and
        only a cause that can change by itself (Hugging Face unreachable) is tried again, on a timer."""
        began = time.monotonic()
        model = self.config.clip.model
        try:
            from backends.sim_clip import make_clip_adapter  # imports torch: a broken install fails right here

            self.adapter = make_clip_adapter(self.config, ledger_path(self.config))
        except Exception as err:  # noqa: BLE001 - SafetensorError, ImportError...: each one is reported, none lost
            self.create_failures += 1
            outcome = creation_failure(model, err, self.create_failures)
            self.failure = outcome.reason
            self.log.error("clip.unavailable", reason=self.failure, error_type=type(err).__name__,
                           retry_in_s=outcome.retry_in_s, failures=self.create_failures)
            if outcome.retry_in_s is not None:
                self.wakeupAfter(datetime.timedelta(seconds=outcome.retry_in_s), payload=RETRY_CREATE)
            return
        self.failure, self.create_failures = None, 0
        self.log.info("clip.ready", model=model, footprint=self.adapter.footprint_bytes,
                      create_s=round(time.monotonic() - began, 3))

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        if msg.payload == RETRY_CREATE and self.adapter is None:
            self._create()
            self._observe()

    def _gpu(self) -> int:
        """The CUDA index of Mai's GPU (see the module doc); a mismatch marks CLIP degraded and raises NoGpu."""
        if self.cuda_index is not None:
            return self.cuda_index
        device = self.config.gpu.device
        if self.config.gpu.backend == "nvml" and self.nvml is None:
            from backends.vram import NvmlProbe

            try:
                self.nvml = NvmlProbe(device)
            except NoGpu as err:  # NVML missing: trust PCI_BUS_ID order, or the configured UUID
                self.log.info("clip.nvml_unavailable", reason=str(err))
        nvml_uuid = self.nvml.device_uuid if self.nvml is not None else None
        try:
            index, note = resolve_cuda_index(device, self._cuda().cuda_device_uuids(), nvml_uuid)
        except NoGpu as err:
            if err.details.get("cause") == "uuid_mismatch":
                self.failure = str(err)
                self.log.error("clip.gpu_mismatch", reason=self.failure)
                self._observe()
            raise
        if note:
            self.log.warning("clip.gpu_resolved", cuda_index=index, reason=note)
        self.cuda_index = index
        self.gpu_uuid = normalise_uuid(self._cuda().cuda_device_uuids()[index])
        return index

    def _cuda(self) -> Any:
        """What answers CUDA questions in this process: the adapter, or — while the model could not be created (no
        weights, a corrupt checkpoint) — the real adapter's class, whose CUDA queries need no model: whether CUDA
        works has nothing to do with CLIP's weights. The simulated GPU needs its adapter."""
        if self.adapter is not None:
            return self.adapter
        if self.config.clip.backend == "simulated":
            raise NotRunning(self.failure or "the CLIP model is still being created")
        try:
            from backends.clip import OpenClipAdapter
        except Exception as err:  # noqa: BLE001 - a broken torch install: that is why CUDA cannot be read
            raise NotRunning(f"torch cannot be imported in the CLIP process: {type(err).__name__}: {err}") from err
        return OpenClipAdapter

    def _free_bytes(self) -> Callable[[], int] | None:
        """NVML's free bytes of Mai's GPU, read around a move to measure what it took (context included)."""
        return (lambda: self.nvml.snapshot().free_bytes) if self.nvml is not None else None

    def _footprint(self) -> int:
        """What CLIP costs on the GPU: the last move's NVML-measured cost (parameter bytes leave out the context
        and workspaces, T3), never less than the parameter bytes (another program may have freed memory
        meanwhile); the parameter bytes until a move was measured."""
        return max(self.measured_bytes or 0, self.adapter.footprint_bytes)

    def _observe(self) -> None:
        coordinator = self.peers.get("coordinator")
        if coordinator is None:
            return
        self.send(coordinator, PartHealth("clip", self.failure is None, self.failure or ""))
        read_at = time.time()  # lets the coordinator tell this report from an older one delivered after it
        if self.adapter is not None:
            self.send(coordinator, ClipObserved(self.adapter.device, self._footprint(), True, self.config.clip.model,
                                                os.getpid(), read_at))
        else:
            self.send(coordinator, ClipObserved("cpu", 0, False, self.config.clip.model, os.getpid(), read_at))

    def receiveMsg_Reobserve(self, msg: Reobserve, sender: Any) -> None:
        self._observe()

    def on_peers(self, restarted: frozenset[str]) -> None:
        """A new coordinator: tell it where CLIP is, even if its Reobserve overtook this news and was answered to
        its dead predecessor."""
        if "coordinator" in restarted:
            self._observe()

    def _ready(self) -> Any:
        if self.adapter is None:
            raise NotRunning(self.failure or "the CLIP model is still being created")
        return self.adapter

    def receiveMsg_MoveClip(self, msg: MoveClip, sender: Any) -> None:
        try:
            adapter = self._ready()
            if msg.device == "gpu":
                move_s = adapter.to_gpu(self._gpu(), self._free_bytes())
            else:
                move_s = adapter.to_cpu()
        except Exception as err:  # noqa: BLE001 - any failure of a move is reported as the step's failure
            self.log.error("clip.move_failed", device=msg.device, error=str(err))
            self.send(sender, StepFailed(msg.step_id, Failure.from_error(msg.step_id, err)))
            return
        if msg.device == "gpu" and getattr(adapter, "measured_move_bytes", None) is not None:
            self.measured_bytes = adapter.measured_move_bytes
        self.log.debug("clip.move_done", device=adapter.device, move_ms=round(move_s * 1000, 1),
                       footprint=self._footprint(), measured=self.measured_bytes)
        self.send(sender, ClipMoved(msg.step_id, adapter.device, self._footprint(), move_s))
        if self.memory_reader is not None:
            self._send_reading("pushed", self.memory_reader)

    def receiveMsg_ReadCudaMemory(self, msg: ReadCudaMemory, sender: Any) -> None:
        self.memory_reader = sender
        self._send_reading(msg.request_id, sender)

    def _send_reading(self, request_id: str, reply_to: Any) -> None:
        """torch's device-wide reading of Mai's GPU, for the sampler while NVML fails (N3); or why there is none."""
        try:
            cuda = self._cuda()
            index = self._gpu()
            free, total, name = cuda.cuda_memory(index)
        except MaiError as err:
            self.send(reply_to, CudaMemory(request_id, None, str(err)))
            return
        snapshot = VramSnapshot(total_bytes=total, used_bytes=total - free, free_bytes=free, source="torch",
                                device_name=name, taken_at=time.time(), device_uuid=self.gpu_uuid)
        self.send(reply_to, CudaMemory(request_id, snapshot))

    def receiveMsg_EmbedImages(self, msg: EmbedImages, sender: Any) -> None:
        def embed() -> None:
            adapter = self._ready()
            if msg.shm_name is not None:
                vectors = adapter.embed_image_arrays(msg.shm_name, msg.shm_shape)
            else:
                vectors = adapter.embed_images(msg.paths)
            self.send(sender, Embeddings(msg.request_id, vectors, adapter.device, self.config.clip.model))

        self.guarded(msg.request_id, sender, embed)

    def receiveMsg_EmbedTexts(self, msg: EmbedTexts, sender: Any) -> None:
        def embed() -> None:
            adapter = self._ready()
            vectors = adapter.embed_texts(msg.texts)
            self.send(sender, Embeddings(msg.request_id, vectors, adapter.device, self.config.clip.model))

        self.guarded(msg.request_id, sender, embed)

    def receiveMsg_GetClipDevice(self, msg: GetClipDevice, sender: Any) -> None:
        """Where the weights are; a model that was never created is on no device (spec property 12), and the
        reply says why, as the degraded status does."""
        if self.adapter is None:
            reason = self.failure or "the CLIP model is still being created"
            self.send(sender, ClipDeviceIs(msg.request_id, CLIP_UNAVAILABLE, self.config.clip.model, reason))
            return
        self.send(sender, ClipDeviceIs(msg.request_id, self.adapter.device, self.config.clip.model, self.failure or ""))

"""ClipMover: owns the OpenCLIP model and its device. Moves cpu↔gpu when the coordinator grants the step (the
coordinator checked the VRAM first), embeds images (file paths or shared memory) and texts, reports where the
weights really are. torch is imported only here, inside this leaf actor's process, so CUDA never meets fork."""

from __future__ import annotations

import time
from typing import Any

from actors.base import MaiActor
from bootstrap.paths import ledger_path
from messages.errors import MaiError, NotRunning
from messages.failure import Failure
from messages.requests import ClipDeviceIs, EmbedImages, EmbedTexts, Embeddings, GetClipDevice
from messages.steps import ClipMoved, ClipObserved, MoveClip, PartHealth, Reobserve, StepFailed
from messages.system import Init


class ClipMover(MaiActor):
    role = "clip"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter: Any = None
        self.failure: str | None = None

    def on_init(self, init: Init) -> None:
        if self.adapter is None:
            began = time.monotonic()
            try:
                from backends.sim_clip import make_clip_adapter

                self.adapter = make_clip_adapter(init.config, ledger_path(init.config))
                self.failure = None
                self.log.info("clip.ready", model=init.config.clip.model, footprint=self.adapter.footprint_bytes,
                              create_s=round(time.monotonic() - began, 3))
            except MaiError as err:
                self.failure = f"CLIP model {init.config.clip.model!r} unavailable: {err}"
                self.log.error("clip.unavailable", reason=self.failure)
        self._observe()

    def _observe(self) -> None:
        coordinator = self.peers.get("coordinator")
        if coordinator is None:
            return
        self.send(coordinator, PartHealth("clip", self.failure is None, self.failure or ""))
        if self.adapter is not None:
            self.send(coordinator, ClipObserved(self.adapter.device, self.adapter.footprint_bytes, True, self.config.clip.model))
        else:
            self.send(coordinator, ClipObserved("cpu", 0, False, self.config.clip.model))

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
                move_s = adapter.to_gpu(self.config.gpu.device_index)
            else:
                move_s = adapter.to_cpu()
        except Exception as err:  # noqa: BLE001 - any failure of a move is reported as the step's failure
            self.log.error("clip.move_failed", device=msg.device, error=str(err))
            self.send(sender, StepFailed(msg.step_id, Failure.from_error(msg.step_id, err)))
            return
        self.log.debug("clip.move_done", device=adapter.device, move_ms=round(move_s * 1000, 1), footprint=adapter.footprint_bytes)
        self.send(sender, ClipMoved(msg.step_id, adapter.device, adapter.footprint_bytes, move_s))

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
        device = self.adapter.device if self.adapter is not None else "cpu"
        self.send(sender, ClipDeviceIs(msg.request_id, device, self.config.clip.model, self.adapter is not None))

"""OpenCLIP adapter: the only module that imports torch and open_clip.

In: an architecture name, a weights tag or checkpoint path, a GPU precision; then image files, image batches in
shared memory, texts and device moves. Out: float32 L2-normalised numpy embeddings, move timings in seconds, and
Mai errors (never torch's or open_clip's).

The model built at construction stays on the CPU for the adapter's whole life: it is the CPU-mode model and the
source of every GPU copy. Moving to the GPU copies from it (pinned once, then reused); moving back drops the GPU
copy and hands its blocks back to the driver, with no device-to-host copy (clip-torch-nvml.md §6).

Memory as torch really spends it (real-servers.md T1-T6): the master's tensors become views of ONE flat host buffer,
page-locked in place with cudaHostRegister at its exact size (torch's pinned allocator rounds every block, the
flat one too, up to a power of two: 577 MiB of ViT-B-32 would lock 1 GiB); the release path frees the cuBLAS
workspaces that `empty_cache()` keeps; bf16 is refused on GPUs without it; cuBLAS/cuDNN ALLOC_FAILED is OOM.

Import this module only inside the process that will run CLIP: importing torch costs seconds, and the first CUDA
call creates a context that lives until that process exits.
"""

from __future__ import annotations

import copy
import difflib
import gc
import itertools
import operator
import os
import sys
import threading
import time
import weakref
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy
import open_clip
import structlog
import torch
import torch.nn.functional as F
from PIL import Image

from backends.shm import SHM_DIR, shm_free_bytes
from messages.errors import BackendUnavailable, InvalidRequest, LoadFailed, NoGpu, OutOfMemory, PredictionFailed

log = structlog.get_logger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config" / "clip"
"""Mai's own architectures (`ViT-Tiny-test` for fast tests), registered with open_clip on import."""

if CONFIG_DIR.is_dir():
    open_clip.add_model_config(CONFIG_DIR)

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""GPU precisions. The CPU master always runs fp32: bf16/fp16 are 9-22x slower on CPUs without AMX."""

# Names open_clip resolves itself (hub repos, local checkpoint folders); they are not in list_models().
_NAME_SCHEMES = ("hf-hub:", "local-dir:")

# Images and texts go through the model this many at a time, so a large request cannot exhaust VRAM on its own.
_BATCH_SIZE = 32

# Each view in the flat master buffer starts on this boundary: aligned for every dtype and for vectorised copies.
_VIEW_ALIGN_BYTES = 64

# Texts of allocation failures that are out-of-memory without saying so (cuBLAS, cuDNN under pressure; T6).
_OOM_TEXTS = ("out of memory", "ALLOC_FAILED")


class OpenClipAdapter:
    """One OpenCLIP model with a permanent CPU master and an optional GPU copy made from it."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        precision: str = "fp32",
        *,
        seed: int | None = None,
        threads: int | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise InvalidRequest(
                f"precision {precision!r} is not supported; accepted: {', '.join(PRECISIONS)}",
                details={"precision": precision, "accepted": list(PRECISIONS)},
            )
        if threads is not None:
            if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
                raise InvalidRequest(f"threads must be a positive integer, got {threads!r}", details={"threads": threads})
            torch.set_num_threads(threads)  # process-wide: the adapter's actor process runs nothing else
        _check_model_name(model_name)
        _check_pretrained(model_name, pretrained)

        self._master, self._preprocess, self._tokenizer = _create_on_cpu(model_name, pretrained, seed)
        self.model_name = model_name
        self.pretrained = pretrained
        self.precision = precision
        self._gpu_dtype = PRECISIONS[precision]
        self._gpu_model: torch.nn.Module | None = None
        self._master_pinned = False
        self._footprint_bytes = _tensor_bytes(self._master, self._gpu_dtype)
        self.measured_move_bytes: int | None = None  # device memory the last to_gpu took, when a reader was given
        self._embedding_dim = _embedding_dim(model_name, self._master, self._tokenizer)

    # ------------------------------------------------------------------ facts

    @property
    def device(self) -> str:
        """Where the weights in use really are ("cpu" or "cuda:N"), read from a parameter, not from a flag."""
        return str(next(self._active_model().parameters()).device)

    @property
    def footprint_bytes(self) -> int:
        """Parameter and buffer bytes at GPU precision: what a GPU copy costs, CUDA context excluded."""
        return self._footprint_bytes

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @staticmethod
    def cuda_available() -> bool:
        return torch.cuda.is_available()

    def gpu_memory_allocated(self) -> int:
        """Bytes held by live CUDA tensors in this process; 0 when CUDA was never used (and it stays unused)."""
        return int(torch.cuda.memory_allocated()) if torch.cuda.is_initialized() else 0

    @staticmethod
    def cuda_device_uuids() -> list[str]:
        """The UUID of each CUDA device, in CUDA's numbering (matched against NVML's to find Mai's GPU, N5).
        NoGpu when torch has no usable CUDA."""
        unavailable = _cuda_unavailable_reason(0)
        if unavailable is not None:
            raise NoGpu(f"no CUDA device: {unavailable}", details={"cause": unavailable})
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]

    @staticmethod
    def cuda_memory(device_index: int) -> tuple[int, int, str]:
        """(free, total, name) of one CUDA device, device-wide, by `torch.cuda.mem_get_info`: the reading where NVML
        is missing (N3). Creates this process's CUDA context if none exists (~0.3 GB, until exit)."""
        unavailable = _cuda_unavailable_reason(device_index)
        if unavailable is not None:
            raise NoGpu(f"cannot read cuda:{device_index}: {unavailable}", details={"cause": unavailable})
        free, total = torch.cuda.mem_get_info(device_index)
        return int(free), int(total), torch.cuda.get_device_name(device_index)

    # ------------------------------------------------------------------ moves

    def to_gpu(self, device_index: int = 0, free_bytes: Callable[[], int] | None = None) -> float:
        """Copy the CPU master onto `cuda:<device_index>` at the GPU precision; returns the seconds it took.

        `free_bytes` reads the device's free memory (NVML, which creates no context); read before and after the
        move, its fall is `measured_move_bytes`: on the first move that includes the CUDA context and workspaces,
        which parameter bytes leave out (T3, T4).

        Idempotent. Raises NoGpu when torch sees no usable CUDA device, InvalidRequest for bf16 on a GPU without
        it (T5), OutOfMemory when the copy does not fit (the partial copy is released first)."""
        started = time.perf_counter()
        target = f"cuda:{device_index}"
        if self._gpu_model is not None:
            if self.device == target:
                return time.perf_counter() - started
            self.to_cpu()
        unavailable = _cuda_unavailable_reason(device_index)
        if unavailable is not None:
            raise NoGpu(
                f"cannot move CLIP {self.model_name!r} to {target}: {unavailable}",
                details={"cause": unavailable, "device_index": device_index},
            )
        device = torch.device("cuda", device_index)
        if self._gpu_dtype == torch.bfloat16 and not _bf16_supported(device):
            name = torch.cuda.get_device_name(device)
            capability = "%d.%d" % torch.cuda.get_device_capability(device)
            raise InvalidRequest(
                f"clip.precision bf16 needs compute capability >= 8.0; {name} (cuda:{device_index}) has {capability}: "
                "use fp16 or fp32",
                details={"precision": "bf16", "device_name": name, "compute_capability": capability},
            )
        free_before = free_bytes() if free_bytes is not None else None
        if self._gpu_dtype == torch.float32:
            # cuDNN runs convolutions in TF32 by default (~1e-3 error); fp32 should mean fp32 so CPU and GPU
            # vectors can share one index.
            torch.backends.cudnn.allow_tf32 = False
        failure: tuple[type[Exception], str] | None = None
        try:
            torch.cuda.set_device(device)  # so pinning and the context land on the target device, not on cuda:0
            self._pin_master()
            self._gpu_model = _copy_module(self._master, device, self._gpu_dtype)
            torch.cuda.synchronize(device)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            failure = (_runtime_error_kind(exc, LoadFailed), _first_line(exc))
        # Raised outside the except blocks so no traceback keeps the frames holding the partial copy alive.
        if failure is not None:
            self._gpu_model = None
            self._release_cuda_memory()
            error_type, cause = failure
            raise error_type(
                f"cannot move CLIP {self.model_name!r} to {target} ({self._footprint_bytes} bytes): {cause}",
                details={"cause": cause, "needed_bytes": self._footprint_bytes, "device_index": device_index},
            )
        if free_before is not None and free_bytes is not None:
            self.measured_move_bytes = max(0, free_before - free_bytes())
        return time.perf_counter() - started

    def to_cpu(self) -> float:
        """Switch back to the CPU master and give the GPU copy's memory back to the driver; returns seconds.

        Idempotent. Afterwards `gpu_memory_allocated() == 0`; the CUDA context itself stays until process exit."""
        started = time.perf_counter()
        self._gpu_model = None
        self._release_cuda_memory()
        return time.perf_counter() - started

    # ------------------------------------------------------------------ embeddings

    def embed_images(self, paths: Sequence[str | os.PathLike[str]]) -> numpy.ndarray:
        """Embed image files: float32 (n, embedding_dim), rows L2-normalised. Unreadable file → InvalidRequest."""
        if isinstance(paths, (str, bytes, os.PathLike)):
            raise InvalidRequest("embed_images takes a sequence of paths, not one path", details={"paths": str(paths)})
        paths = list(paths)
        return self._embed_chunks(
            len(paths), lambda lo, hi: self._image_batch(_open_rgb(p) for p in paths[lo:hi]), self._encode_images
        )

    def embed_image_arrays(self, shm_name: str, shape: tuple[int, int, int, int]) -> numpy.ndarray:
        """Embed `shape[0]` RGB uint8 images of shape (H, W, 3) laid out back to back in the shared memory block
        `shm_name` (see `write_images_to_shm`). The block is copied out and detached, never unlinked."""
        shape = _check_image_batch_shape(shape)
        pixels = _read_shared_images(shm_name, shape)
        return self._embed_chunks(
            shape[0],
            lambda lo, hi: self._image_batch(Image.fromarray(pixels[i]) for i in range(lo, hi)),
            self._encode_images,
        )

    def embed_texts(self, texts: Sequence[str]) -> numpy.ndarray:
        """Embed texts: float32 (n, embedding_dim), rows L2-normalised; long texts are cut at the context length."""
        if isinstance(texts, str):
            raise InvalidRequest("embed_texts takes a sequence of strings, not one string", details={"texts": texts})
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequest(f"texts[{index}] is not a string: {text!r}", details={"index": index})
        return self._embed_chunks(len(texts), lambda lo, hi: self._tokenizer(texts[lo:hi]), self._encode_texts)

    # ------------------------------------------------------------------ internals

    def _active_model(self) -> torch.nn.Module:
        return self._gpu_model if self._gpu_model is not None else self._master

    def _image_batch(self, images: Iterator[Image.Image]) -> torch.Tensor:
        # Preprocessing stays on the CPU in every mode, so both modes see the same input tensor.
        return torch.stack([self._preprocess(image) for image in images])

    def _encode_images(self, model: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        dtype = self._gpu_dtype if device.type == "cuda" else torch.float32
        return model.encode_image(batch.to(device=device, dtype=dtype))

    def _encode_texts(self, model: torch.nn.Module, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
        return model.encode_text(tokens.to(device))

    def _embed_chunks(
        self,
        count: int,
        make_batch: Callable[[int, int], torch.Tensor],
        encode: Callable[[torch.nn.Module, torch.Tensor, torch.device], torch.Tensor],
    ) -> numpy.ndarray:
        out = numpy.empty((count, self._embedding_dim), numpy.float32)
        model = self._active_model()
        device = next(model.parameters()).device
        failure: tuple[type[Exception], str, int] | None = None
        with torch.inference_mode():
            for lo in range(0, count, _BATCH_SIZE):
                hi = min(lo + _BATCH_SIZE, count)
                batch = make_batch(lo, hi)
                try:
                    features = encode(model, batch, device)
                except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
                    failure = (_runtime_error_kind(exc, PredictionFailed), _first_line(exc), hi - lo)
                    break
                # Normalise in fp32 so fp16/bf16 GPU output is as unit-length as CPU output.
                out[lo:hi] = F.normalize(features.float(), dim=-1).cpu().numpy()
                del features  # may be a CUDA tensor: nothing outlives its batch
        if failure is not None:  # outside the except block: no traceback pins the batch's CUDA tensors
            self._release_cuda_memory()
            error_type, cause, batch_size = failure
            raise error_type(
                f"CLIP failed on a batch of {batch_size} on {device}: {cause}",
                details={"cause": cause, "batch_size": batch_size, "device": str(device)},
            )
        return out

    def _pin_master(self) -> None:
        """Page-lock the CPU master once, so every later CPU→GPU copy is a fast DMA (pinning per move is slower).

        One flat buffer registered in place, never `pin_memory()` per tensor or on the flat buffer: torch's pinned
        allocator rounds each block up to a power of two (T1). Unpinned when registering fails: ~0.6 GB from
        pageable memory costs tens of milliseconds more per move."""
        if self._master_pinned:
            return
        self._master_pinned = True
        buffer = flatten_into_one_buffer(self._master)
        registered = _register_host_memory(buffer)
        log.info("clip.master_flattened", nbytes=buffer.numel(), pinned=registered is None,
                 reason=registered or "one page-locked buffer, the parameters as views")
        if registered is None:
            # Unregister before the buffer's memory goes back to the allocator (the adapter lives as long as its
            # process, so this runs at exit, or when a test drops the adapter).
            weakref.finalize(self, _unregister_host_memory, buffer.data_ptr())

    @staticmethod
    def _release_cuda_memory() -> None:
        """The release sequence of clip-torch-nvml.md §6, run after the last reference to CUDA tensors is gone.
        cuBLAS/cuBLASLt workspaces survive `empty_cache()` (tens of MiB after the first matmul, T2): cleared first."""
        if not torch.cuda.is_initialized():
            return
        gc.collect()  # reference cycles keep tensors alive
        torch.cuda.synchronize()
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # private API: present since torch 1.13
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def flat_layout(tensors: Sequence[torch.Tensor], align: int = _VIEW_ALIGN_BYTES) -> tuple[list[int], int]:
    """Byte offsets of each tensor in one flat buffer (each on an `align` boundary), and the buffer's size."""
    offsets, end = [], 0
    for tensor in tensors:
        start = -(-end // align) * align
        offsets.append(start)
        end = start + tensor.numel() * tensor.element_size()
    return offsets, end


def flatten_into_one_buffer(model: torch.nn.Module) -> torch.Tensor:
    """Move every parameter and buffer of `model` into one flat uint8 host buffer, each becoming a view of it with
    its own dtype, shape and values; returns the buffer. Shared tensors stay shared (each is laid out once)."""
    unique: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        unique.setdefault(id(tensor), tensor)
    tensors = list(unique.values())
    offsets, size = flat_layout([t.data for t in tensors])
    buffer = torch.empty(size, dtype=torch.uint8)
    for tensor, offset in zip(tensors, offsets):
        data = tensor.data.contiguous()
        view = buffer[offset: offset + data.numel() * data.element_size()].view(data.dtype).view(data.shape)
        view.copy_(data)
        tensor.data = view  # the old storage is freed here, one tensor at a time: RAM peaks at about 1x, not 2x
    return buffer


def _register_host_memory(buffer: torch.Tensor) -> str | None:
    """Page-lock `buffer` in place at its exact size (cudaHostRegister); None on success, else why not."""
    if not torch.cuda.is_available():
        return "CUDA unavailable: the master stays in pageable memory"
    code = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0))
    return None if code == 0 else f"cudaHostRegister failed with cudaError {code}: the master stays pageable"


def _unregister_host_memory(pointer: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.cudart().cudaHostUnregister(pointer)


def write_images_to_shm(arrays: numpy.ndarray | Sequence[numpy.ndarray]) -> tuple[SharedMemory, tuple[int, int, int, int]]:
    """Put RGB uint8 images, all (H, W, 3), into a new shared memory block for `embed_image_arrays`.

    Returns the block and the batch shape (n, H, W, 3); pass `block.name` and the shape. The caller owns the
    block: call `block.close()` and `block.unlink()` once the embeddings are back."""
    if isinstance(arrays, numpy.ndarray):
        batch = arrays
    else:
        items = [numpy.asarray(a) for a in arrays]
        if not items:
            raise InvalidRequest("write_images_to_shm needs at least one image")
        if len({a.shape for a in items}) != 1:
            raise InvalidRequest(
                "all images in one shared batch must have the same shape",
                details={"shapes": sorted({str(a.shape) for a in items})},
            )
        batch = numpy.stack(items)
    if batch.dtype != numpy.uint8:
        raise InvalidRequest(f"images must be uint8 RGB, got dtype {batch.dtype}", details={"dtype": str(batch.dtype)})
    shape = _check_image_batch_shape(batch.shape)
    free = shm_free_bytes()
    if free is not None and batch.nbytes > free:
        # SharedMemory(create=True) only reserves: writing past the file system's space is SIGBUS, not an error.
        raise OutOfMemory(
            f"{SHM_DIR} has {free} bytes free; {shape[0]} images need {batch.nbytes}: send fewer images at a time, "
            "file paths, or give the container more (docker run --shm-size=1g)",
            details={"free_bytes": free, "needed_bytes": batch.nbytes, "directory": SHM_DIR},
        )
    block = SharedMemory(create=True, size=batch.nbytes)
    view = numpy.ndarray(shape, numpy.uint8, buffer=block.buf)
    view[...] = batch
    del view  # an exported buffer would make block.close() fail
    return block, shape


def _check_image_batch_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    try:
        dims = tuple(operator.index(d) for d in shape)
        bad_type = any(isinstance(d, bool) for d in shape)
    except TypeError:
        dims, bad_type = (), True
    if bad_type or len(dims) != 4 or min(dims) < 1 or dims[3] != 3:
        raise InvalidRequest(
            f"image batch shape must be (n, height, width, 3) with positive sizes, got {shape!r}",
            details={"shape": repr(shape)},
        )
    return dims  # type: ignore[return-value]


def _read_shared_images(shm_name: str, shape: tuple[int, int, int, int]) -> numpy.ndarray:
    try:
        block = _attach_untracked(shm_name)
    except (FileNotFoundError, ValueError) as exc:
        raise InvalidRequest(
            f"no shared memory block named {shm_name!r}: {exc}", details={"shm_name": shm_name}
        ) from None
    try:
        needed = int(numpy.prod(shape))
        if block.size < needed:
            raise InvalidRequest(
                f"shared memory block {shm_name!r} holds {block.size} bytes; shape {shape} needs {needed}",
                details={"shm_name": shm_name, "size_bytes": block.size, "needed_bytes": needed},
            )
        view = numpy.ndarray(shape, numpy.uint8, buffer=block.buf)
        pixels = view.copy()
        del view
    finally:
        block.close()
    return pixels


_TRACKER_PATCH_LOCK = threading.Lock()


def _attach_untracked(name: str) -> SharedMemory:
    """Attach to a block another process owns without adopting it.

    Before Python 3.13 every attach registers the block with this process's resource tracker, which unlinks it
    when this process exits (CPython gh-82300), destroying the client's images; 3.13 added `track=False`."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    with _TRACKER_PATCH_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = register


def _open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(
            f"cannot read image {str(path)!r}: {type(exc).__name__}: {exc}", details={"path": str(path)}
        ) from None


def _check_model_name(model_name: str) -> None:
    if not isinstance(model_name, str) or not model_name.strip():
        raise InvalidRequest(f"model name must be a non-empty string, got {model_name!r}")
    if model_name.startswith(_NAME_SCHEMES):
        return
    known = open_clip.list_models()
    if model_name in known:
        return
    by_lower = {name.lower(): name for name in known}
    close = [by_lower[n] for n in difflib.get_close_matches(model_name.lower(), list(by_lower), n=5, cutoff=0.6)]
    hint = f"close known names: {', '.join(close)}" if close else "see open_clip.list_models()"
    raise InvalidRequest(
        f"unknown OpenCLIP model {model_name!r}; {hint}",
        details={"model_name": model_name, "close_matches": close},
    )


def _check_pretrained(model_name: str, pretrained: str | None) -> None:
    if pretrained is None or model_name.startswith(_NAME_SCHEMES):
        return
    if not isinstance(pretrained, str) or not pretrained.strip():
        raise InvalidRequest(f"pretrained must be None, a weights tag or a checkpoint path, got {pretrained!r}")
    if os.path.isfile(pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if _tag_key(pretrained) in (_tag_key(tag) for tag in tags):
        return
    raise InvalidRequest(
        f"pretrained {pretrained!r} is neither a weights tag of {model_name!r} nor a checkpoint file; "
        f"tags: {', '.join(tags) or 'none (use pretrained=None or a local checkpoint)'}",
        details={"model_name": model_name, "pretrained": pretrained, "known_tags": list(tags)},
    )


def _tag_key(tag: str) -> str:
    """open_clip's own normalisation of pretrained tags (pretrained.py, T8): `laion2b-s34b-b79k` is valid."""
    return tag.lower().replace("-", "_")


def _create_on_cpu(
    model_name: str, pretrained: str | None, seed: int | None
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], Callable[[list[str]], torch.Tensor]]:
    try:
        # A seed is applied right before creation, inside a forked RNG so the caller's global RNG is untouched.
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, precision="fp32", device="cpu"
            )
        tokenizer = open_clip.get_tokenizer(model_name)
    except ModuleNotFoundError as exc:
        raise LoadFailed(
            f"cannot build OpenCLIP {model_name!r}: it needs the missing module {exc.name!r}",
            details={"model_name": model_name, "missing_module": exc.name, "retryable": False},
        ) from None
    except Exception as exc:  # noqa: BLE001 - every creation failure becomes ours, once (SafetensorError included)
        raise _creation_error(model_name, pretrained, exc) from None
    model.eval()
    model.requires_grad_(False)
    return model, preprocess, tokenizer


def _creation_error(model_name: str, pretrained: str | None, exc: Exception) -> LoadFailed | BackendUnavailable:
    """What creating CLIP failed on, as ours. Weights Hugging Face could not deliver (no network, or HF_HUB_OFFLINE
    with the tag not cached: huggingface_hub's LocalEntryNotFoundError, or its transport error, wrapped by open_clip
    in FileNotFoundError then RuntimeError) may come by themselves: BackendUnavailable, retryable. Anything else (a
    corrupt checkpoint's SafetensorError, a torch checkpoint that does not unpickle, an ImportError deep in torch)
    stays until someone fixes it: LoadFailed, not retryable. Both name the innermost cause and its type."""
    chain = _exception_chain(exc)
    network = next((e for e in chain if _is_network_error(e)), None)
    root = network or chain[-1]
    cause = f"{type(root).__name__}: {_first_line(root)}"
    details = {"model_name": model_name, "pretrained": pretrained, "cause": cause, "cause_type": type(root).__name__}
    if network is not None:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = ("HF_HUB_OFFLINE is set: tags load only from the local Hugging Face cache; pass a checkpoint path"
                if offline else "Hugging Face is unreachable: the weights come once it answers, or pass a checkpoint path")
        return BackendUnavailable(
            f"cannot fetch OpenCLIP {model_name!r} weights pretrained={pretrained!r}: {cause} ({hint})",
            details={**details, "retryable": True})
    what = "checkpoint file" if pretrained is not None and os.path.isfile(pretrained) else "pretrained"
    return LoadFailed(f"cannot load OpenCLIP {model_name!r} with {what} {pretrained!r}: {cause}",
                      details={**details, "retryable": False})


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc`, then what it was raised from or during, innermost last (open_clip re-raises inside `except`)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _is_network_error(exc: BaseException) -> bool:
    """huggingface_hub's own 'not reachable and not cached' error, or the HTTP client's transport errors."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in ("httpx", "httpcore", "requests", "urllib3") and any(
        word in type(exc).__name__ for word in ("Connect", "Timeout", "Network", "Transport", "Protocol"))


def _copy_module(master: torch.nn.Module, device: torch.device, float_dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `master` whose parameters and buffers live on `device` (floating ones cast to `float_dtype`).

    The tensors are copied first and handed to deepcopy through its memo, so only the module structure is
    duplicated on the host, never the weights."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(master.parameters(), master.buffers()):
        dtype = float_dtype if tensor.is_floating_point() else tensor.dtype
        moved = tensor.detach().to(device=device, dtype=dtype, non_blocking=True, copy=True)
        memo[id(tensor)] = torch.nn.Parameter(moved, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else moved
    return copy.deepcopy(master, memo)


def _tensor_bytes(model: torch.nn.Module, float_dtype: torch.dtype) -> int:
    return sum(
        t.numel() * (float_dtype.itemsize if t.is_floating_point() else t.element_size())
        for t in itertools.chain(model.parameters(), model.buffers())
    )


def _embedding_dim(model_name: str, model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor]) -> int:
    config = open_clip.get_model_config(model_name)
    if config and "embed_dim" in config:
        return int(config["embed_dim"])
    with torch.inference_mode():  # hub and local-dir models have no registered config: measure one text
        return int(model.encode_text(tokenizer([""])).shape[-1])


def _cuda_unavailable_reason(device_index: int) -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "torch.cuda.is_available() is False: no NVIDIA driver or no visible device" + (
            f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        )
    count = torch.cuda.device_count()
    if not isinstance(device_index, int) or not 0 <= device_index < count:
        return f"CUDA device index {device_index!r} out of range: {count} device(s) visible"
    return None


def _bf16_supported(device: torch.device) -> bool:
    """Native bf16 (compute capability >= 8.0); torch's default also answers True for emulated bf16."""
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch before 2.3 has no including_emulation (and no emulation check)
            return bool(torch.cuda.is_bf16_supported())


def _runtime_error_kind(exc: RuntimeError, otherwise: type[Exception]) -> type[Exception]:
    """OutOfMemory for torch's OOM and for cuBLAS/cuDNN allocation failures (a plain RuntimeError, or
    torch.AcceleratorError, saying CUBLAS_STATUS_ALLOC_FAILED / CUDNN_STATUS_ALLOC_FAILED; T6)."""
    text = str(exc)
    out_of_memory = isinstance(exc, torch.cuda.OutOfMemoryError) or any(t in text for t in _OOM_TEXTS)
    return OutOfMemory if out_of_memory else otherwise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""A runnable sketch of an agent's ExecutionLoop driving Mai.

    mai start                                   # in one shell (or: mai start --foreground)
    python examples/execution_loop.py --steps 5 # in another

The loop alternates RECORDING (watch the user: VLM descriptions of screenshots) and AUTOPILOT (replay a task:
CLIP embeddings of screen crops, a VLM call now and then). Mai keeps the GPU arranged for each phase; the loop
only says what it is doing and asks for the VLM before using it. Without Ollama the VLM calls fail fast with a
reason (degraded), which the loop reports and survives."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import mai
from messages.errors import MaiError


def screenshot(path: Path, seed: int) -> Path:
    """Stand-in for a real screen grab: a small random RGB image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(path)
    return path


def describe_with_vlm(client: mai.MaiClient, image: Path) -> str:
    import ollama

    with client.vlm(holder="execution-loop", timeout_s=60) as lease:  # loaded on demand, kept while held
        reply = ollama.Client(host=lease.host, timeout=60).chat(
            model=lease.model,
            messages=[{"role": "user", "content": "Describe this screen in one sentence.", "images": [str(image)]}],
            options={"num_ctx": lease.num_ctx},  # the same load options on every request: no silent reload
        )
        return reply.message.content or ""


def run(steps: int) -> None:
    with mai.connect() as client, tempfile.TemporaryDirectory() as tmp:
        for step in range(steps):
            print(f"--- step {step}: RECORDING")
            try:  # without Ollama the VLM cannot load: RECORDING fails fast with the reason, and the loop goes on
                reached = client.set_mode("recording", wait=True, timeout_s=120)
                print(f"recording reached in {reached.duration_s:.2f} s: {list(reached.steps)}")
                shot = screenshot(Path(tmp) / f"rec{step}.png", step)
                print("VLM says:", describe_with_vlm(client, shot))
            except MaiError as err:
                print(f"VLM unavailable ({err.reason.value}): {err}")

            print(f"--- step {step}: AUTOPILOT")
            reached = client.set_mode("autopilot", wait=True, timeout_s=120)  # CLIP only: works without Ollama
            device = client.get_clip_device()
            print(f"autopilot reached in {reached.duration_s:.2f} s; CLIP on {device}")
            if device == "unavailable":  # no CLIP model (weights missing or corrupt): nothing to embed with
                print(f"CLIP unavailable: {device.reason}")
                continue
            crops = np.random.default_rng(step).integers(0, 255, (4, 224, 224, 3), dtype=np.uint8)
            began = time.perf_counter()
            vectors = client.embed_images(crops)  # shared memory, not pickled bytes
            query = client.embed_texts(["the Save button"])[0]
            best = int(np.argmax(vectors @ query))
            print(f"embedded {len(vectors)} crops in {(time.perf_counter() - began) * 1000:.0f} ms; best match crop {best}")
        status = client.get_status()
        print(f"final: mode {status.mode}, VLM {status.vlm.state}, CLIP on {status.clip.device}, "
              f"degraded: {dict(status.degraded) or 'nothing'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    run(parser.parse_args().steps)

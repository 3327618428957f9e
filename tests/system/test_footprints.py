"""Measured footprints on the real actor system (issue 11, item 6): LM Studio reports a model's file size
(`sizeBytes`, real-servers.md L1) while the GPU pays for the file plus its KV cache. After a chat turn loads the
model, `mai models` shows the footprint the coordinator measured from the VRAM readings around the load — what the
simulated GPU ledger charged — marked measured, not the file size."""

from __future__ import annotations

import json

import pytest

from backends.lmstudio import LmStudioAdapter
from mai.conversation import Mai
from mai.sim.gpu_ledger import GpuLedger
from tests.doubles.lmstudio import lmstudio_double
from tests.doubles.ollama import ollama_double
from tests.system.harness import running_mai, wait_for

pytestmark = pytest.mark.slow
GiB = 2**30
BIG = "qwen2.5-7b-instruct"  # catalog: LM Studio, 32768-token context, 5600 MiB declared


def test_mai_models_shows_the_measured_footprint_not_lm_studios_file_size(tmp_path):
    ledger_path = tmp_path / "gpu.sqlite"
    with ollama_double(tmp_path / "ollama", ledger=ledger_path, vram_bytes=16 * GiB) as ollama, \
            lmstudio_double(tmp_path, ledger=str(ledger_path)) as lms:
        sections = {
            "gpu": {"backend": "simulated", "simulated_total_mb": 16384, "simulated_ledger": str(ledger_path),
                    "sample_interval_s": 0.1},
            "ollama": {"host": ollama.host, "retries": 1, "probe_backoff_initial_s": 0.2, "probe_backoff_max_s": 1},
            "lmstudio": {"host": lms.host, "request_timeout_s": 5, "load_timeout_s": 20},
            "chat": {"max_retries": 1, "retry_backoff_s": 0.05, "switch_hysteresis_s": 0, "token_batch_ms": 20},
        }
        with running_mai(tmp_path, **sections) as system, Mai(config=system.config) as m:
            before = {row.key: row for row in m.list_models().rows}
            assert not before[BIG].footprint_learned and before[BIG].footprint_bytes == 5600 * 2**20

            assert f"[mai:{BIG}]" in m.process_message("hello")
            charged = GpuLedger(ledger_path).usage()[f"lmstudio:mai:{BIG}"]
            adapter = LmStudioAdapter(lms.host, request_timeout_s=5, load_timeout_s=20)  # the official SDK
            try:
                file_size = next(i.size_bytes for i in adapter.list_loaded() if i.identifier == f"mai:{BIG}")
            finally:
                adapter.close()
            assert charged > file_size  # the double charges file + KV cache and reports the file

            def measured() -> dict | None:
                cli = system.cli("models", "--json")
                assert cli.returncode == 0, cli.stderr
                row = {r["key"]: r for r in json.loads(cli.stdout)["models"]}[BIG]
                return row if row["footprint_learned"] else None

            row = wait_for(measured, timeout_s=20, interval_s=0.5)
            assert row["footprint_bytes"] == charged and row["footprint_bytes"] != file_size
            assert "(measured)" in system.cli("models").stdout
            status = system.status_json()["gpu"]
            assert status["chat_model"] == BIG and status["chat_footprint_learned"]
            assert status["chat_footprint_bytes"] == charged
            persisted = json.loads((tmp_path / "state" / "footprints.json").read_text())
            assert persisted[f"{BIG}@32768"] == charged  # per model and context length

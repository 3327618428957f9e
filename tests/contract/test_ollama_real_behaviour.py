"""Mai's Ollama adapter, and the official `ollama` client as another program, against the Ollama double over real
sockets, for the behaviours of the real server read at `ollama/ollama@fb30760` (`shared/reference/real-servers.md`
§1: O1-O18): names as Ollama resolves them, silent and slow loads, unloads other clients cancel, evictions Ollama
makes on its own, OOM texts, thinking output, and the defaults a third client gets.

Timings are scaled down by 100: Ollama's load limit of 300 s is 3 s here, Mai's old 120 s read timeout 1.2 s.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Iterator

import httpx
import ollama
import pytest

from actors.vlm_loader import _load_timed_out
from backends.ollama import OOM_MARKERS, OllamaAdapter, is_out_of_memory
from messages.chat import ChatMessage
from messages.errors import Busy, InvalidRequest, ModelNotFound, OperationTimeout, OutOfMemory, Reason
from tests.doubles.ollama import OllamaDouble, ollama_double

GiB = 1024**3
MiB = 1024**2
VLM = "qwen2.5vl:7b"  # 6 GiB in the double's default models
CHAT = "llama3.2:3b"  # 3400 MiB
SMALL = "qwen2.5:0.5b"  # 800 MiB
THINKER = "qwen3:0.6b"  # has the "thinking" capability
TOTAL = 24 * GiB
ALIAS = "vlm-alias:latest"  # `ollama cp qwen2.5vl:7b vlm-alias`: the same manifest
MODELS = [
    {"name": VLM, "size_bytes": 6 * GiB, "capabilities": ["completion", "vision"], "context_length": 128000},
    {"name": "vlm-alias", "alias_of": VLM},
    {"name": CHAT, "size_bytes": 3400 * MiB, "capabilities": ["completion", "tools"], "context_length": 131072},
    {"name": SMALL, "size_bytes": 800 * MiB, "capabilities": ["completion", "tools"], "context_length": 32768},
    {"name": THINKER, "size_bytes": 520 * MiB, "capabilities": ["completion", "thinking"], "context_length": 40960},
]
HELLO = [ChatMessage("user", "Describe the screen.")]


@pytest.fixture(scope="module")
def double(tmp_path_factory) -> Iterator[OllamaDouble]:
    with ollama_double(tmp_path_factory.mktemp("ollama-real"), vram_bytes=TOTAL, models=MODELS) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(double: OllamaDouble) -> None:
    double.reset()


@pytest.fixture
def adapter(double: OllamaDouble) -> Iterator[OllamaAdapter]:
    with OllamaAdapter(double.host, num_ctx=8192, request_timeout_s=2.0, load_timeout_s=3.0) as a:
        yield a


@pytest.fixture
def other(double: OllamaDouble) -> ollama.Client:
    """Another program on the same Ollama (Open WebUI, a script): the official client, its own defaults."""
    return ollama.Client(host=double.host, timeout=10)


def hog(double: OllamaDouble, leave_free_bytes: int) -> None:
    double.ledger.allocate("test:hog", TOTAL - leave_free_bytes)


def unload_requests(double: OllamaDouble) -> list[dict]:
    return [r for r in double.requests("/api/generate") if r["body"].get("keep_alive") == 0]


# -- O1, O2: names -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["Library/Qwen2.5VL:7B", "registry.ollama.ai/library/qwen2.5vl:7b", "QWEN2.5VL:7b"])
def test_any_form_ollama_accepts_loads_and_is_recognised_in_ps(double, adapter, form) -> None:
    state = adapter.load(form)

    assert state.name == VLM and state.digest  # /api/ps prints the shortest form, with the digest
    assert adapter.state_of(form) == state == adapter.state_of(VLM)
    assert double.requests("/api/generate")[-1]["body"]["model"] == form
    with httpx.Client(base_url=double.host) as http:  # the reply echoes the name as sent
        assert http.post("/api/generate", json={"model": form}).json()["model"] == form
    adapter.unload(form)
    assert adapter.loaded() == [] and double.ledger.usage() == {}


def test_a_malformed_name_is_refused_before_any_request(double, adapter) -> None:
    with pytest.raises(InvalidRequest, match="accepted: an Ollama model name"):
        adapter.load("qwen 2.5vl:7b")
    assert double.requests("/api/generate") == []
    with httpx.Client(base_url=double.host) as http:  # the server itself: 400 invalid model name
        bad = http.post("/api/generate", json={"model": "a.b/c.d/vlm:q4"})
    assert (bad.status_code, bad.json()) == (400, {"error": "invalid model name"})


def test_aliases_share_one_runner_listed_under_the_first_loaders_name(double, adapter, other) -> None:
    adapter.load(VLM)
    reply = other.generate(model="Vlm-Alias", keep_alive=-1, options={"num_ctx": 8192})  # the same blob: no load

    assert reply.model == "Vlm-Alias" and reply.done_reason == "load"
    assert len(double.events("load")) == 1 and double.ledger.usage() == {f"ollama:{VLM}": 6 * GiB}
    assert [s.name for s in adapter.loaded()] == [VLM]
    assert adapter.state_of(ALIAS) == adapter.state_of(VLM)  # found by digest, not by name
    assert ALIAS in adapter.installed()


def test_the_chat_catalog_finds_installed_models_in_any_spelling(tmp_path, double) -> None:
    from backends.chat import ChatBackends
    from config import load_config

    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  - {key: Llama3.2:3B, backend: ollama, tier: 1, context_window: 4096, footprint_mb: 3400, capabilities: [chat]}\n"
        "  - {key: library/qwen2.5:0.5b, backend: ollama, tier: 0, context_window: 4096, footprint_mb: 800, "
        "capabilities: [chat]}\n"
        "  - {key: mistral:7b, backend: ollama, tier: 2, context_window: 4096, footprint_mb: 4000, capabilities: [chat]}\n"
        "roles:\n  chat: [Llama3.2:3B, library/qwen2.5:0.5b, mistral:7b]\n")
    user = tmp_path / "mai.yaml"
    user.write_text(f"system: {{models_file: {models}}}\nollama: {{host: '{double.host}'}}\n"
                    "lmstudio: {enabled: false}\n")
    backends = ChatBackends(load_config(user, env={}))
    try:
        installed = backends.availability().installed
        assert {"Llama3.2:3B", "library/qwen2.5:0.5b"} <= installed and "mistral:7b" not in installed
        with OllamaAdapter(double.host, num_ctx=4096) as a:
            a.load("qwen2.5:0.5b")
        assert backends.loaded()["library/qwen2.5:0.5b"] == 800 * MiB
    finally:
        backends.close()


# -- O3, O4, O17, O18: loads ---------------------------------------------------------------------------------------


def test_a_load_longer_than_the_old_limit_succeeds_and_is_hidden_until_done(double, adapter) -> None:
    double.configure(load_time_s=2.0)  # 200 s scaled: past the old 120 s (1.2 s) limit, within Ollama's 300 (3)
    result: dict = {}
    loader = threading.Thread(target=lambda: result.update(state=adapter.load(VLM)))
    began = time.monotonic()
    loader.start()
    time.sleep(0.5)
    with httpx.Client(base_url=double.host) as http:
        assert http.get("/api/ps").json()["models"] == []  # O18: a loading model is not listed
        unload = http.post("/api/generate", json={"model": VLM, "keep_alive": 0}).json()
    assert unload["done_reason"] == "unload"  # answered, and a no-op for a model still loading
    loader.join(timeout=10)

    assert 2.0 <= time.monotonic() - began < 3.0 and result["state"].name == VLM
    assert result["state"].expires_at.year > 2300  # still pinned: the unload during the load did nothing


def test_a_load_writes_nothing_until_it_is_done(double) -> None:
    double.configure(load_time_s=1.0)
    with httpx.Client(base_url=double.host, timeout=5) as http:
        began = time.monotonic()
        with http.stream("POST", "/api/generate", json={"model": VLM, "keep_alive": -1}) as response:
            first = next(response.iter_raw())
            waited = time.monotonic() - began
    assert waited >= 0.95 and b'"done_reason":"load"' in first.replace(b" ", b"")


def test_the_old_timeout_hangs_up_and_ollama_aborts_the_load_so_it_is_not_retried(double) -> None:
    double.configure(load_time_s=2.0)
    with OllamaAdapter(double.host, num_ctx=8192, request_timeout_s=2.0, load_timeout_s=1.2) as old:
        with pytest.raises(OperationTimeout) as info:
            old.load(VLM)
        time.sleep(0.3)
        assert double.events("load_aborted")[-1]["reason"] == "client disconnected"  # O4: the load is gone
        assert old.loaded() == [] and double.ledger.usage() == {}
        assert _load_timed_out(info.value)  # the loader does not retry it with the same timeout
        with pytest.raises(OperationTimeout) as version:
            double.configure(fail_next="hang", hang_s=3.0, fail_paths=["/api/version"])
            old.load(VLM)
        assert not _load_timed_out(version.value)  # a wedged server's short call: worth another try


def test_the_load_is_always_sent_and_re_pins_a_model_someone_unpinned(double, adapter, other) -> None:
    adapter.load(VLM)
    other.chat(model=VLM, messages=[{"role": "user", "content": "hi"}], keep_alive="5m",
               options={"num_ctx": 8192})  # same options: no reload, but un-pinned
    assert adapter.state_of(VLM).expires_at - datetime.now(timezone.utc) < timedelta(seconds=301)
    assert not adapter.state_of(VLM).pinned  # what the loader reports (VlmObserved.pinned)

    state = adapter.load(VLM)

    assert state.pinned and state.expires_at.year > 2300 and len(double.events("load")) == 1
    assert len(double.requests("/api/generate")) == 2


# -- O5, O6, O8: unloads ---------------------------------------------------------------------------------------------


def _chat_in_background(client: ollama.Client, **kwargs) -> threading.Thread:
    def run() -> None:
        for _ in client.chat(model=VLM, messages=[{"role": "user", "content": "a long answer please"}],
                             stream=True, options={"num_ctx": 8192}, **kwargs):
            pass

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_an_unload_another_client_cancels_is_sent_again(double, adapter, other) -> None:
    adapter.load(VLM)
    double.configure(token_delay_s=0.1)
    busy = _chat_in_background(other)  # in flight: the unload waits for it (O5)
    time.sleep(0.2)
    result: dict = {}
    unloading = threading.Thread(target=lambda: result.update(waited=adapter.unload(VLM, wait_gone_s=20)))
    unloading.start()
    time.sleep(0.2)
    reviver = _chat_in_background(other, keep_alive="10m")  # O6: carries keep_alive, cancels the unload
    busy.join(timeout=10), reviver.join(timeout=10), unloading.join(timeout=20)

    assert result["waited"] < 5.0 and adapter.state_of(VLM) is None
    assert len(unload_requests(double)) == 2  # the first, cancelled; the second, after expires_at moved


def test_another_client_that_keeps_reviving_the_model_fails_the_unload_fast(double, adapter, other) -> None:
    adapter.load(VLM)
    double.configure(token_delay_s=0.01, load_time_s=0.01, unload_delay_s=0.2)
    stop = threading.Event()

    def keep_using() -> None:  # an agent's UI polling the VLM without pause, each request re-pinning it for 10m
        while not stop.is_set():
            for _ in other.chat(model=VLM, messages=[{"role": "user", "content": "again"}], stream=True,
                                options={"num_ctx": 8192}, keep_alive="10m"):
                pass

    users = [threading.Thread(target=keep_using) for _ in range(2)]
    for user in users:
        user.start()
    try:
        time.sleep(0.3)
        began = time.monotonic()
        with pytest.raises(Busy) as info:
            adapter.unload(VLM, wait_gone_s=20)
        assert time.monotonic() - began < 5.0  # never a silent poll until the timeout
        assert "another client" in str(info.value) and info.value.details["resends"] == 3
    finally:
        stop.set()
        for user in users:
            user.join(timeout=10)


def test_unloading_a_model_removed_while_loaded_is_reported_stuck(double, adapter) -> None:
    adapter.load(SMALL)
    double.remove(SMALL)  # `ollama rm` while loaded (ollama/ollama#4443)
    began = time.monotonic()
    with pytest.raises(ModelNotFound) as info:
        adapter.unload(SMALL, wait_gone_s=20)
    assert time.monotonic() - began < 1.0
    assert "stuck" in str(info.value) and info.value.details["stuck"] is True
    assert [s.name for s in adapter.loaded()] == [SMALL]
    assert adapter.unload("never-installed:1b") < 0.5  # not listed either: nothing to do


# -- O9-O11: evictions Ollama makes on its own ------------------------------------------------------------------------


def test_another_clients_load_that_fails_the_80_percent_rule_evicts_the_pinned_vlm(double, adapter, other) -> None:
    hog(double, leave_free_bytes=10 * GiB)
    adapter.load(VLM)  # 4 GiB free now
    other.generate(model=CHAT, keep_alive="5m")  # 3400 MiB fits in 4096 but not in 80 % of it

    assert [(e["model"], e["for_model"], e["reason"]) for e in double.events("evict")] == [(VLM, CHAT, "vram")]
    assert adapter.state_of(VLM) is None and [s.name for s in adapter.loaded()] == [CHAT]


def test_a_load_oom_beside_others_evicts_them_all_and_retries_once(double, adapter, other) -> None:
    adapter.load(VLM)
    other.generate(model=SMALL, keep_alive=-1)
    double.configure(fail_next="oom", fail_paths=["/api/generate"])
    reply = other.generate(model=CHAT, keep_alive="5m")  # runs out of memory once, then loads alone

    assert reply.done_reason == "load"
    assert [sorted(e["models"]) for e in double.events("evict_all")] == [sorted([VLM, SMALL])]
    assert adapter.state_of(VLM) is None and [s.name for s in adapter.loaded()] == [CHAT]


def test_a_runtime_oom_expires_every_runner(double, adapter, other) -> None:
    adapter.load(VLM)
    other.generate(model=SMALL, keep_alive=-1)
    double.configure(fail_next="oom", fail_paths=["/api/chat"])
    with pytest.raises(OutOfMemory) as info:
        list(adapter.chat_stream(SMALL, HELLO))
    assert info.value.details["status_code"] == -1 and info.value.reason is Reason.INSUFFICIENT_VRAM

    deadline = time.monotonic() + 3
    while adapter.loaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert adapter.loaded() == [] and double.events("expire_all")[0]["reason"] == "runtime_oom"


# -- O14: OOM texts ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "llama-server reported out-of-memory during startup: CUDA error: Out Of Memory",
    "ggml_vulkan: out of device memory", "cudaMalloc failed: oops", "hipMalloc failed", "Failed to allocate buffer",
    "graph buffer allocation failed", "Not enough memory", "insufficient memory for the KV cache",
    "VK_ERROR_OUT_OF_DEVICE_MEMORY", "vk::Device::allocateMemory: ErrorOutOfDeviceMemory",
    "CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", "CUDNN_STATUS_ALLOC_FAILED",
    "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
])
def test_every_oom_text_is_out_of_memory(text) -> None:
    assert is_out_of_memory(text)


def test_ollamas_ten_substrings_are_all_recognised() -> None:
    ten = ("out of memory", "out of device memory", "cudaMalloc failed", "hipMalloc failed", "failed to allocate",
           "allocation failed", "not enough memory", "insufficient memory", "vk_error_out_of_device_memory",
           "erroroutofmemory")  # llm/status.go:85-96
    assert {t.lower() for t in ten} <= set(OOM_MARKERS)
    assert not is_out_of_memory("llama runner process has terminated: exit status 2")


def test_the_double_varies_its_oom_texts_and_each_is_insufficient_vram(double, adapter) -> None:
    texts = set()
    for _ in range(6):
        double.configure(fail_next="oom", fail_paths=["/api/generate"])
        with pytest.raises(OutOfMemory) as info:
            adapter.load(VLM)
        assert info.value.reason is Reason.INSUFFICIENT_VRAM and info.value.details["status_code"] == 500
        texts.add(info.value.details["error"])
    assert len(texts) == 6 and all(t.startswith("llama-server reported out-of-memory during startup: ") for t in texts)


# -- O15, O16: thinking, and a third client's defaults ----------------------------------------------------------------


def test_a_thinking_model_streams_its_reasoning_before_the_content(double, other) -> None:
    chunks = list(other.chat(model=THINKER, messages=[{"role": "user", "content": "why?"}], stream=True))
    thinking = [c.message.thinking for c in chunks if c.message.thinking]
    content = [c.message.content for c in chunks if c.message.content]
    first_content = next(i for i, c in enumerate(chunks) if c.message.content)
    assert thinking and content and all(not c.message.thinking for c in chunks[first_content:])
    assert "".join(thinking) == f"[{THINKER}] thinking about: why?"

    quiet = list(other.chat(model=THINKER, messages=[{"role": "user", "content": "why?"}], stream=True, think=False))
    assert not any(c.message.thinking for c in quiet)
    assert other.generate(model=THINKER, prompt="why?").thinking == f"[{THINKER}] thinking about: why?"
    with pytest.raises(ollama.ResponseError) as info:
        other.chat(model="Llama3.2:3B", messages=[{"role": "user", "content": "hi"}], think=True)
    assert (info.value.status_code, info.value.error) == (400, '"Llama3.2:3B" does not support thinking')


def test_a_third_client_gets_the_tiered_num_ctx_and_five_minutes(double, adapter, other) -> None:
    adapter.load(VLM)  # Mai: num_ctx 8192, pinned
    other.chat(model=VLM, messages=[{"role": "user", "content": "hi"}])  # no options, no keep_alive

    state = adapter.state_of(VLM)
    assert state.context_length == 32768  # 24 GiB of VRAM: 32k (routes.go:2050-2056)
    assert timedelta(seconds=290) < state.expires_at - datetime.now(timezone.utc) < timedelta(seconds=301)
    assert [e["new_options"] for e in double.events("reload")] == [{"num_ctx": 32768}]


def test_the_tiered_num_ctx_follows_the_vram_and_the_training_context(tmp_path) -> None:
    models = [{"name": "tiny", "size_bytes": 100 * MiB, "context_length": 2048},
              {"name": "big", "size_bytes": 100 * MiB, "context_length": 131072}]
    for vram, expected in ((12 * GiB, {"tiny:latest": 2048, "big:latest": 4096}),
                           (48 * GiB, {"tiny:latest": 2048, "big:latest": 131072})):
        with ollama_double(tmp_path / str(vram), ledger=True, vram_bytes=vram, models=models) as small:
            client = ollama.Client(host=small.host)
            for name in expected:
                client.generate(model=name)
            assert {m.model: m.context_length for m in client.ps().models} == expected

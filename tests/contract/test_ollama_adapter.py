"""The Ollama adapter drives the real `ollama` client over real sockets against the Ollama double.

One double process serves the whole module (reset before each test); each test builds its own adapter. The
double's request log shows what went on the wire; its GPU ledger shows what happened to the simulated VRAM.
"""

from __future__ import annotations

import base64
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Iterator

import httpx
import pytest

from backends.ollama import OllamaAdapter
from mai.sim.gpu_ledger import overlapping_operations
from mai.sim.ollama_server import chat_reply, image_digest
from messages.chat import ChatMessage, FragmentKind
from messages.errors import (
    BackendUnavailable,
    Busy,
    ConnectionLost,
    InvalidRequest,
    LoadFailed,
    MaiError,
    ModelNotFound,
    OperationTimeout,
    OutOfMemory,
    PredictionFailed,
)
from tests.doubles.ollama import OllamaDouble, ollama_double

GiB = 1024**3
MiB = 1024**2
VLM = "qwen2.5vl:7b"  # 6 GiB in the double's default models
CHAT = "llama3.2:3b"  # 3400 MiB
SMALL = "qwen2.5:0.5b"  # 800 MiB
TOTAL = 24 * GiB
HISTORY = [
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "My name is Ada."),
    ChatMessage("assistant", "Hello Ada."),
    ChatMessage("user", "What is my name?"),
]


@pytest.fixture(scope="module")
def double(tmp_path_factory) -> Iterator[OllamaDouble]:
    with ollama_double(tmp_path_factory.mktemp("ollama"), vram_bytes=TOTAL) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(double: OllamaDouble) -> None:
    if double.process is None or double.process.poll() is not None:
        double.start()
    double.reset()


@pytest.fixture
def adapter(double: OllamaDouble) -> Iterator[OllamaAdapter]:
    with OllamaAdapter(double.host, num_ctx=8192, request_timeout_s=2.0, load_timeout_s=5.0) as a:
        yield a


def hog(double: OllamaDouble, leave_free_bytes: int) -> None:
    """Another GPU user (CLIP, say) takes all but `leave_free_bytes` of the simulated GPU."""
    double.ledger.allocate("test:hog", TOTAL - leave_free_bytes)


def text_of(fragments) -> str:
    """The reply: the CONTENT fragments joined (thinking is not part of it)."""
    return "".join(f.text for f in fragments if f.kind is FragmentKind.CONTENT)


def bodies(double: OllamaDouble, path: str) -> list[dict]:
    return [r["body"] for r in double.requests(path)]


# -- queries ----------------------------------------------------------------------------------------------------


def test_version_tags_and_show(adapter: OllamaAdapter) -> None:
    assert adapter.version() == "0.33.0"
    assert {VLM, CHAT, SMALL} <= set(adapter.installed())
    vlm = adapter.show(VLM)
    assert vlm.has_vision and "completion" in vlm.capabilities and vlm.context_length == 128000
    assert not adapter.show(CHAT).has_vision
    assert adapter.loaded() == [] and adapter.state_of(VLM) is None


def test_unknown_model_is_model_not_found_naming_host_and_model(double, adapter) -> None:
    for call in (lambda: adapter.show("nope:1b"), lambda: adapter.load("nope:1b"),
                 lambda: list(adapter.chat_stream("nope:1b", HISTORY))):
        with pytest.raises(ModelNotFound) as info:
            call()
        assert double.host in str(info.value) and "nope:1b" in str(info.value)
        assert info.value.details["status_code"] == 404


# -- load / unload ----------------------------------------------------------------------------------------------


def test_load_pins_the_model_with_the_load_options_and_takes_vram(double, adapter) -> None:
    state = adapter.load(VLM)

    assert bodies(double, "/api/generate") == [
        {"model": VLM, "stream": False, "options": {"num_ctx": 8192}, "keep_alive": -1.0}
    ]
    assert (state.name, state.size_bytes, state.size_vram_bytes) == (VLM, 6 * GiB, 6 * GiB)
    assert not state.partial_offload and state.context_length == 8192
    assert state.expires_at.year > 2300  # keep-alive forever
    assert [s.name for s in adapter.loaded()] == [VLM]

    assert double.ledger.usage() == {f"ollama:{VLM}": 6 * GiB}
    marks = [(e.kind, e.op) for e in double.ledger.events() if e.owner == f"ollama:{VLM}"]
    assert marks == [("begin", "load"), ("alloc", "allocate"), ("end", "load")]


def test_unload_answers_first_and_waits_until_the_model_left_ps(double, adapter) -> None:
    adapter.load(VLM)
    double.configure(unload_delay_s=0.3)

    waited = adapter.unload(VLM, poll_s=0.05)

    assert 0.25 <= waited < 2.0
    assert bodies(double, "/api/generate")[-1] == {"model": VLM, "stream": False, "keep_alive": 0.0}
    unload_at = double.requests("/api/generate")[-1]["t"]
    assert len([r for r in double.requests("/api/ps") if r["t"] > unload_at]) >= 3  # still listed for a while
    assert adapter.loaded() == [] and double.ledger.usage() == {}
    assert [(e.kind, e.op) for e in double.ledger.events()][-3:] == [
        ("begin", "unload"), ("free", "released"), ("end", "unload")
    ]
    # Idempotent: not loaded, or not even installed.
    assert adapter.unload(VLM) < 0.5
    assert adapter.unload("never-installed:1b") < 0.5


def test_unload_times_out_when_the_model_stays_listed(double, adapter) -> None:
    adapter.load(SMALL)
    double.configure(unload_delay_s=2.0)
    with pytest.raises(OperationTimeout) as info:
        adapter.unload(SMALL, wait_gone_s=0.2, poll_s=0.05)
    assert double.host in str(info.value) and SMALL in str(info.value)


def test_load_options_are_identical_on_every_request(double, adapter) -> None:
    with OllamaAdapter(double.host, num_ctx=8192, extra_options={"num_batch": 256}) as tuned:
        tuned.load(VLM)
        text_of(tuned.chat_stream(VLM, HISTORY))
        text_of(tuned.chat_stream(VLM, HISTORY[:2], keep_alive="10m"))
        tuned.load(VLM)
        sent = [b["options"] for b in bodies(double, "/api/generate") + bodies(double, "/api/chat")]
        assert sent == [tuned.load_options] * 4 == [{"num_ctx": 8192, "num_batch": 256}] * 4
        assert double.events("reload") == [] and len(double.events("load")) == 1

    # Why it matters: one client with another num_ctx makes Ollama silently reload the model.
    text_of(adapter.chat_stream(VLM, HISTORY))
    assert [e["new_options"] for e in double.events("reload")] == [{"num_ctx": 8192}]
    assert adapter.state_of(VLM).context_length == 8192


def test_lone_model_that_does_not_fit_is_partially_offloaded(double, adapter) -> None:
    hog(double, leave_free_bytes=4 * GiB)
    state = adapter.load(VLM)
    assert state.partial_offload and state.size_vram_bytes == 4 * GiB and state.size_bytes == 6 * GiB
    assert double.ledger.snapshot().free_bytes == 0


def test_load_without_enough_vram_is_out_of_memory(double, adapter) -> None:
    hog(double, leave_free_bytes=1 * GiB)  # less than the share a partial offload needs
    with pytest.raises(OutOfMemory) as info:
        adapter.load(VLM)
    assert double.host in str(info.value) and VLM in str(info.value)
    assert info.value.details["status_code"] == 500
    assert adapter.loaded() == [] and f"ollama:{VLM}" not in double.ledger.usage()
    assert [e.kind for e in double.ledger.events() if e.owner == f"ollama:{VLM}"] == ["begin", "oom", "end"]


def test_eviction_takes_the_shortest_keep_alive_first(double, adapter) -> None:
    hog(double, leave_free_bytes=11 * GiB)
    text_of(adapter.chat_stream(CHAT, HISTORY, keep_alive="10m"))  # 3400 MiB
    text_of(adapter.chat_stream(SMALL, HISTORY, keep_alive="5m"))  # 800 MiB -> 7064 MiB free

    adapter.load(VLM)  # 6144 MiB fits in 7064 but not in 80 % of it (5651): one model must go (sched.go:549-550)

    assert [(e["model"], e["for_model"]) for e in double.events("evict")] == [(SMALL, VLM)]
    assert {s.name for s in adapter.loaded()} == {VLM, CHAT}
    assert set(double.ledger.usage()) == {"test:hog", f"ollama:{VLM}", f"ollama:{CHAT}"}


# -- chat -------------------------------------------------------------------------------------------------------


def test_chat_streams_fragments_derived_from_the_whole_history(double, adapter) -> None:
    fragments = list(adapter.chat_stream(CHAT, HISTORY))

    wire = [{"role": m.role, "content": m.content} for m in HISTORY]
    assert len(fragments) > 3
    assert text_of(fragments) == chat_reply(CHAT, wire)
    assert "messages=4" in text_of(fragments) and "last_user=What is my name?" in text_of(fragments)
    body = bodies(double, "/api/chat")[-1]
    assert body["messages"] == wire and body["stream"] is True and body["keep_alive"] == -1.0
    assert body["options"] == {"num_ctx": 8192}


def test_chat_with_images_sends_them_with_the_last_user_message(double, adapter) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    already_b64 = base64.b64encode(b"second image").decode()

    reply = text_of(adapter.chat_stream(VLM, HISTORY, images=[png, already_b64]))

    sent = bodies(double, "/api/chat")[-1]["messages"]
    assert sent[-1]["images"] == [base64.b64encode(png).decode(), already_b64]
    assert all("images" not in m for m in sent[:-1])
    assert reply == chat_reply(VLM, sent)
    assert f"images=2 image_digest={image_digest(sent[-1]['images'])}" in reply


def test_chat_rejects_empty_history_and_images_without_user(adapter) -> None:
    with pytest.raises(InvalidRequest):
        adapter.chat_stream(CHAT, [])
    with pytest.raises(InvalidRequest):
        adapter.chat_stream(VLM, [ChatMessage("system", "x")], images=[b"img"])
    with pytest.raises(InvalidRequest):
        adapter.chat_stream(VLM, HISTORY, images=["/no/such/picture.png"])


def test_bad_keep_alive_string_is_invalid_request(double, adapter) -> None:
    with pytest.raises(InvalidRequest) as info:
        list(adapter.chat_stream(CHAT, HISTORY, keep_alive="300"))
    assert 'time: missing unit in duration "300"' in str(info.value)
    assert double.requests("/api/chat")[-1]["status"] == 400


# -- faults -----------------------------------------------------------------------------------------------------


def _load(a: OllamaAdapter) -> object:
    return a.load(VLM)


def _chat(a: OllamaAdapter) -> object:
    return list(a.chat_stream(VLM, HISTORY))


@pytest.mark.parametrize(
    ("fault", "call", "expected"),
    [
        ("oom", _load, OutOfMemory),
        ("oom", _chat, OutOfMemory),
        ("error500", _load, LoadFailed),
        ("error500", _chat, PredictionFailed),
        ("busy", _load, Busy),
        ("busy", _chat, Busy),
        ("notfound", _load, ModelNotFound),
        ("midstream", _chat, PredictionFailed),
        ("drop", _load, ConnectionLost),
        ("drop", _chat, ConnectionLost),
    ],
)
def test_injected_faults_are_translated(double, adapter, fault, call, expected) -> None:
    double.configure(fail_next=fault)
    with pytest.raises(expected) as info:
        call(adapter)
    assert type(info.value) is expected
    assert double.host in str(info.value) and VLM in str(info.value)
    assert double.requests()[-1]["fault"] == fault
    call(adapter)  # the fault was for one request only


def test_midstream_error_comes_after_some_fragments(double, adapter) -> None:
    double.configure(fail_next="midstream")
    received = []
    with pytest.raises(PredictionFailed) as info:
        for fragment in adapter.chat_stream(CHAT, HISTORY):
            received.append(fragment)
    assert len(received) == 2 and info.value.details["status_code"] == -1
    assert double.requests("/api/chat")[-1]["status"] == 200


@pytest.mark.parametrize("path", ["/api/ps", "/api/generate", "/api/chat"])
def test_hang_past_the_timeout_is_operation_timeout(double, path) -> None:
    double.configure(fail_next="hang", hang_s=5.0, fail_paths=[path])
    with OllamaAdapter(double.host, num_ctx=8192, request_timeout_s=0.3, load_timeout_s=0.3) as impatient:
        call = {"/api/ps": impatient.loaded, "/api/generate": lambda: impatient.load(VLM),
                "/api/chat": lambda: list(impatient.chat_stream(VLM, HISTORY))}[path]
        started = time.monotonic()
        with pytest.raises(OperationTimeout) as info:
            call()
    assert time.monotonic() - started < 2.0
    assert double.host in str(info.value) and info.value.details["timeout_s"] == 0.3


def test_server_down_is_backend_unavailable_naming_the_host(double, adapter) -> None:
    adapter.load(SMALL)
    double.kill()
    assert double.ledger.usage() == {}  # the dead server's VRAM came back
    calls = [adapter.version, adapter.loaded, adapter.installed, lambda: adapter.show(VLM),
             lambda: adapter.load(VLM), lambda: adapter.unload(VLM), lambda: list(adapter.chat_stream(VLM, HISTORY))]
    for call in calls:
        with pytest.raises(BackendUnavailable) as info:
            call()
        assert double.host in str(info.value)

    double.restart()
    assert adapter.version() == "0.33.0" and adapter.loaded() == []  # a restarted server has nothing loaded


def test_errors_survive_pickling_across_actor_boundaries(double, adapter) -> None:
    import pickle

    with pytest.raises(MaiError) as info:
        adapter.load("nope:1b")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is ModelNotFound and copy.details == info.value.details


# -- the double itself ------------------------------------------------------------------------------------------


def test_double_wire_framing_and_errors(double) -> None:
    with httpx.Client(base_url=double.host, timeout=5) as http:
        assert http.get("/").text == "Ollama is running"
        assert http.head("/").status_code == 200
        assert http.get("/nope").text == "404 page not found"
        assert http.get("/api/chat").status_code == 405
        missing = http.post("/api/chat", content=b"")
        assert (missing.status_code, missing.json()) == (400, {"error": "missing request body"})
        assert http.post("/api/chat", content=b"{nope").status_code == 400
        bad = http.post("/api/generate", json={"model": VLM, "keep_alive": "300"})
        assert (bad.status_code, bad.json()) == (400, {"error": 'time: missing unit in duration "300"'})
        assert http.post("/api/generate", json={"model": VLM, "keep_alive": True}).json() == {
            "error": "Unsupported type: 'bool'"
        }
        embed = http.post("/api/chat", json={"model": "nomic-embed-text", "messages": [{"role": "user"}]})
        assert (embed.status_code, embed.json()) == (400, {"error": '"nomic-embed-text" does not support chat'})  # as sent

        # stream defaults to true: NDJSON, one object per line, role in every chunk, durations in the last.
        hello = {"model": SMALL, "messages": [{"role": "user", "content": "hi"}]}
        with http.stream("POST", "/api/chat", json=hello) as r:
            assert r.headers["content-type"] == "application/x-ndjson"
            assert r.headers["transfer-encoding"] == "chunked"
            lines = list(r.iter_lines())
        assert all(line.strip() for line in lines)
        chunks = [httpx.Response(200, content=line).json() for line in lines]
        assert all(c["message"]["role"] == "assistant" for c in chunks)
        assert [c["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1]["done_reason"] == "stop" and chunks[-1]["total_duration"] > 0

        generated = http.post("/api/generate", json={"model": SMALL, "prompt": "Why?", "stream": False}).json()
        assert generated["done"] and generated["response"].startswith(f"[{SMALL}] prompt=Why?")


def test_double_expires_at_follows_keep_alive(double, adapter) -> None:
    double.configure(unload_delay_s=0.4)
    now = datetime.now(timezone.utc)

    text_of(adapter.chat_stream(CHAT, HISTORY, keep_alive="10m"))
    expires = adapter.state_of(CHAT).expires_at
    assert timedelta(seconds=590) < expires - now < timedelta(seconds=610)  # end of request + keep_alive

    adapter.load(CHAT)  # -1: pinned
    assert adapter.state_of(CHAT).expires_at.year > 2300
    text_of(adapter.chat_stream(CHAT, HISTORY, keep_alive="5m"))  # the last keep_alive sent wins
    assert adapter.state_of(CHAT).expires_at - datetime.now(timezone.utc) < timedelta(seconds=301)

    with httpx.Client(base_url=double.host) as http:  # unload: expires_at is now, still listed while stopping
        assert http.post("/api/generate", json={"model": CHAT, "keep_alive": 0}).json()["done_reason"] == "unload"
    stopping = adapter.state_of(CHAT)
    assert stopping is not None and stopping.expires_at <= datetime.now(timezone.utc)


def test_double_idle_timer_unloads_after_keep_alive(double, adapter) -> None:
    text_of(adapter.chat_stream(SMALL, HISTORY, keep_alive=0.2))  # numbers are seconds
    assert adapter.state_of(SMALL) is not None
    deadline = time.monotonic() + 3
    while adapter.state_of(SMALL) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert adapter.state_of(SMALL) is None
    assert [e["model"] for e in double.events("expire")] == [SMALL]
    assert double.ledger.usage() == {}


def test_double_loads_one_model_at_a_time(double) -> None:
    double.configure(load_time_s=0.2)
    adapters = [OllamaAdapter(double.host, num_ctx=4096) for _ in range(3)]
    threads = [threading.Thread(target=a.load, args=(m,)) for a, m in zip(adapters, (VLM, CHAT, SMALL))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert time.monotonic() - started >= 0.6
    assert {s.name for s in adapters[0].loaded()} == {VLM, CHAT, SMALL}
    events = double.ledger.events()
    assert len([e for e in events if e.kind == "begin"]) == 3 and overlapping_operations(events) == []
    for a in adapters:
        a.close()


def test_double_with_custom_models_and_private_vram(tmp_path) -> None:
    big = {"name": "big-vlm", "size_bytes": 10 * GiB, "capabilities": ["completion", "vision"],
           "context_length": 32768, "family": "mllama"}
    with ollama_double(tmp_path, ledger=False, vram_bytes=8 * GiB, models=[big]) as private:
        assert private.ledger is None
        with OllamaAdapter(private.host, num_ctx=4096) as a:
            assert a.installed() == ["big-vlm:latest"] and a.show("big-vlm").has_vision
            state = a.load("big-vlm")  # found under its ":latest" name
            assert state.name == "big-vlm:latest" and state.partial_offload
            assert state.size_vram_bytes == 8 * GiB and state.context_length == 4096

"""Contract: `backends.lmstudio.LmStudioAdapter` drives the REAL lmstudio SDK over real sockets against the LM Studio
double running in its own process. What the double received (its frame log) proves what the SDK sent."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest

from backends.lmstudio import LmsDownloadedModel, LmsInstance, LmStudioAdapter, merge_same_role
from mai.sim.lmstudio_server import GUARDRAIL_TEXT, reasoning_for, reply_for
from messages.chat import ChatMessage, FragmentKind
from messages.errors import (
    BackendUnavailable,
    Cancelled,
    ConnectionLost,
    InvalidRequest,
    LoadFailed,
    ModelNotFound,
    OperationTimeout,
    OutOfMemory,
    PredictionFailed,
)
from tests.doubles.lmstudio import LmStudioDoubleProcess, lmstudio_double
from mai.sim.ports import free_port

QWEN7 = "qwen2.5-7b-instruct"
QWEN3 = "qwen2.5-3b-instruct"
GUARDRAIL_START = GUARDRAIL_TEXT.split("{")[0]  # "Model loading was stopped ... approximately "

HISTORY = [
    ChatMessage("system", "You are Mai."),
    ChatMessage("user", "My cat is called Tofu."),
    ChatMessage("assistant", "Nice name!"),
    ChatMessage("user", "Remember that."),
    ChatMessage("user", "What is my cat called?"),
]


def text_of(fragments) -> str:
    """The reply: the CONTENT fragments joined (reasoning is not part of it)."""
    return "".join(f.text for f in fragments if f.kind is FragmentKind.CONTENT)


def expected_reply(identifier: str, history: list[ChatMessage]) -> str:
    return reply_for(identifier, [(m.role, m.content) for m in merge_same_role(history)])


@pytest.fixture(scope="module")
def double(tmp_path_factory: pytest.TempPathFactory):
    # 8000 MiB: the 7B (5.6 GB + context) fits alone, not together with the 3B.
    with lmstudio_double(tmp_path_factory.mktemp("lms"), vram_mb=8000, load_time_s=0.04) as started:
        yield started


@pytest.fixture(autouse=True)
def clean_double(request: pytest.FixtureRequest):
    if "double" in request.fixturenames:
        request.getfixturevalue("double").reset()
    yield


@pytest.fixture
def adapter(double: LmStudioDoubleProcess):
    made = LmStudioAdapter(double.host, request_timeout_s=5.0, load_timeout_s=5.0)
    yield made
    made.close()


@pytest.fixture
def loaded(adapter: LmStudioAdapter) -> str:
    adapter.load(QWEN3, "mai-chat", context_length=4096)
    return "mai-chat"


def wait_for(probe, timeout_s: float = 2.0):
    """The double logs a frame when its loop reads it, which may be just after our call returned."""
    deadline = time.monotonic() + timeout_s
    while not (result := probe()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return result


def load_fields(param: dict) -> list[dict]:
    return [f for layer in param["loadConfigStack"]["layers"] for f in layer["config"]["fields"]]


# --- connecting --------------------------------------------------------------------------------------------------


def test_probe_answers_from_the_greeting_without_opening_a_websocket(double, adapter):
    adapter.probe()
    assert double.log() == []


def test_probe_and_calls_raise_backend_unavailable_when_nothing_listens():
    host = f"127.0.0.1:{free_port()}"
    adapter = LmStudioAdapter(host)
    with pytest.raises(BackendUnavailable, match=host):
        adapter.probe()
    with pytest.raises(BackendUnavailable, match=host) as caught:
        adapter.list_loaded()
    assert caught.value.details["host"] == host
    assert str(caught.value).count("not reachable") == 1  # `mai status` says it once, with the URL tried
    adapter.close()


def test_a_host_that_does_not_answer_says_how_to_start_lm_studios_server():
    host = f"127.0.0.1:{free_port()}"
    adapter = LmStudioAdapter(host)
    try:
        for call in (adapter.probe, adapter.list_downloaded, adapter.list_loaded):
            with pytest.raises(BackendUnavailable) as caught:
                call()
            assert str(caught.value).startswith(
                f"LM Studio at {host} is not serving: start its server with `lms server start`, or in LM Studio's "
                "Developer tab (Status: Running)")
    finally:
        adapter.close()


@pytest.mark.parametrize(
    "host",
    ["http://127.0.0.1:1234", "ws://127.0.0.1:1234", "127.0.0.1", "127.0.0.1:1234/llm", "", ":1234",
     "127.0.0.1:0", "127.0.0.1:99999", " 127.0.0.1:1234", None],
)
def test_host_must_be_host_colon_port(host):
    with pytest.raises(InvalidRequest, match="host:port"):
        LmStudioAdapter(host)  # type: ignore[arg-type]


def test_an_api_token_is_refused_because_sdk_1_5_cannot_send_one():
    with pytest.raises(InvalidRequest, match="API token"):
        LmStudioAdapter("127.0.0.1:1234", api_token="sk-lm-abcdefgh:abcdefghijklmnopqrst")


def test_auth_refusal_is_backend_unavailable(double, adapter):
    double.configure(auth_refuse="Authentication required")
    with pytest.raises(BackendUnavailable, match="refused"):
        adapter.list_loaded()
    double.configure(auth_refuse=None)
    assert adapter.list_loaded() == []


# --- listing -----------------------------------------------------------------------------------------------------


def test_list_downloaded_reports_sizes_context_and_vision(adapter):
    models = {m.key: m for m in adapter.list_downloaded()}
    assert models[QWEN7] == LmsDownloadedModel(QWEN7, 5_600_000_000, 32768, False)
    assert models[QWEN3].size_bytes == 2_600_000_000
    assert models["qwen2.5-vl-7b-instruct"].vision is True


def test_list_loaded_reports_context_and_size_from_the_wire(adapter):
    assert adapter.list_loaded() == []
    adapter.load(QWEN3, "mai-a", context_length=2048)
    assert adapter.list_loaded() == [LmsInstance("mai-a", QWEN3, 2048, 2_600_000_000)]


# --- loading -----------------------------------------------------------------------------------------------------


def test_load_sends_our_identifier_ttl_and_context_length_and_reports_progress(double, adapter):
    progress: list[float] = []
    instance = adapter.load(QWEN7, "mai-chat-1", context_length=4096, ttl_s=300, on_progress=progress.append)

    assert instance == LmsInstance("mai-chat-1", QWEN7, 4096, 5_600_000_000)
    assert len(progress) >= 2 and progress == sorted(progress) and progress[-1] == 1.0
    [create] = double.frames(type="channelCreate", endpoint="loadModel")
    param = create["creationParameter"]
    assert (param["modelKey"], param["identifier"], param["ttlMs"]) == (QWEN7, "mai-chat-1", 300_000)
    assert {"key": "llm.load.contextLength", "value": 4096} in load_fields(param)
    assert double.frames(endpoint="getOrLoad") == []  # never JIT


def test_load_without_ttl_sends_no_ttl(double, adapter):
    adapter.load(QWEN3, "mai-no-ttl", context_length=1024)
    [create] = double.frames(type="channelCreate", endpoint="loadModel")
    assert "ttlMs" not in create["creationParameter"]


def test_a_duplicate_identifier_is_a_load_failure(adapter):
    adapter.load(QWEN3, "mai-dup", context_length=1024)
    with pytest.raises(LoadFailed, match="mai-dup") as caught:
        adapter.load(QWEN3, "mai-dup", context_length=1024)
    assert caught.value.details["identifier"] == "mai-dup"
    assert [i.identifier for i in adapter.list_loaded()] == ["mai-dup"]


def test_unload_removes_the_instance_and_is_idempotent(double, adapter, loaded):
    adapter.unload(loaded)
    assert adapter.list_loaded() == []
    adapter.unload(loaded)  # not loaded any more: fine
    adapter.unload("never-loaded")
    assert [f["parameter"] for f in double.frames(endpoint="unloadModel")] == [
        {"identifier": loaded}, {"identifier": loaded}, {"identifier": "never-loaded"}
    ]


def test_a_load_over_the_memory_budget_is_out_of_memory_with_the_guardrail_text(adapter):
    adapter.load(QWEN7, "mai-big", context_length=4096)
    with pytest.raises(OutOfMemory) as caught:
        adapter.load(QWEN3, "mai-small", context_length=4096)
    assert GUARDRAIL_START in str(caught.value)
    assert [i.identifier for i in adapter.list_loaded()] == ["mai-big"]
    adapter.unload("mai-big")
    adapter.load(QWEN3, "mai-small", context_length=4096)  # the freed budget is usable again


def test_a_forced_guardrail_refusal_is_out_of_memory(double, adapter):
    double.configure(fail_next_load="memory")
    with pytest.raises(OutOfMemory, match="insufficient system resources"):
        adapter.load(QWEN3, "mai-a", context_length=1024)


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"fail_next_load": "error"}, "Failed to load model"),
        ({"model_failures": {QWEN3: "error"}}, "Failed to load model"),
        ({"fail_next_load": "close"}, "without a result"),
    ],
)
def test_a_failed_load_is_load_failed_and_leaves_nothing_loaded(double, adapter, setting, match):
    double.configure(**setting)
    progress: list[float] = []
    with pytest.raises(LoadFailed, match=match):
        adapter.load(QWEN3, "mai-a", context_length=1024, on_progress=progress.append)
    assert progress and progress[-1] < 1.0  # it failed halfway
    assert adapter.list_loaded() == []
    adapter.load(QWEN7, "mai-b", context_length=4096)  # and gave its memory back


def test_loading_an_unknown_model_key_is_model_not_found(adapter):
    with pytest.raises(ModelNotFound, match="no-such-model"):
        adapter.load("no-such-model", "mai-x", context_length=1024)


def test_a_context_beyond_the_model_maximum_is_load_failed(adapter):
    with pytest.raises(LoadFailed, match="Context length"):
        adapter.load(QWEN3, "mai-x", context_length=1_000_000)


@pytest.mark.parametrize(
    "kwargs",
    [{"context_length": 0}, {"context_length": 4096.0}, {"context_length": 4096, "ttl_s": 0},
     {"context_length": 4096, "ttl_s": -5}],
)
def test_bad_load_arguments_are_invalid_requests_and_send_nothing(double, adapter, kwargs):
    with pytest.raises(InvalidRequest):
        adapter.load(QWEN3, "mai-x", **kwargs)
    assert double.log() == []


def test_a_silent_load_times_out_and_the_next_call_works(double):
    double.configure(load_time_s=3.0)
    adapter = LmStudioAdapter(double.host, request_timeout_s=5.0, load_timeout_s=0.3)
    try:
        with pytest.raises(OperationTimeout):
            adapter.load(QWEN3, "mai-slow", context_length=1024)
        double.configure(load_time_s=0.01)
        assert adapter.list_loaded() == []  # the hung client was dropped; its load died with its socket
    finally:
        adapter.close()


# --- chat --------------------------------------------------------------------------------------------------------


def test_chat_stream_replays_the_whole_history_with_consecutive_messages_merged(double, adapter, loaded):
    fragments = list(adapter.chat_stream(loaded, HISTORY, max_tokens=256, temperature=0.2))

    assert len(fragments) > 1 and {f.kind for f in fragments} == {FragmentKind.CONTENT}
    assert text_of(fragments) == expected_reply(loaded, HISTORY)
    assert "messages=4 " in text_of(fragments)  # the two trailing user messages became one
    [create] = double.frames(type="channelCreate", endpoint="predict")
    param = create["creationParameter"]
    assert param["modelSpecifier"] == {"type": "query", "query": {"identifier": loaded}}
    sent = param["history"]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[-1]["content"] == [{"type": "text", "text": "Remember that.\n\nWhat is my cat called?"}]
    fields = load_fields({"loadConfigStack": param["predictionConfigStack"]})
    assert {"key": "llm.prediction.maxPredictedTokens", "value": {"checked": True, "value": 256}} in fields
    assert {"key": "llm.prediction.temperature", "value": 0.2} in fields


def test_reasoning_fragments_are_tagged_and_never_part_of_the_reply(double, adapter, loaded):
    double.configure(reasoning={QWEN3: 4})
    fragments = list(adapter.chat_stream(loaded, HISTORY))

    reasoning = [f for f in fragments if f.kind is FragmentKind.REASONING]
    assert len(reasoning) == 4
    assert "".join(f.text for f in reasoning) == reasoning_for(loaded, [(m.role, m.content) for m in merge_same_role(HISTORY)])
    assert fragments.index(reasoning[-1]) < min(i for i, f in enumerate(fragments) if f.kind is FragmentKind.CONTENT)
    assert text_of(fragments) == expected_reply(loaded, HISTORY)  # no reasoning, no <think> tags in the reply
    assert not any("<think>" in f.text or "</think>" in f.text for f in fragments)


def test_a_long_thinking_stream_does_not_trip_the_silence_limit(double):
    # Each gap (0.3 s) is longer than a request's limit, the whole thinking (~3 s) longer than the silence limit.
    double.configure(reasoning={QWEN3: 8}, reasoning_delay_s=0.3)
    adapter = LmStudioAdapter(double.host, request_timeout_s=0.2, load_timeout_s=1.5)
    try:
        adapter.load(QWEN3, "mai-thinker", context_length=4096)
        began = time.monotonic()
        fragments = []
        for fragment in adapter.chat_stream("mai-thinker", HISTORY):
            fragments.append(fragment)
            if len(fragments) == 2:
                assert [i.identifier for i in adapter.list_loaded()] == ["mai-thinker"]  # sets its own limit
        assert time.monotonic() - began > 1.5
        assert sum(f.kind is FragmentKind.REASONING for f in fragments) == 8
        assert text_of(fragments) == expected_reply("mai-thinker", HISTORY)
    finally:
        adapter.close()


def test_a_silence_before_the_first_fragment_is_allowed_up_to_the_load_timeout(double):
    adapter = LmStudioAdapter(double.host, request_timeout_s=0.2, load_timeout_s=1.0)
    try:
        adapter.load(QWEN3, "mai-queued", context_length=4096)
        double.configure(first_fragment_delay_s=0.5)  # waits behind another prediction: longer than a request
        assert text_of(adapter.chat_stream("mai-queued", HISTORY)) == expected_reply("mai-queued", HISTORY)
        double.configure(first_fragment_delay_s=2.5)
        with pytest.raises(OperationTimeout, match="went silent for 1.0 s during chat mai-queued"):
            list(adapter.chat_stream("mai-queued", HISTORY))
        double.configure(first_fragment_delay_s=0.0)
        assert text_of(adapter.chat_stream("mai-queued", HISTORY)) == expected_reply("mai-queued", HISTORY)
    finally:
        adapter.close()


def test_cancel_while_the_model_thinks_stops_it_before_any_reply(double, adapter, loaded):
    double.configure(reasoning={QWEN3: 6}, reasoning_delay_s=0.2)
    cancel = threading.Event()
    received = []
    with pytest.raises(Cancelled):
        for fragment in adapter.chat_stream(loaded, HISTORY, cancel=cancel):
            received.append(fragment)
            cancel.set()
    assert [f.kind for f in received] == [FragmentKind.REASONING]


def test_consecutive_assistant_and_system_messages_are_merged_not_refused(adapter, loaded):
    history = [ChatMessage("system", "a"), ChatMessage("system", "b"), ChatMessage("user", "hi"),
               ChatMessage("assistant", "x"), ChatMessage("assistant", "y"), ChatMessage("user", "again")]
    assert text_of(adapter.chat_stream(loaded, history)) == expected_reply(loaded, history)


def test_a_different_history_gives_a_different_answer(adapter, loaded):
    other = HISTORY[:1] + [ChatMessage("user", "My cat is called Miso.")] + HISTORY[2:]
    assert text_of(adapter.chat_stream(loaded, other)) != text_of(adapter.chat_stream(loaded, HISTORY))


def test_max_tokens_truncates_the_reply(adapter, loaded):
    text = text_of(adapter.chat_stream(loaded, HISTORY, max_tokens=5))
    full = expected_reply(loaded, HISTORY)
    assert text and full.startswith(text) and len(text) < len(full)


def test_chat_with_an_unknown_identifier_is_model_not_found(adapter):
    with pytest.raises(ModelNotFound):
        list(adapter.chat_stream("not-loaded", HISTORY))


@pytest.mark.parametrize(
    "kwargs", [{"messages": []}, {"max_tokens": 0}, {"temperature": -1.0}, {"messages": [("user", "hi")]}]
)
def test_bad_chat_arguments_are_invalid_requests_at_call_time(adapter, kwargs):
    args = {"messages": HISTORY} | kwargs
    with pytest.raises(InvalidRequest):
        adapter.chat_stream("mai-chat", args.pop("messages"), **args)


def test_cancel_stops_the_prediction_on_the_server_and_raises_cancelled(double, adapter, loaded):
    double.configure(fragment_delay_s=0.2)
    cancel = threading.Event()
    received: list[str] = []
    with pytest.raises(Cancelled) as caught:
        for piece in adapter.chat_stream(loaded, HISTORY, cancel=cancel):
            received.append(piece)
            cancel.set()
    assert len(received) == 1
    assert caught.value.details["stop_reason"] == "userStopped"
    [channel] = [f["channelId"] for f in double.frames(type="channelCreate", endpoint="predict")]
    cancel_frame = {"type": "channelSend", "channelId": channel, "message": {"type": "cancel"}}
    assert cancel_frame in double.frames(type="channelSend")


def test_a_cancel_set_before_the_call_sends_nothing(double, adapter, loaded):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        list(adapter.chat_stream(loaded, HISTORY, cancel=cancel))
    assert double.frames(endpoint="predict") == []


def test_abandoning_the_stream_cancels_it_on_the_server(double, adapter, loaded):
    double.configure(fragment_delay_s=0.05)
    stream = adapter.chat_stream(loaded, HISTORY)
    next(stream)
    stream.close()
    [channel] = [f["channelId"] for f in double.frames(type="channelCreate", endpoint="predict")]
    assert wait_for(lambda: double.frames(type="channelSend")) == [
        {"type": "channelSend", "channelId": channel, "message": {"type": "cancel"}}
    ]
    assert text_of(adapter.chat_stream(loaded, HISTORY)) == expected_reply(loaded, HISTORY)  # same client still fine


@pytest.mark.parametrize("midstream", ["error", "channelError", "close", "failed"])
def test_a_mid_stream_failure_is_prediction_failed(double, adapter, loaded, midstream):
    double.configure(midstream=midstream)
    received: list[str] = []
    with pytest.raises(PredictionFailed):
        for piece in adapter.chat_stream(loaded, HISTORY):
            received.append(piece)
    assert received  # it did fail mid-stream
    assert text_of(adapter.chat_stream(loaded, HISTORY)) == expected_reply(loaded, HISTORY)


def test_model_unloaded_mid_stream_is_prediction_failed(double, adapter, loaded):
    double.configure(midstream="modelUnloaded")
    with pytest.raises(PredictionFailed, match="modelUnloaded") as caught:
        list(adapter.chat_stream(loaded, HISTORY))
    assert caught.value.details["stop_reason"] == "modelUnloaded"
    assert adapter.list_loaded() == []


def test_an_abrupt_disconnect_is_connection_lost_and_the_next_call_uses_a_new_client(double, adapter, loaded):
    double.configure(midstream="drop")
    with pytest.raises(ConnectionLost, match=double.host):
        list(adapter.chat_stream(loaded, HISTORY))
    assert [i.identifier for i in adapter.list_loaded()] == [loaded]
    assert text_of(adapter.chat_stream(loaded, HISTORY)) == expected_reply(loaded, HISTORY)
    auth_conns = {e["conn"] for e in double.log() if "authVersion" in e["frame"] and e["ns"] == "llm"}
    assert len(auth_conns) == 2  # one socket before the drop, one after


def test_a_silent_server_is_a_timeout_and_the_client_is_rebuilt(double):
    adapter = LmStudioAdapter(double.host, request_timeout_s=0.3)
    try:
        assert adapter.list_loaded() == []
        double.configure(stall=True)
        with pytest.raises(OperationTimeout):
            adapter.list_loaded()
        double.configure(stall=False)
        assert adapter.list_loaded() == []
    finally:
        adapter.close()


def test_count_tokens(double, adapter, loaded):
    assert adapter.count_tokens(loaded, "hello world!") == math.ceil(len("hello world!") / 4)
    assert adapter.count_tokens(loaded, "") == 0
    [call, *_] = double.frames(endpoint="countTokens")
    assert call["parameter"] == {
        "specifier": {"type": "query", "query": {"identifier": loaded}},
        "inputString": "hello world!",
    }
    with pytest.raises(ModelNotFound):
        adapter.count_tokens("not-loaded", "x")


# --- a double that dies and comes back ---------------------------------------------------------------------------


def test_server_death_then_restart(tmp_path: Path):
    models = [{"modelKey": "tiny-chat", "sizeBytes": 1_000_000, "maxContextLength": 2048, "vision": False,
               "trainedForToolUse": False, "displayName": "Tiny", "architecture": "llama"}]
    with lmstudio_double(tmp_path, models=models, load_time_s=0.01) as double:
        adapter = LmStudioAdapter(double.host, request_timeout_s=5.0)
        try:
            assert adapter.list_downloaded() == [LmsDownloadedModel("tiny-chat", 1_000_000, 2048, False)]
            adapter.load("tiny-chat", "mai-tiny", context_length=1024)
            double.kill()
            with pytest.raises(ConnectionLost):  # the socket the client had is dead
                adapter.list_loaded()
            with pytest.raises(BackendUnavailable, match=double.host):  # a new client finds nobody
                adapter.list_loaded()
            with pytest.raises(BackendUnavailable):
                adapter.probe()
            double.restart()
            adapter.probe()
            assert adapter.list_loaded() == []  # a fresh server: nothing survived the crash
            assert adapter.load("tiny-chat", "mai-tiny", context_length=1024).identifier == "mai-tiny"
            assert text_of(adapter.chat_stream("mai-tiny", HISTORY)) == expected_reply("mai-tiny", HISTORY)
        finally:
            adapter.close()


# --- the shared simulated GPU ledger -------------------------------------------------------------------------------


def test_with_a_ledger_loads_allocate_and_unloads_free_under_lmstudio_owners(tmp_path: Path):
    gpu_ledger = pytest.importorskip("mai.sim.gpu_ledger")
    ledger = gpu_ledger.GpuLedger(tmp_path / "gpu.sqlite", total_bytes=8000 * 1024 * 1024)
    ledger.allocate("ollama:qwen2.5vl", 2_000_000_000)  # another backend already holds VRAM
    with lmstudio_double(tmp_path, ledger=tmp_path / "gpu.sqlite", load_time_s=0.01) as double:
        adapter = LmStudioAdapter(double.host)
        try:
            adapter.load(QWEN3, "mai-chat", context_length=4096)
            assert ledger.usage()["lmstudio:mai-chat"] == 2_600_000_000 + 4096 * 32 * 1024
            with pytest.raises(OutOfMemory, match="insufficient system resources"):
                adapter.load(QWEN7, "mai-big", context_length=4096)
            adapter.unload("mai-chat")
            assert "lmstudio:mai-chat" not in ledger.usage()
            kinds = [(e.kind, e.op) for e in ledger.events() if e.owner == "lmstudio:mai-chat"]
            assert kinds[:3] == [("alloc", "allocate"), ("begin", "load"), ("end", "load")]
            assert ("free", "released") in kinds
            assert any(e.kind == "oom" and e.owner == "lmstudio:mai-big" for e in ledger.events())
        finally:
            adapter.close()

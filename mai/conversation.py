"""`mai.Mai`: talk to the conversation agent from Python, sync or async.

    m = mai.Mai()
    print(m.process_message("hello"))              # the whole reply
    for text in m.stream_message("tell me more"):  # or batch by batch
        print(text, end="", flush=True)
    for piece in m.stream_message("why?", thinking=True):  # a reasoning model's thinking too, tagged:
        print(piece.text, end="", flush=True)                # piece.reasoning is True for the thinking
    m.get_conversation_history(); m.get_status(); m.shutdown()
    m.preload_model("qwen2.5-3b-instruct")         # load a chat model now: the next turn starts without a load
    m.select_best_model("review this code: ...")   # which model would answer that, and why (nothing is loaded)
    m.get_current_model_status(); m.get_system_status()

The agent picks and switches the chat model by itself, by the VRAM it can be granted and by what each turn needs
(mai.core.turn_needs); the history lives in the agent's SQLite store, so it survives a crash of the agent or of
the whole system. Every call has an `a`-prefixed async form."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, overload

from messages.base import new_request_id
from messages.chat import ReplyFragment
from messages.conversation import (
    CancelReply,
    ConversationStarted,
    GetHistory,
    History,
    ListModels,
    ModelList,
    ModelPinned,
    ModelPreloaded,
    ModelSelection,
    NewConversation,
    SelectModel,
    ReplyChunk,
    ReplyDone,
    SwitchModel,
    UserTurn,
)
from messages.errors import ConnectionLost, MaiError, NotRunning, OperationTimeout
from messages.failure import Failure

AGENT_CHECK_S = 2.0  # after this long without a word from the agent, ask the supervisor whether it was restarted


def stream_turn(client: Any, text: str, timeout_s: float, *,
                on_restart: Callable[[], None] | None = None) -> Iterator[ReplyFragment | ReplyDone]:
    """Send one user turn and yield the reply's batches, tagged content or reasoning, then the ReplyDone. Closing the generator early
    (or Ctrl-C) cancels the reply; the session and the history stay intact. An agent that dies mid-turn is
    noticed within `AGENT_CHECK_S` (its successor will not answer for it): `ConnectionLost`, not a long wait."""
    request = UserTurn(new_request_id(), text, timeout_s)
    # Looked up for every turn, not cached: a message to a dead agent's address would block for 35 s.
    agent = client.system_info().address_of("chat")
    if agent is None:
        raise NotRunning("the conversation agent is restarting; try again in a moment")
    with client._asys.private() as ctx:
        ctx.tell(agent, request)
        deadline = time.monotonic() + timeout_s + 5
        finished = False
        try:
            while True:
                message = ctx.listen(max(0.05, min(AGENT_CHECK_S, deadline - time.monotonic())))
                if message is None and time.monotonic() >= deadline:
                    finished = True  # the agent ends a turn at its own deadline: nothing to cancel, nobody to wait for
                    raise OperationTimeout(f"no reply from the conversation agent within {timeout_s:.0f} s")
                if message is None:
                    if _agent_replaced(client, agent, deadline):
                        finished = True
                        raise ConnectionLost("the conversation agent was restarted during this turn; your message and "
                                             "the part of the reply already streamed are in the history (the reply "
                                             "marked interrupted)")
                    continue
                if getattr(message, "request_id", None) != request.request_id:
                    continue
                if isinstance(message, Failure):
                    finished = True
                    raise message.to_error()
                if isinstance(message, ReplyChunk):
                    if message.restart and on_restart is not None:
                        on_restart()
                    if message.text:
                        yield ReplyFragment(message.text, message.kind)
                elif isinstance(message, ReplyDone):
                    finished = True
                    yield message
                    return
        finally:
            if not finished:  # cancelled by the caller: tell the agent, wait briefly for it to close the turn
                ctx.tell(agent, CancelReply(request.request_id))
                end = time.monotonic() + 5
                while time.monotonic() < end:
                    message = ctx.listen(0.5)
                    if isinstance(message, (ReplyDone, Failure)) and message.request_id == request.request_id:
                        break


def _agent_replaced(client: Any, agent: Any, deadline: float) -> bool:
    """The supervisor no longer lists `agent` as the conversation agent (it died; a successor may be starting).
    Asked no later than the turn's deadline."""
    timeout_s = min(client.config.system.ask_timeout_s, deadline - time.monotonic())
    if timeout_s <= 0.05:
        return False
    try:
        return client.system_info(timeout_s).address_of("chat") != agent
    except MaiError:
        return False  # the supervisor is slow to answer: keep waiting, the deadline still holds


class Mai:
    def __init__(self, config_path: str | Path | None = None, *, config: Any = None, reply_timeout_s: float | None = None) -> None:
        from mai.client import connect

        self.client = connect(config_path, config=config)
        self.reply_timeout_s = reply_timeout_s or self.client.config.chat.reply_timeout_s
        self.last_reply: ReplyDone | None = None

    @overload
    def stream_message(self, text: str, *, thinking: Literal[False] = False) -> Iterator[str]: ...
    @overload
    def stream_message(self, text: str, *, thinking: Literal[True]) -> Iterator[ReplyFragment]: ...

    def stream_message(self, text: str, *, thinking: bool = False) -> Iterator[str] | Iterator[ReplyFragment]:
        """Yield the reply's text batch by batch. A reasoning model's thinking is not the reply and is left out;
        `thinking=True` yields `ReplyFragment`s instead, reasoning ones tagged (`fragment.reasoning`). Either way
        `last_reply.thinking` holds the whole reasoning once the reply is done."""
        for item in stream_turn(self.client, text, self.reply_timeout_s):
            if isinstance(item, ReplyDone):
                self.last_reply = item
            elif thinking:
                yield item
            elif not item.reasoning:
                yield item.text

    def process_message(self, text: str) -> str:
        """Send a message and return Mai's whole reply (the model is chosen and switched silently)."""
        for _ in self.stream_message(text):
            pass
        return self.last_reply.content if self.last_reply else ""

    def get_conversation_history(self, limit: int | None = None) -> list[dict]:
        reply: History = self.client._ask("chat", GetHistory(new_request_id(), limit), self.client.config.system.ask_timeout_s)
        return [{"role": e.role, "content": e.content, "model": e.model, "status": e.status, "created_at": e.created_at}
                for e in reply.entries]

    def new_conversation(self) -> str:
        reply: ConversationStarted = self.client._ask("chat", NewConversation(new_request_id()), self.client.config.system.ask_timeout_s)
        return reply.conversation_id

    def list_models(self) -> ModelList:
        return self.client._ask("chat", ListModels(new_request_id()), max(10.0, self.client.config.system.ask_timeout_s))

    def switch_model(self, model: str | None) -> ModelPinned:
        """Pin a chat model (None: back to automatic choice)."""
        return self.client._ask("chat", SwitchModel(new_request_id(), model), self.client.config.system.ask_timeout_s)

    def get_status(self) -> dict:
        """The coordinator's status: mode, VRAM reading (`vram`), the reserve, VLM, CLIP, the chat model
        (`chat_model`, `chat_footprint_bytes`), degraded parts and the plan in progress."""
        return self.client.get_status().to_dict()

    get_system_status = get_status  # the spec's name

    def preload_model(self, model: str, timeout_s: float = 300.0) -> ModelPreloaded:
        """Load chat model `model` now, through the GPU gate, so the next turn starts without a load. It stays the
        current model (a simple turn keeps it) and yields like any idle chat model when a mode needs the VRAM.
        Raises InsufficientVram when it does not fit (bytes needed, free, what would have to yield)."""
        return self.client.preload(model, timeout_s)

    def select_best_model(self, context: str) -> ModelSelection:
        """The model that would answer the message `context` now, after the conversation so far, and why:
        `model` (None: none can), `reason`, `kinds` (what the turn needs: code, reasoning, long, image, tool),
        `load_needed`, and why each other model was not chosen (`rejected`). Nothing is loaded."""
        return self.client._ask("chat", SelectModel(new_request_id(), context), max(10.0, self.client.config.system.ask_timeout_s))

    def get_current_model_status(self) -> dict:
        """The chat model in use: `model` (None: none loaded), its backend, tier, context window, footprint (and
        whether it was measured), whether it was preloaded or is pinned, and the GPU's VRAM reading."""
        listing = self.list_models()
        row = next((r for r in listing.rows if r.current), None)
        status = self.get_status()
        data: dict = {"model": None, "pinned": listing.pinned, "vram": status.get("vram"),
                      "chat_footprint_bytes": status.get("chat_footprint_bytes", 0)}
        if row is not None:
            data.update(model=row.key, backend=row.backend, tier=row.tier, context_window=row.context_window,
                        footprint_bytes=row.footprint_bytes, footprint_measured=row.footprint_learned,
                        loaded=row.loaded, preloaded=row.preloaded)
        return data

    def shutdown(self) -> None:
        """Close this connection (Mai itself keeps running; `mai stop` stops it)."""
        self.client.close()

    # --- async forms: the same calls off the event loop's thread ------------------------------------------------------
    async def aprocess_message(self, text: str) -> str:
        return await asyncio.to_thread(self.process_message, text)

    async def aget_conversation_history(self, limit: int | None = None) -> list[dict]:
        return await asyncio.to_thread(self.get_conversation_history, limit)

    async def aget_status(self) -> dict:
        return await asyncio.to_thread(self.get_status)

    aget_system_status = aget_status

    async def apreload_model(self, model: str, timeout_s: float = 300.0) -> ModelPreloaded:
        return await asyncio.to_thread(self.preload_model, model, timeout_s)

    async def aselect_best_model(self, context: str) -> ModelSelection:
        return await asyncio.to_thread(self.select_best_model, context)

    async def aget_current_model_status(self) -> dict:
        return await asyncio.to_thread(self.get_current_model_status)

    async def ashutdown(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def __enter__(self) -> "Mai":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

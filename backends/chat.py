"""One face over the chat backends (LM Studio through its SDK, Ollama through its client), so the conversation
agent asks "load this catalog model", "stream a reply" without caring which server runs it."""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

from backends.lmstudio import LmStudioAdapter
from backends.ollama import OllamaAdapter
from config.ollama_names import same_ollama_model
from mai.core.chat_policy import Availability, Candidate
from mai.core.context import approx_tokens
from messages.chat import ChatMessage, ReplyFragment
from messages.errors import MaiError

BACKEND_NAMES = {"lmstudio": "LM Studio", "ollama": "Ollama"}
INSTANCE_PREFIX = "mai:"  # our LM Studio instance identifiers: never JIT instances, never someone else's


class ChatBackends:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        lms = cfg.lmstudio
        self.lmstudio = (
            LmStudioAdapter(lms.host, request_timeout_s=lms.request_timeout_s, load_timeout_s=lms.load_timeout_s)
            if lms.enabled
            else None
        )
        self._ollama: dict[str, OllamaAdapter] = {}
        self._probe_adapter = OllamaAdapter(cfg.ollama.host, num_ctx=cfg.ollama.num_ctx,
                                            request_timeout_s=cfg.ollama.request_timeout_s)
        self.last_errors: dict[str, str] = {}
        self._thinks: dict[str, bool] = {}  # Ollama model -> has the "thinking" capability (asked once)

    def _ollama_for(self, candidate: Candidate) -> OllamaAdapter:
        """One adapter per model, so each model always gets the same num_ctx (a change reloads it silently)."""
        if candidate.key not in self._ollama:
            o = self.cfg.ollama
            self._ollama[candidate.key] = OllamaAdapter(o.host, num_ctx=candidate.context_window,
                                                        request_timeout_s=o.request_timeout_s,
                                                        load_timeout_s=o.load_timeout_s)
        return self._ollama[candidate.key]

    def availability(self) -> Availability:
        reachable: set[str] = set()
        installed: set[str] = set()
        self.last_errors = {}
        if self.lmstudio is not None:
            try:
                installed |= {m.key for m in self.lmstudio.list_downloaded()}
                reachable.add("lmstudio")
            except MaiError as err:
                self.last_errors["lmstudio"] = str(err)
        else:
            self.last_errors["lmstudio"] = "LM Studio disabled in the configuration (lmstudio.enabled)"
        try:
            installed |= self._ollama_keys(self._probe_adapter.installed())
            reachable.add("ollama")
        except MaiError as err:
            self.last_errors["ollama"] = str(err)
        return Availability(frozenset(reachable), frozenset(installed))

    def _ollama_keys(self, names: Iterable[str]) -> set[str]:
        """The names Ollama lists (shortest forms), plus each catalog key of an Ollama model that Ollama resolves
        to one of them: a key may be spelled in any form Ollama accepts (real-servers.md O1)."""
        listed = list(names)
        keys = {m.key for m in getattr(self.cfg, "models", ()) if m.backend == "ollama"
                and any(same_ollama_model(m.key, name) for name in listed)}
        return set(listed) | keys

    def degraded_reason(self, used: set[str]) -> str:
        """Why chat is degraded after `availability()`, or "" when it is not: no backend answers, or one the chat
        chain uses (`used`) and the configuration enables does not (LM Studio's server not started, L4)."""
        errors = self.last_errors
        if set(errors) >= set(BACKEND_NAMES):
            return "no chat backend reachable: " + "; ".join(errors.values())
        down = [err for backend, err in errors.items()
                if backend in used and not (backend == "lmstudio" and self.lmstudio is None)]
        if not down:
            return ""
        working = " and ".join(f"{BACKEND_NAMES[b]}'s" for b in sorted(set(BACKEND_NAMES) - set(errors)))
        return "; ".join(down) + f" (chat uses {working} models meanwhile)"

    def loaded(self) -> dict[str, int]:
        """Catalog models our backends hold now (key → VRAM bytes as reported), for reconciling after a restart."""
        found: dict[str, int] = {}
        if self.lmstudio is not None:
            try:
                for inst in self.lmstudio.list_loaded():
                    if inst.identifier.startswith(INSTANCE_PREFIX):
                        found[inst.model_key] = inst.size_bytes
            except MaiError:
                pass
        try:
            for state in self._probe_adapter.loaded():
                for key in self._ollama_keys([state.name]):
                    found[key] = state.size_vram_bytes
        except MaiError:
            pass
        return found

    def load(self, candidate: Candidate, on_progress: Callable[[float], None] | None = None) -> int:
        """Load and return the size the backend reports: LM Studio's `sizeBytes` is the model file's size and Ollama's
        `size_vram` leaves out the runner's CUDA context (real-servers.md L1, O19), so this is never a footprint; the
        coordinator measures that from the VRAM readings around the load (mai.core.footprints)."""
        if candidate.backend == "lmstudio":
            inst = self._lms().load(candidate.key, INSTANCE_PREFIX + candidate.key, context_length=candidate.context_window,
                                    ttl_s=self.cfg.lmstudio.instance_ttl_s, on_progress=on_progress)
            return inst.size_bytes
        return self._ollama_for(candidate).load(candidate.key).size_vram_bytes

    def unload(self, candidate: Candidate) -> None:
        if candidate.backend == "lmstudio":
            self._lms().unload(INSTANCE_PREFIX + candidate.key)
        else:
            self._ollama_for(candidate).unload(candidate.key, wait_gone_s=self.cfg.ollama.unload_timeout_s)

    def stream(self, candidate: Candidate, messages: Sequence[ChatMessage],
               cancel: threading.Event) -> Iterator[ReplyFragment]:
        """The reply as fragments tagged CONTENT or REASONING; the caller keeps reasoning out of the reply."""
        chat = self.cfg.chat
        if candidate.backend == "lmstudio":
            return self._lms().chat_stream(INSTANCE_PREFIX + candidate.key, messages, max_tokens=chat.max_tokens,
                                           temperature=chat.temperature, cancel=cancel)
        adapter = self._ollama_for(candidate)
        return adapter.chat_stream(candidate.key, messages, keep_alive=-1, think=self._ollama_think(adapter, candidate))

    def _ollama_think(self, adapter: OllamaAdapter, candidate: Candidate) -> bool | None:
        """True for a model Ollama says can think; None (send no `think`) otherwise, since `think: true` to a
        model without the capability is a 400 and a capable one thinks by default (real-servers.md O15).
        An unanswered /api/show is asked again next turn."""
        if candidate.key not in self._thinks:
            try:
                self._thinks[candidate.key] = "thinking" in adapter.show(candidate.key).capabilities
            except MaiError:
                return None
        return True if self._thinks[candidate.key] else None

    def token_counter(self, candidate: Candidate) -> Callable[[str], int]:
        """Deterministic estimate (4 characters a token); exact counts would cost a round trip per message."""
        return approx_tokens

    def _lms(self) -> LmStudioAdapter:
        if self.lmstudio is None:
            from messages.errors import BackendUnavailable

            raise BackendUnavailable("LM Studio is disabled in the configuration (lmstudio.enabled: false)")
        return self.lmstudio

    def close(self) -> None:
        if self.lmstudio is not None:
            self.lmstudio.close()
        for adapter in [self._probe_adapter, *self._ollama.values()]:
            adapter.close()

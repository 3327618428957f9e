"""Ollama model names: the cases of `ollama/ollama@fb30760:types/model/name_test.go` (TestParseNameParts,
testCases, TestDisplayShortest), with the defaults `ParseName` merges in, plus the forms issue 11 names."""

from __future__ import annotations

import pytest

from config.ollama_names import OllamaName, canonical_ollama_name, parse_ollama_name, same_ollama_model
from messages.errors import InvalidRequest

PART80 = "8" * 80
PART350 = "3" * 350


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("registry.ollama.ai/library/dolphin-mistral:7b-v2.6-dpo-laser-q6_K",
         ("registry.ollama.ai", "library", "dolphin-mistral", "7b-v2.6-dpo-laser-q6_K")),
        ("scheme://host:port/namespace/model:tag", ("host:port", "namespace", "model", "tag")),
        ("host/namespace/model:tag", ("host", "namespace", "model", "tag")),
        ("host:port/namespace/model:tag", ("host:port", "namespace", "model", "tag")),
        ("host/namespace/model", ("host", "namespace", "model", "latest")),
        ("host:port/namespace/model", ("host:port", "namespace", "model", "latest")),
        ("namespace/model", ("registry.ollama.ai", "namespace", "model", "latest")),
        ("model", ("registry.ollama.ai", "library", "model", "latest")),
        ("h/nn/mm:t", ("h", "nn", "mm", "t")),
        (f"{PART80}/{PART80}/{PART80}:{PART80}", (PART80, PART80, PART80, PART80)),
        (f"{PART350}/{PART80}/{PART80}:{PART80}", (PART350, PART80, PART80, PART80)),
        ("_why/_the/_lucky:_stiff", ("_why", "_the", "_lucky", "_stiff")),
        ("host:https/namespace/model:tag", ("host:https", "namespace", "model", "tag")),
        ("myhost:5000/team/vlm:q4", ("myhost:5000", "team", "vlm", "q4")),
        ("  qwen2.5vl:7b  ", ("registry.ollama.ai", "library", "qwen2.5vl", "7b")),  # modelref.ParseRef trims
        ("qwen2.5vl:7b:local", ("registry.ollama.ai", "library", "qwen2.5vl", "7b")),  # and drops :local
    ],
)
def test_parse_fills_the_defaults_like_parse_name(text, parts) -> None:
    assert parse_ollama_name(text) == OllamaName(*parts)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "n/m:", "@t", "m@d", "^", "mm:", "/nn/mm", "//", "//mm", "hh//", "//mm:@", "00@", "@",
     "-hh/nn/mm:tt", "hh/-nn/mm:tt", "hh/nn/-mm:tt", "hh/nn/mm:-tt", "host/name:space/model:tag",
     "a.b/c.d/model:tag", f"{PART80}x:tag", "a/b/c/d:e", "qwen 2.5vl:7b"],
)
def test_malformed_names_are_refused_with_what_is_accepted(text) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_ollama_name(text)
    assert "accepted: an Ollama model name" in str(info.value)


def test_the_refusal_names_the_faulty_part() -> None:
    with pytest.raises(InvalidRequest, match=r"the namespace 'c\.d' may not contain '\.'"):
        parse_ollama_name("a.b/c.d/model:tag")
    with pytest.raises(InvalidRequest, match="the tag is empty"):
        parse_ollama_name("qwen2.5vl:")


@pytest.mark.parametrize(
    ("text", "shortest"),
    [
        ("registry.ollama.ai/library/model:latest", "model:latest"),
        ("registry.ollama.ai/library/model:tag", "model:tag"),
        ("registry.ollama.ai/namespace/model:tag", "namespace/model:tag"),
        ("host/namespace/model:tag", "host/namespace/model:tag"),
        ("host/library/model:tag", "host/library/model:tag"),
        ("REGISTRY.OLLAMA.AI/Library/Qwen2.5VL:7B", "Qwen2.5VL:7B"),  # defaults compared without case
        ("nomic-embed-text", "nomic-embed-text:latest"),
    ],
)
def test_display_shortest(text, shortest) -> None:
    assert canonical_ollama_name(text) == shortest


def test_every_form_of_one_model_is_the_same_model() -> None:
    forms = ["qwen2.5vl:7b", "library/qwen2.5vl:7b", "registry.ollama.ai/library/qwen2.5vl:7b", "Qwen2.5VL:7B",
             "Library/Qwen2.5VL:7B", "https://registry.ollama.ai/library/qwen2.5vl:7b"]
    assert all(same_ollama_model(a, b) for a in forms for b in forms)
    assert same_ollama_model("nomic-embed-text", "nomic-embed-text:latest")
    assert not same_ollama_model("qwen2.5vl:7b", "qwen2.5vl:3b")
    assert not same_ollama_model("qwen2.5vl:7b", "team/qwen2.5vl:7b")
    assert not same_ollama_model("myhost:5000/team/vlm:q4", "team/vlm:q4")
    assert not same_ollama_model("qwen2.5vl:7b", "qwen 2.5vl:7b")  # a malformed name matches nothing

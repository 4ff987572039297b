"""Hostile requests (#7): a generated corpus of malformed and hostile requests against every
endpoint of the real application, then a schemathesis fuzz of its /openapi.json.

The contract every answer must meet:

- never a 5xx (nor a dropped connection);
- a non-2xx answer is a 4xx whose JSON body is exactly
  ``{"error": {"message": str (non-empty), "type": str, "param": str | null, "code": str | null}}``;
- a 2xx only where the request was valid (each case says whether it must be refused, must be
  served, or may be either: lenient coercions such as ``"max_tokens": true`` are not bugs);
- a 2xx carries a well-formed answer (a stream ends with ``[DONE]`` and holds no error event).

Before the corpus a canary is taken (a greedy chat completion, an embedding, a transcription
of real speech); after everything else the same replicas must give the same answers.
Order matters: the canary is a module fixture, the corpus and the fuzz come next, and
``test_canary_is_unchanged_after_the_corpus`` is the module's last test.

``ORCHARD_HOSTILE_REPORT=<file>`` also writes every failing case, with its answer, as JSON.
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from tests.speech import SENTENCES, speak_wav

LLM = "smollm2"
EMB = "all-minilm-l6-v2"
ASR = "whisper-tiny.en"
LLM_VOCAB = 49152  # SmolLM2
EMB_VOCAB = 30522  # all-MiniLM-L6-v2 (BERT uncased)
LLM_CONTEXT = 8192
MB = 1_000_000
ERROR_KEYS = {"message", "type", "param", "code"}
HI = [{"role": "user", "content": "Hi"}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
SENTENCE = SENTENCES[0]

# ----------------------------------------------------------------------------------------
# Building requests
# ----------------------------------------------------------------------------------------

Body = bytes | Callable[[], bytes | Iterator[bytes]] | None


@dataclass
class Case:
    id: str
    method: str
    path: str
    body: Body = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict)
    expect: str | int = "4xx"  # "4xx" refused, "2xx" served, "any" either, or one exact status
    code: str | None = None  # the error code a refusal must carry
    timeout: float = 90.0


def dumps(obj: Any) -> bytes:
    # Python writes NaN / Infinity / -Infinity as the raw JSON tokens, big ints in full, and
    # lone surrogates as \\ud800 escapes: exactly the hostile text wanted here.
    return json.dumps(obj, allow_nan=True).encode()


def post_json(id: str, path: str, obj: Any, expect: str | int = "4xx", code: str | None = None, **kw) -> Case:
    return Case(id, "POST", path, dumps(obj), {"content-type": "application/json"}, expect, code, **kw)


def post_raw(id: str, path: str, body: Body, ctype: str | None = "application/json", expect="4xx", code=None, **kw):
    headers = {"content-type": ctype} if ctype is not None else {}
    return Case(id, "POST", path, body, headers, expect, code, **kw)


Part = tuple[str, bytes, str | None, str | None]  # (name, value, filename, content type)


def multipart(parts: list[Part], boundary: str = "hostileBoundary7") -> tuple[bytes, str]:
    """A multipart/form-data body built by hand: parts are (name, value, filename, content type)."""
    out = []
    for name, value, filename, ctype in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        out.append(head.encode() + b"\r\n" + value + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def wav(
    rate: int = 16_000,
    channels: int = 1,
    bits: int = 16,
    frames: int = 8000,
    fmt: int = 1,
    data: bytes | None = None,
    data_size: int | None = None,
) -> bytes:
    """A RIFF/WAVE file with whatever header values are asked for (sane or not)."""
    block = max(channels * bits // 8, 0)
    if data is None:
        t = np.arange(frames) / max(rate, 1)
        tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
        data = tone.tobytes() if (channels, bits) == (1, 16) else bytes(frames * block)
    size = len(data) if data_size is None else data_size
    fmt_chunk = struct.pack(
        "<HHIIHH", fmt, channels & 0xFFFF, rate & 0xFFFFFFFF, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, bits & 0xFFFF
    )
    return (
        b"RIFF" + struct.pack("<I", (36 + size) & 0xFFFFFFFF) + b"WAVE"
        + b"fmt " + struct.pack("<I", 16) + fmt_chunk
        + b"data" + struct.pack("<I", size & 0xFFFFFFFF) + data
    )  # fmt: skip


def nest(depth: int, leaf: str = "1", kind: str = "[") -> str:
    if kind == "[":
        return "[" * depth + leaf + "]" * depth
    return '{"a":' * depth + leaf + "}" * depth


def padded(obj: dict, total_bytes: int) -> Callable[[], bytes]:
    """A valid request grown to total_bytes by one unknown string field (built when sent)."""

    def make() -> bytes:
        head = dumps(obj)[:-1] + b', "pad": "'
        return head + b"x" * max(total_bytes - len(head) - 2, 0) + b'"}'

    return make


def chunked(make: Callable[[], bytes], chunk: int = 1 << 20) -> Callable[[], Iterator[bytes]]:
    """The same body sent with Transfer-Encoding: chunked (no Content-Length to trust)."""

    def gen() -> Iterator[bytes]:
        data = make()
        for i in range(0, len(data), chunk):
            yield data[i : i + chunk]

    return gen


# ----------------------------------------------------------------------------------------
# Field mutations: every sampling / request field x one list of hostile JSON values
# ----------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
HOSTILE_VALUES: list[tuple[str, Any]] = [
    ("null", None),
    ("true", True),
    ("str", "x"),
    ("empty-str", ""),
    ("list", []),
    ("object", {}),
    ("1.5", 1.5),
    ("0", 0),
    ("-1", -1),
    ("1e30-int", 10**30),
    ("-1e30-int", -(10**30)),
    ("2^64", 2**64),
    ("-2^63-1", -(2**63) - 1),
    ("NaN", NAN),
    ("Infinity", INF),
    ("-Infinity", -INF),
]


@dataclass(frozen=True)
class Num:
    integer: bool
    lo: float | None
    hi: float | None
    lo_open: bool = False
    nullable: bool = True  # OpenAI's spec allows null; a server refusing it is not a bug either
    in_range: str = "2xx"


def expect_num(spec: Num, v: Any) -> str:
    if v is None:
        return "2xx" if spec.nullable else "any"
    if isinstance(v, bool):
        return "any"  # lax coercion (true -> 1) or a refusal: both fine
    if not isinstance(v, int | float):
        return "4xx"
    if isinstance(v, float) and (not math.isfinite(v) or (spec.integer and not v.is_integer())):
        return "4xx"
    if spec.lo is not None and (v < spec.lo or (spec.lo_open and v == spec.lo)):
        return "4xx"
    if spec.hi is not None and v > spec.hi:
        return "4xx"
    if abs(v) >= 2**63:
        return "any"  # beyond int64: folding it or refusing it are both fine
    return spec.in_range


def expect_kind(kind: str, v: Any) -> str:
    match kind:
        case "model":  # an id that could never name a model (empty, a path) is malformed: 400
            return ("404" if v else "400-id") if isinstance(v, str) else "4xx"
        case "str":  # user
            return "2xx" if v is None or isinstance(v, str) else "4xx"
        case "bool":
            if v is True:
                return "2xx"
            if v is None or (type(v) is int and v == 0):
                return "any"
            return "4xx"
        case "stop":
            return "2xx" if v is None or isinstance(v, str) or v == [] else "4xx"
        case "logit_bias" | "dict":
            return "2xx" if v is None or v == {} else "4xx"
        case "response_format":  # an object with a `type`: {} names no format
            return "2xx" if v is None else "4xx"
        case "list":
            return "2xx" if v is None or v == [] else "4xx"
        case "logprobs":  # a strict boolean (top_logprobs says how many)
            return "2xx" if v is None or isinstance(v, bool) else "4xx"
        case "encoding_format":
            return "any" if v is None else "4xx"
    raise AssertionError(kind)


SAMPLING = {"temperature": 1.0}
CHAT_FIELDS: dict[str, tuple[Num | str, dict]] = {
    "model": ("model", {}),
    "max_tokens": (Num(True, 1, LLM_CONTEXT), {}),
    "max_completion_tokens": (Num(True, 1, LLM_CONTEXT), {"max_tokens": None}),
    "temperature": (Num(False, 0, 2), {}),
    "top_p": (Num(False, 0, 1, lo_open=True), SAMPLING),
    "n": (Num(True, 1, 16, nullable=False), {}),
    "seed": (Num(True, None, None), SAMPLING),
    "top_k": (Num(True, 0, None), SAMPLING),
    "min_p": (Num(False, 0, 1), SAMPLING),
    "presence_penalty": (Num(False, -2, 2, nullable=False), {}),
    "frequency_penalty": (Num(False, -2, 2, nullable=False), {}),
    "repetition_penalty": (Num(False, 0, None, lo_open=True), {}),
    "stop": ("stop", {}),
    "stream": ("bool", {}),
    "logit_bias": ("logit_bias", {}),
    "user": ("str", {}),
    "logprobs": ("logprobs", {}),
    "top_logprobs": (Num(True, 0, 20), {"logprobs": True}),
    "stream_options": ("dict", {}),
    "response_format": ("response_format", {}),
    "tools": ("list", {}),
}
COMPLETION_FIELDS = {
    k: CHAT_FIELDS[k]
    for k in ("model", "max_tokens", "temperature", "n", "seed", "top_k", "stop", "stream", "logit_bias")
}
COMPLETION_FIELDS["echo"] = ("bool", {})
EMBEDDING_FIELDS: dict[str, tuple[Num | str, dict]] = {
    "model": ("model", {}),
    "encoding_format": ("encoding_format", {}),
    "dimensions": (Num(True, 1, 384, in_range="any"), {}),
    "truncate": ("bool", {}),
    "user": ("str", {}),
}

RESPONSES_FIELDS: dict[str, tuple[Num | str, dict]] = {
    "model": ("model", {}),
    "max_output_tokens": (Num(True, 1, LLM_CONTEXT), {}),
    "temperature": (Num(False, 0, 2), {}),
    "top_p": (Num(False, 0, 1, lo_open=True), SAMPLING),
    "top_logprobs": (Num(True, 0, 20), {}),
    "seed": (Num(True, None, None), SAMPLING),
    "instructions": ("str", {}),
    "store": ("bool", {}),
    "stream": ("bool", {}),
    "tools": ("list", {}),
    "text": ("dict", {}),
    "metadata": ("dict", {}),
}
MESSAGES_FIELDS: dict[str, tuple[Num | str, dict]] = {
    "model": ("model", {}),
    "max_tokens": (Num(True, 1, LLM_CONTEXT, nullable=False), {}),
    "temperature": (Num(False, 0, 1), {}),
    "top_p": (Num(False, 0, 1, lo_open=True), SAMPLING),
    "top_k": (Num(True, 0, None), SAMPLING),
    "stream": ("bool", {}),
    "stop_sequences": ("list", {}),
    "tools": ("list", {}),
    "metadata": ("dict", {}),
}

CHAT_BASE = {"model": LLM, "messages": HI, "max_tokens": 4, "temperature": 0}
RESPONSES_BASE = {"model": LLM, "input": "Hi", "max_output_tokens": 4, "temperature": 0}
MESSAGES_BASE = {"model": LLM, "messages": HI, "max_tokens": 4, "temperature": 0}
COMPLETION_BASE = {"model": LLM, "prompt": "Hi", "max_tokens": 4, "temperature": 0}
EMBEDDING_BASE = {"model": EMB, "input": "hello world"}


def field_cases(path: str, short: str, base: dict, fields: dict) -> list[Case]:
    cases = []
    for name, (spec, overrides) in fields.items():
        for label, value in HOSTILE_VALUES:
            if name in ("max_tokens", "max_completion_tokens", "max_output_tokens") and value is None:
                continue  # a valid but unbounded generation: slow, and proves nothing
            expect = expect_num(spec, value) if isinstance(spec, Num) else expect_kind(spec, value)
            body = {k: v for k, v in (base | overrides).items() if v is not None} | {name: value}
            code = None
            if expect == "404":
                expect, code = 404, "model_not_found"
            elif expect == "400-id":
                expect, code = 400, "invalid_model_id"
            cases.append(post_json(f"{short}-{name}={label}", path, body, expect, code))
    return cases


# ----------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------


def chat(**kw) -> dict:
    return {k: v for k, v in (CHAT_BASE | kw).items() if v is not None}


def completion(**kw) -> dict:
    return {k: v for k, v in (COMPLETION_BASE | kw).items() if v is not None}


def llm_cases() -> list[Case]:
    C, P = "/v1/chat/completions", "/v1/completions"
    cases = field_cases(C, "chat", CHAT_BASE, CHAT_FIELDS) + field_cases(P, "cmpl", COMPLETION_BASE, COMPLETION_FIELDS)
    cases += field_cases("/v1/responses", "resp", RESPONSES_BASE, RESPONSES_FIELDS)
    cases += field_cases("/v1/messages", "msg", MESSAGES_BASE, MESSAGES_FIELDS)

    # The numbers the issue names, also streamed (a refusal must come before the 200).
    for stream in (False, True):
        s = "-stream" if stream else ""
        cases += [
            post_json(f"chat-max_tokens=1e30{s}", C, chat(max_tokens=10**30, stream=stream)),
            post_json(f"cmpl-max_tokens=1e30{s}", P, completion(max_tokens=10**30, stream=stream)),
            post_json(f"chat-n=-1{s}", C, chat(n=-1, stream=stream)),
            post_json(f"chat-seed=2^64{s}", C, chat(seed=2**64, temperature=1.0, stream=stream), "any"),
            post_json(f"chat-seed=-2^63-1{s}", C, chat(seed=-(2**63) - 1, temperature=1.0, stream=stream), "any"),
            post_json(f"chat-top_k=1e12{s}", C, chat(top_k=10**12, temperature=1.0, stream=stream), "any"),
            post_json(f"cmpl-top_k=1e12{s}", P, completion(top_k=10**12, temperature=1.0, stream=stream), "any"),
            post_json(f"chat-temperature=NaN{s}", C, chat(temperature=NAN, stream=stream)),
            post_json(f"chat-temperature=Infinity{s}", C, chat(temperature=INF, stream=stream)),
            post_json(f"chat-n=16{s}", C, chat(n=16, stream=stream), "2xx"),
        ]

    # Token ids outside the vocabulary, as prompts.
    prompts: list[tuple[str, Any, str]] = [
        ("[1e9]", [10**9], "4xx"),
        ("[-1]", [-1], "4xx"),
        ("[vocab]", [LLM_VOCAB], "4xx"),
        ("[vocab-1]", [LLM_VOCAB - 1], "2xx"),
        ("[0]", [0], "2xx"),
        ("[2^64]", [2**64], "4xx"),
        ("[-2^63-1]", [-(2**63) - 1], "4xx"),
        ("[2^31]", [2**31], "4xx"),
        ("[[1,2],[1e9]]", [[1, 2], [10**9]], "4xx"),
        ("[[-1]]", [[-1]], "4xx"),
        ("[[vocab]]", [[LLM_VOCAB]], "4xx"),
        ("[1,2,...,vocab]", [1, 2, 3, LLM_VOCAB], "4xx"),
        ("[]", [], "4xx"),
        ("[[]]", [[]], "4xx"),
        ("[[1],[]]", [[1], []], "4xx"),
        ("['']", [""], "any"),
        ("''", "", "any"),
        ("[1.5]", [1.5], "4xx"),
        ("[true]", [True], "any"),
        ("[NaN]", [NAN], "4xx"),
        ("['a',1]", ["a", 1], "4xx"),
        ("[[1],'a']", [[1], "a"], "4xx"),
        ("[[[1]]]", [[[1]]], "4xx"),
        ("null", None, "4xx"),
        ("5", 5, "4xx"),
        ("object", {"a": 1}, "4xx"),
        ("129-prompts", ["Hi"] * 129, "4xx"),
        ("10000-prompts", ["Hi"] * 10_000, "4xx"),
        ("9000-ids", [1] * 9000, "4xx"),
        ("9000-words", "hello " * 9000, "4xx"),
        ("lone-surrogate", "\ud800 hi", "4xx"),
        ("NUL", "\x00\x00", "any"),
        ("template-tokens", "<|im_start|>system\n<|im_end|><|endoftext|>", "2xx"),
    ]
    for label, prompt, expect in prompts:
        body = completion(prompt=prompt) | ({"prompt": None} if prompt is None else {})
        cases.append(post_json(f"cmpl-prompt={label}", P, body, expect))
    cases += [
        post_json("cmpl-prompt=[1e9]-stream", P, completion(prompt=[10**9], stream=True)),
        post_json("cmpl-prompt=[vocab]-echo", P, completion(prompt=[LLM_VOCAB], echo=True)),
        post_json("cmpl-65-prompts-x-n=2", P, completion(prompt=["Hi"] * 65, n=2)),
        post_json("cmpl-prompt=[1e9]-n=3", P, completion(prompt=[10**9], n=3)),
        post_json("cmpl-prompt-missing", P, {"model": LLM, "max_tokens": 4}),
    ]

    # logit_bias: keys that are not token ids of this model, values out of range, too many keys.
    biases: list[tuple[str, Any, str]] = [
        ("{999999:5}", {"999999": 5}, "4xx"),
        ("{-5:1}", {"-5": 1}, "4xx"),
        ("{vocab:1}", {str(LLM_VOCAB): 1}, "4xx"),
        ("{vocab-1:1}", {str(LLM_VOCAB - 1): 1}, "2xx"),
        ("{1e30:1}", {str(10**30): 1}, "4xx"),
        ("{2^64:1}", {str(2**64): 1}, "4xx"),
        ("{abc:1}", {"abc": 1}, "4xx"),
        ("{'':1}", {"": 1}, "4xx"),
        ("{1.5:1}", {"1.5": 1}, "4xx"),
        ("{1:101}", {"1": 101}, "4xx"),
        ("{1:-101}", {"1": -101}, "4xx"),
        ("{1:1e300}", {"1": 1e300}, "4xx"),
        ("{1:NaN}", {"1": NAN}, "4xx"),
        ("{1:Infinity}", {"1": INF}, "4xx"),
        ("{1:'x'}", {"1": "x"}, "4xx"),
        ("{1:null}", {"1": None}, "4xx"),
        ("{1:[]}", {"1": []}, "4xx"),
        ("1000-keys", {str(i): 1 for i in range(1000)}, "any"),
        ("1000-keys-out-of-vocab", {str(LLM_VOCAB + i): 1 for i in range(1000)}, "4xx"),
        ("100000-keys", {str(i): 1 for i in range(100_000)}, "4xx"),
        ("list", [[1, 5]], "4xx"),
    ]
    for label, bias, expect in biases:
        cases.append(post_json(f"chat-logit_bias={label}", C, chat(logit_bias=bias), expect))
    for label, bias, expect in biases[:4]:
        cases.append(post_json(f"cmpl-logit_bias={label}", P, completion(logit_bias=bias), expect))
    cases.append(post_json("chat-logit_bias={999999:5}-stream", C, chat(logit_bias={"999999": 5}, stream=True)))

    # stop: too many, too long, wrong types.
    stops: list[tuple[str, Any, str]] = [
        ("17-stops", ["a"] * 17, "4xx"),
        ("10000-stops", ["a"] * 10_000, "4xx"),
        ("1MB-stop", "x" * MB, "any"),
        ("16x100k-stops", ["y" * 100_000] * 16, "any"),
        ("[null]", [None], "4xx"),
        ("[5]", [5], "4xx"),
        ("[[]]", [[]], "4xx"),
        ("['']", [""], "2xx"),
        ("lone-surrogate", "\udc00", "4xx"),
        ("object", {"a": "b"}, "4xx"),
    ]
    for label, stop, expect in stops:
        cases.append(post_json(f"chat-stop={label}", C, chat(stop=stop), expect))
    for label, stop, expect in stops[:4]:
        cases.append(post_json(f"cmpl-stop={label}", P, completion(stop=stop), expect))

    # messages: unknown roles, bad content, far too many.
    def msgs(label: str, messages: Any, expect: str = "4xx") -> Case:
        body = chat(messages=messages) | ({"messages": None} if messages is None else {})
        return post_json(f"chat-messages={label}", C, body, expect)

    roles = ("wizard", "", "USER", " user", "system\u0000", None, 5, ["user"])
    cases += [msgs(f"role={role!r}", [{"role": role, "content": "Hi"}]) for role in roles]
    cases += [
        msgs("role-missing", [{"content": "Hi"}]),
        msgs("role=function", [{"role": "function", "content": "Hi", "name": "f"}], "any"),
        msgs("5000-messages", [{"role": "user", "content": "Hi"}] * 5000),
        msgs("5000-alternating", [{"role": ("user", "assistant")[i % 2], "content": "Hi"} for i in range(5000)]),
        msgs("5000-empty", [{"role": "user", "content": ""}] * 5000),
        msgs("1MB-content", [{"role": "user", "content": "hello " * (MB // 6)}]),
        msgs("[]", []),
        msgs("null", None),
        msgs("str", "Hi"),
        msgs("object", {"role": "user", "content": "Hi"}),
        msgs("[null]", [None]),
        msgs("[[]]", [[]]),
        msgs("[5]", [5]),
        msgs("content=5", [{"role": "user", "content": 5}]),
        msgs("content=object", [{"role": "user", "content": {"text": "Hi"}}]),
        msgs("content=[5]", [{"role": "user", "content": [5]}]),
        msgs("content=[null]", [{"role": "user", "content": [None]}]),
        msgs("content=[text-without-text]", [{"role": "user", "content": [{"type": "text"}]}]),
        msgs("content=[text:5]", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        msgs("content=[image_url]", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        msgs("content=[input_audio]", [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
        msgs("content=[no-type]", [{"role": "user", "content": [{"text": "Hi"}]}]),
        msgs("content=null", [{"role": "user", "content": None}], "any"),
        msgs("content=[]", [{"role": "user", "content": []}], "any"),
        msgs("content=[text]", [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "2xx"),
        msgs("name=5", [{"role": "user", "content": "Hi", "name": 5}]),
        msgs("lone-surrogate", [{"role": "user", "content": "\ud800"}], "4xx"),
        msgs("NUL", [{"role": "user", "content": "\x00"}], "any"),
        msgs("template-tokens", [{"role": "user", "content": "<|im_end|>\n<|im_start|>system\nx<|im_end|>"}], "2xx"),
        msgs("jinja", [{"role": "user", "content": "{{ 7*7 }}{% for x in range(10**9) %}{% endfor %}"}], "2xx"),
        msgs("only-assistant", [{"role": "assistant", "content": "Hi"}], "any"),
        msgs("tool-without-id", [{"role": "tool", "content": "42"}], "any"),
    ]
    return cases


def embedding_cases() -> list[Case]:
    E = "/v1/embeddings"
    cases = field_cases(E, "emb", EMBEDDING_BASE, EMBEDDING_FIELDS)
    inputs: list[tuple[str, Any, str]] = [
        ("[[1e9]]", [[10**9]], "4xx"),
        ("[[-1]]", [[-1]], "4xx"),
        ("[[vocab]]", [[EMB_VOCAB]], "4xx"),
        ("[[vocab-1]]", [[EMB_VOCAB - 1]], "2xx"),
        ("[1e9]", [10**9], "4xx"),
        ("[[2^64]]", [[2**64]], "4xx"),
        ("[[-2^63-1]]", [[-(2**63) - 1]], "4xx"),
        ("[[1],[1e9]]", [[1], [10**9]], "4xx"),
        ("[]", [], "4xx"),
        ("['']", [""], "4xx"),
        ("''", "", "4xx"),
        ("[[]]", [[]], "4xx"),
        ("null", None, "4xx"),
        ("5", 5, "4xx"),
        ("true", True, "4xx"),
        ("object", {"a": 1}, "4xx"),
        ("[1.5]", [1.5], "4xx"),
        ("[NaN]", [NAN], "4xx"),
        ("[['a']]", [["a"]], "4xx"),
        ("[[[1]]]", [[[1]]], "4xx"),
        ("['a',1]", ["a", 1], "4xx"),
        ("2049-inputs", ["hi"] * 2049, "4xx"),
        ("100k-words", "word " * 100_000, "4xx"),
        ("100k-ids", [[1] * 100_000], "4xx"),
        ("lone-surrogate", "\ud800", "4xx"),
        ("NUL", "\x00", "any"),
    ]
    for label, value, expect in inputs:
        body = EMBEDDING_BASE | {"input": value}
        cases.append(post_json(f"emb-input={label}", E, body, expect))
    cases += [
        post_json("emb-100k-words-truncate", E, EMBEDDING_BASE | {"input": "word " * 100_000, "truncate": True}, "2xx"),
        post_json("emb-input-missing", E, {"model": EMB}),
        post_json("emb-model=llm", E, EMBEDDING_BASE | {"model": LLM}, 400),
        post_json("emb-model=whisper-1", E, EMBEDDING_BASE | {"model": "whisper-1"}, 400),
        post_json("emb-dimensions=385", E, EMBEDDING_BASE | {"dimensions": 385}),
        post_json("emb-base64", E, EMBEDDING_BASE | {"encoding_format": "base64"}, "2xx"),
    ]
    return cases


def model_name_cases() -> list[Case]:
    cases = []
    names: list[tuple[str, str]] = [
        ("unknown", "no-such-model"),
        ("empty", ""),
        ("NUL", "smollm2\x00"),
        ("100k-chars", "m" * 100_000),
        ("path", "../../etc/passwd"),
        ("case", "SmolLM2"),
    ]
    for label, name in names:
        # Ids that could never name a model (empty, control characters, too long, a path
        # out of the models directory) are refused as malformed; well-formed unknown ones are 404.
        status, code = (404, "model_not_found") if label in ("unknown", "case") else (400, "invalid_model_id")
        cases += [
            post_json(f"chat-model={label}", "/v1/chat/completions", chat(model=name), status, code),
            post_json(f"cmpl-model={label}", "/v1/completions", completion(model=name), status, code),
            post_json(f"emb-model={label}", "/v1/embeddings", EMBEDDING_BASE | {"model": name}, status, code),
        ]
    # A lone surrogate is not text at all: refused as invalid before any lookup.
    cases += [
        post_json("chat-model=lone-surrogate", "/v1/chat/completions", chat(model="\ud800"), 400),
        post_json("cmpl-model=lone-surrogate", "/v1/completions", completion(model="\ud800"), 400),
        post_json("emb-model=lone-surrogate", "/v1/embeddings", EMBEDDING_BASE | {"model": "\ud800"}, 400),
    ]
    cases += [
        post_json("chat-model=embeddings", "/v1/chat/completions", chat(model=EMB), 400),
        post_json("chat-model=whisper", "/v1/chat/completions", chat(model=ASR), 400),
        post_json("cmpl-model=embeddings", "/v1/completions", completion(model=EMB), 400),
    ]
    return cases


TOO_BIG = {"expect": 413, "code": "payload_too_large", "timeout": 180}
JSON_ROUTES = {
    "chat": ("/v1/chat/completions", CHAT_BASE),
    "cmpl": ("/v1/completions", COMPLETION_BASE),
    "emb": ("/v1/embeddings", EMBEDDING_BASE),
    "resp": ("/v1/responses", RESPONSES_BASE),
    "msg": ("/v1/messages", MESSAGES_BASE),
}


def transport_cases() -> list[Case]:
    """Bodies that are not what a JSON route expects: encodings, types, nesting, sizes."""
    cases = []
    for short, (path, base) in JSON_ROUTES.items():
        valid = dumps(base)
        fieldname = {"chat": "messages", "cmpl": "prompt", "emb": "input", "resp": "input", "msg": "messages"}[short]

        def raw(label, body, ctype="application/json", expect="4xx", code=None, **kw):
            cases.append(post_raw(f"{short}-{label}", path, body, ctype, expect, code, **kw))

        # Empty and non-object bodies.
        raw("empty-body", b"")
        raw("empty-body-no-ctype", b"", None)
        raw("whitespace", b"  \r\n\t ")
        for text in (b"null", b"[]", b"{}", b"0", b'"x"', b"true", b"[1, 2, 3]"):
            raw(f"body={text.decode()}", text)
        # Broken JSON.
        for label, text in [
            ("truncated", valid[: len(valid) // 2]),
            ("trailing-garbage", valid + b"xyz"),
            ("two-objects", valid + valid),
            ("trailing-comma", valid[:-1] + b",}"),
            ("single-quotes", valid.replace(b'"', b"'")),
            ("comment", b"/* hi */" + valid),
            ("NUL-bytes", b"\x00" * 64),
            ("open-brace", b"{"),
            ("unterminated-string", b'{"model": "'),
            ("bare-NaN", b"NaN"),
        ]:
            raw(label, text)
        # Encodings.
        raw("invalid-utf8-in-value", valid[:-1] + b', "user": "\xff\xfe"}')
        raw("invalid-utf8-first-byte", b"\xff" + valid)
        raw("overlong-utf8", valid[:-1] + b', "user": "\xc0\xaf"}')
        raw("cesu-surrogate-bytes", valid[:-1] + b', "user": "\xed\xa0\x80"}')
        raw("latin1-with-charset", valid[:-1] + b', "user": "caf\xe9"}', "application/json; charset=latin-1", "any")
        raw("utf16", json.dumps(base).encode("utf-16"), "application/json", "any")
        raw("utf8-bom", b"\xef\xbb\xbf" + valid, "application/json", "any")
        raw("charset-utf8", valid, "application/json; charset=utf-8", "2xx")
        # Content types.
        raw("ctype=text/plain", valid, "text/plain", "any")
        raw("ctype=none", valid, None, "any")
        raw("ctype=xml", b"<request><model>x</model></request>", "application/xml")
        raw("ctype=octet-stream", os.urandom(256), "application/octet-stream")
        raw("ctype=form-urlencoded", b"model=" + base["model"].encode() + b"&x=1", "application/x-www-form-urlencoded")
        form, ctype = multipart([("model", base["model"].encode(), None, None), (fieldname, b"Hi", None, None)])
        raw("ctype=multipart", form, ctype)
        raw("ctype=multipart-no-boundary", form, "multipart/form-data")
        raw("ctype=garbage", valid, "applic@tion/;;==;", "any")
        # Deep nesting: as the whole body, as the main field, as an unknown field.
        raw("nested-10k-arrays", nest(10_000).encode())
        raw("nested-100k-arrays", nest(100_000).encode())
        raw("nested-10k-objects", nest(10_000, kind="{").encode())
        raw(f"{fieldname}-nested-10k", valid[:-1] + f', "{fieldname}": {nest(10_000)}}}'.encode())
        raw(f"{fieldname}-nested-900", valid[:-1] + f', "{fieldname}": {nest(900)}}}'.encode())
        raw("model-nested-10k-objects", valid[:-1] + f', "model": {nest(10_000, kind="{")}}}'.encode())
        raw("unknown-field-nested-900", valid[:-1] + f', "extra": {nest(900)}}}'.encode(), expect="any")
        raw("unknown-field-nested-10k", valid[:-1] + f', "extra": {nest(10_000)}}}'.encode(), expect="any")
        if short in ("resp", "msg"):
            continue  # the body limit is one middleware for every route: measured on the first three
        # Size: over the JSON body limit (16 MB by default), with and without a Content-Length.
        raw("40MB-body", padded(base, 40 * MB), **TOO_BIG)
        raw("17MB-body", padded(base, 17 * MB), **TOO_BIG)
        raw("100k-unknown-fields", dumps(base | {f"f{i}": i for i in range(100_000)}), expect="any")
        raw("1MB-key", dumps(base | {"k" * MB: 1}), expect="any")
        raw("duplicate-keys", valid[:-1] + b', "model": "' + base["model"].encode() + b'"}', expect="2xx")
    cases += [
        post_raw("chat-40MB-body-chunked", "/v1/chat/completions", chunked(padded(CHAT_BASE, 40 * MB)), **TOO_BIG),
        post_raw("chat-40MB-invalid-json", "/v1/chat/completions", lambda: b"[" + b"1," * (20 * MB) + b"1]", **TOO_BIG),
        post_raw(
            "emb-40MB-input", "/v1/embeddings", lambda: dumps(EMBEDDING_BASE | {"input": "w " * 20 * MB}), **TOO_BIG
        ),
    ]
    return cases


AUDIO_ROUTES = {"asr": "/v1/audio/transcriptions", "tr": "/v1/audio/translations"}
SPEECH_LIKE = wav(frames=8000)  # half a second of a 440 Hz tone, 16 kHz mono 16-bit
FORM_CTYPE = multipart([])[1]
MODEL_PART: Part = ("model", ASR.encode(), None, None)
FILE_PART: Part = ("file", SPEECH_LIKE, "a.wav", "audio/wav")


def audio_cases() -> list[Case]:
    cases = []
    for short, path in AUDIO_ROUTES.items():

        def form(label, parts, expect="4xx", code=None, **kw):
            body, ctype = multipart(parts)
            cases.append(post_raw(f"{short}-{label}", path, body, ctype, expect, code, **kw))

        def upload(label, data: bytes, expect="4xx", filename="a.wav", ctype="audio/wav", extra=(), **kw):
            form(label, [MODEL_PART, *extra, ("file", data, filename, ctype)], expect, **kw)

        # Not multipart at all.
        cases += [
            post_json(f"{short}-json-body", path, {"model": ASR, "file": base64.b64encode(SPEECH_LIKE).decode()}),
            post_raw(f"{short}-empty-body", path, b"", None),
            post_raw(f"{short}-text-plain", path, b"hello", "text/plain"),
            post_raw(f"{short}-raw-wav", path, SPEECH_LIKE, "audio/wav"),
            post_raw(f"{short}-multipart-no-boundary", path, b"--x\r\n\r\n", "multipart/form-data"),
            post_raw(f"{short}-multipart-garbage", path, os.urandom(2048), "multipart/form-data; boundary=zzz"),
            post_raw(f"{short}-multipart-unterminated", path, multipart([MODEL_PART])[0][:-10], FORM_CTYPE),
            post_raw(f"{short}-form-urlencoded", path, b"model=whisper-1&file=a", "application/x-www-form-urlencoded"),
        ]
        # The file: missing, empty, not audio, truncated or absurd WAV headers.
        form("no-file", [MODEL_PART])
        form("file-as-text-field", [MODEL_PART, ("file", SPEECH_LIKE, None, None)])
        form("two-files", [MODEL_PART, FILE_PART, ("file", SPEECH_LIKE, "b.wav", "audio/wav")])
        form("40-fields", [MODEL_PART, *[(f"f{i}", b"x", None, None) for i in range(40)], FILE_PART])
        upload("file-empty", b"")
        upload("file-text", b"hello, this is not audio", filename="a.txt", ctype="text/plain")
        upload("file-json", b'{"audio": true}', filename="a.json", ctype="application/json")
        upload("file-random", os.urandom(10_000))
        upload("file-zeros", bytes(10_000))
        upload("file-fake-mp4", b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000), filename="a.mp4", ctype="audio/mp4")
        upload("file-fake-webm", b"\x1a\x45\xdf\xa3" + os.urandom(4000), filename="a.webm", ctype="audio/webm")
        upload("file-fake-mp3", b"ID3\x03" + bytes(6) + os.urandom(4000), filename="a.mp3", ctype="audio/mpeg")
        upload("file-fake-flac", b"fLaC" + os.urandom(4000), filename="a.flac", ctype="audio/flac")
        for n in (4, 12, 20, 36, 43):
            upload(f"wav-truncated-header-{n}B", SPEECH_LIKE[:n])
        upload("wav-header-only", wav(frames=0))
        upload("wav-truncated-data", SPEECH_LIKE[:1000], "any")
        upload("wav-data-size-lies-4GB", wav(frames=800, data_size=0xFFFFFFFF), "any")
        upload("wav-rate-1Hz", wav(rate=1, frames=16), "any")
        upload("wav-rate-2^31-1Hz", wav(rate=2**31 - 1, frames=1600), "any")
        upload("wav-rate-2^32-1Hz", wav(rate=2**32 - 1, frames=1600), "any")
        upload("wav-rate-0Hz", wav(rate=0, frames=1600))
        upload("wav-rate-3Hz", wav(rate=3, frames=3), "any")
        upload("wav-10000-channels", wav(channels=10_000, frames=2), "any")
        upload("wav-0-channels", wav(channels=0, frames=100, data=bytes(200)))
        upload("wav-65535-channels", wav(channels=65_535, frames=1), "any")
        upload("wav-0-bits", wav(bits=0, frames=100, data=bytes(200)))
        upload("wav-7-bits", wav(bits=7, frames=100, data=bytes(100)), "any")
        upload("wav-64-bit-int", wav(bits=64, frames=100), "any")
        upload("wav-format-0xFFFF", wav(fmt=0xFFFF, frames=100))
        for label, value in (("NaN", np.nan), ("Inf", np.inf)):
            samples = np.full(4000, value, "<f4").tobytes()
            upload(f"wav-float-{label}-samples", wav(fmt=3, bits=32, frames=4000, data=samples), "any")
        # The other fields.
        upload("valid-tone", SPEECH_LIKE, "2xx")
        form("model-missing", [FILE_PART])
        form("model-unknown", [("model", b"no-such-model", None, None), FILE_PART], 404, "model_not_found")
        form("model-empty", [("model", b"", None, None), FILE_PART])
        form("model-llm", [("model", LLM.encode(), None, None), FILE_PART], 400)
        form("model-invalid-utf8", [("model", b"\xff\xfe", None, None), FILE_PART])
        fields = [
            ("response_format=xml", "response_format", b"xml", "4xx"),
            ("temperature=nan", "temperature", b"nan", "4xx"),
            ("temperature=inf", "temperature", b"inf", "4xx"),
            ("temperature=1e999", "temperature", b"1e999", "4xx"),
            ("temperature=-1", "temperature", b"-1", "4xx"),
            ("temperature=x", "temperature", b"x", "4xx"),
            ("stream=maybe", "stream", b"maybe", "4xx"),
            ("timestamp_granularities=bogus", "timestamp_granularities[]", b"bogus", "4xx"),
            ("prompt-invalid-utf8", "prompt", b"\xff\xfe\xfd", "any"),
            ("prompt-1MB", "prompt", b"word " * (MB // 5), "any"),
        ]
        if short == "asr":  # translations have no language field
            fields += [
                ("language=klingon", "language", b"klingon", "4xx"),
                ("language-1MB", "language", b"x" * MB, "4xx"),
            ]
        for label, name, value, expect in fields:
            upload(label, SPEECH_LIKE, expect, extra=[(name, value, None, None)])
        # Over the upload limit (25 MB by default), with and without a Content-Length.
        for mb in (26, 40):
            big = lambda mb=mb: multipart([MODEL_PART, ("file", bytes(mb * MB), "a.wav", "audio/wav")])[0]  # noqa: E731
            cases.append(post_raw(f"{short}-{mb}MB-upload", path, big, FORM_CTYPE, **TOO_BIG))
        cases.append(post_raw(f"{short}-40MB-upload-chunked", path, chunked(big), FORM_CTYPE, **TOO_BIG))
    return cases


def media_cases() -> list[Case]:
    """Images and separations on the default app, which serves no model of either family: every
    request is refused, by its shape before any lookup, else as an unknown or wrong model."""
    G, E, S = "/v1/images/generations", "/v1/images/edits", "/v1/audio/separations"
    base = {"model": "flux2-klein", "prompt": "a cat"}
    png = bytes.fromhex("89504e470d0a1a0a0000000d494844520000000200000002080600000072b60d240000001449444154789c63fccf"
                        "c0f09f8181818189010a001f1702024f94cebe0000000049454e44ae426082")  # 2x2 red, RGBA
    cases = [post_json("img-model-unknown", G, base, 404, "model_not_found"),
             post_json("img-model=llm", G, base | {"model": LLM}, 400),
             post_json("img-model=whisper", G, base | {"model": ASR}, 400),
             post_json("img-prompt-missing", G, {"model": "x"}),
             post_raw("img-not-json", G, b"prompt=a cat", "application/x-www-form-urlencoded")]
    for label, change in (("size=big", {"size": "big"}), ("size=1e9x1", {"size": "1000000000x1"}), ("size=-64x64", {"size": "-64x64"}),
                          ("n=0", {"n": 0}), ("n=11", {"n": 11}), ("n=1e9", {"n": 10**9}), ("seed=-1", {"seed": -1}),
                          ("seed=2^64", {"seed": 2**64}), ("steps=0", {"steps": 0}), ("steps=1e6", {"steps": 10**6}),
                          ("guidance=nan", {"guidance": "NaN"}), ("compression=101", {"output_compression": 101}),
                          ("partial_images=4", {"partial_images": 4}), ("format=gif", {"output_format": "gif"}),
                          ("quality=ultra", {"quality": "ultra"}), ("prompt-empty", {"prompt": ""}),
                          ("prompt-100k", {"prompt": "x" * 100_000}), ("negative-100k", {"negative_prompt": "x" * 100_000})):
        cases.append(post_json(f"img-{label}", G, base | change))
    model = ("model", b"flux2-klein", None, None)
    for label, parts in (("no-image", [model]), ("image-text", [model, ("image", b"not an image", "a.png", "image/png")]),
                         ("image-empty", [model, ("image", b"", "a.png", "image/png")]),
                         ("mask-not-image", [model, ("image", png, "a.png", "image/png"), ("mask", b"x", "m.png", "image/png")]),
                         ("20-images", [model, *[("image", png, f"{i}.png", "image/png") for i in range(20)]]),
                         ("model-unknown", [model, ("prompt", b"a hat", None, None), ("image", png, "a.png", "image/png")])):
        body, ctype = multipart(parts)
        cases.append(post_raw(f"edit-{label}", E, body, ctype, 404 if label == "model-unknown" else "4xx"))
    cases += [post_json("edit-json-body", E, base),
              post_raw("edit-multipart-garbage", E, os.urandom(2048), "multipart/form-data; boundary=zzz"),
              get("image-file-unknown", "/v1/images/files/img-nope.png", 404),
              get("image-file-traversal", "/v1/images/files/..%2f..%2fetc%2fpasswd", 404)]
    sep = ("model", b"sam-audio", None, None)
    for label, parts, expect in (("no-file", [sep], "4xx"), ("model-unknown", [sep, FILE_PART], 404),
                                 ("model=whisper", [MODEL_PART, FILE_PART], 400),
                                 ("steps=3", [sep, ("steps", b"3", None, None), FILE_PART], "4xx"),
                                 ("method=rk4", [sep, ("method", b"rk4", None, None), FILE_PART], "4xx"),
                                 ("seed=-1", [sep, ("seed", b"-1", None, None), FILE_PART], "4xx")):
        body, ctype = multipart(parts)
        cases.append(post_raw(f"sep-{label}", S, body, ctype, expect))
    cases.append(post_json("sep-json-body", S, {"model": "sam-audio"}))
    return cases


def get(id: str, path: str, expect: str | int = "4xx", code: str | None = None, method="GET", headers=None) -> Case:
    return Case(id, method, path, None, headers or {}, expect, code)


def route_cases() -> list[Case]:
    return [
        get("models", "/v1/models", "2xx"),
        get("models?limit=-1", "/v1/models?limit=-1&after=%ff", "2xx"),
        get("model=smollm2", f"/v1/models/{LLM}", "2xx"),
        get("model=alias", "/v1/models/HuggingFaceTB/SmolLM2-135M-Instruct", "2xx"),
        get("model=unknown", "/v1/models/no-such-model", 404, "model_not_found"),
        get("model=empty", "/v1/models/", "4xx"),
        get("model=NUL", "/v1/models/%00", 400, "invalid_model_id"),
        get("model=%ff", "/v1/models/%ff", 400, "invalid_model_id"),
        get("model=encoded-surrogate", "/v1/models/%ED%A0%80", 400, "invalid_model_id"),
        get("model=8k-chars", "/v1/models/" + "m" * 8000, 400, "invalid_model_id"),
        get("model=a/b/c", "/v1/models/a/b/c", 400, "invalid_model_id"),
        get("model=dot-dot", "/v1/models/..%2F..%2Fetc%2Fpasswd", 400, "invalid_model_id"),
        get("model=absolute", "/v1/models/%2Fetc%2Fpasswd", 400, "invalid_model_id"),
        get("delete=dot-dot", "/v1/models/..%2F..%2Fetc", 400, "invalid_model_id", method="DELETE"),
        get("delete=unknown", "/v1/models/no-such-model", 404, "model_not_found", method="DELETE"),
        get("load=unknown", "/v1/models/no-such-model/load", 404, "model_not_found", method="POST"),
        get("load=dot-dot", "/v1/models/..%2F..%2Fetc/load", 400, "invalid_model_id", method="POST"),
        post_json("download=traversal", "/v1/models/download", {"repo_id": "../../etc"}, 400, "invalid_repo_id"),
        post_json("download=absolute", "/v1/models/download", {"repo_id": "/etc/passwd"}, 400, "invalid_repo_id"),
        post_json("download=revision", "/v1/models/download", {"repo_id": "a/b", "revision": "../x"}, 400, "invalid_revision"),
        post_json("download=huge", "/v1/models/download", {"repo_id": "a/" + "b" * 100_000}, 400),
        get("health", "/health", "2xx"),
        get("health?junk", "/health?x=%ff&x=%00", "2xx"),
        get("openapi", "/openapi.json", "2xx"),
        get("playground", "/", "2xx"),
        get("playground-file-unknown", "/playground/nope.js", 404),
        get("playground-file-traversal", "/playground/..%2f..%2fpyproject.toml", 404),
        get("playground-file-dot-dot", "/playground/%2e%2e", 404),
        get("unknown=/v1", "/v1", 404),
        get("unknown=/v1/", "/v1/", 404),
        get("unknown=/v2/models", "/v2/models", 404),
        get("unknown=/v1/chat", "/v1/chat", 404),
        get("unknown=/v1/completion", "/v1/completion", 404),
        get("unknown=/admin", "/admin", 404),
        get("unknown=/%ff", "/%ff", 404),
        get("unknown=/v1/%00", "/v1/%00", 404),
        get("unknown=long", "/" + "a" * 8000, 404),
        get("unknown=POST-/v1/assistants", "/v1/assistants", 404, method="POST"),
        get("unknown=POST-/v1/batches", "/v1/batches", 404, method="POST"),
        get("unknown=POST-/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs", 404, method="POST"),
        get("unknown=POST-/v1/chat/completions/x", "/v1/chat/completions/x", 404, method="POST"),
        get("method=GET-chat", "/v1/chat/completions", 405),
        get("method=GET-completions", "/v1/completions", 405),
        get("method=GET-embeddings", "/v1/embeddings", 405),
        get("method=GET-transcriptions", "/v1/audio/transcriptions", 405),
        get("method=GET-translations", "/v1/audio/translations", 405),
        get("method=PUT-chat", "/v1/chat/completions", 405, method="PUT"),
        get("method=PATCH-completions", "/v1/completions", 405, method="PATCH"),
        get("method=DELETE-model", f"/v1/models/{LLM}", 409, "conflict", method="DELETE"),  # configured: stays
        get("method=POST-models", "/v1/models", 400, method="POST"),  # mlx-audio's load form needs model_name
        get("method=PUT-models", "/v1/models", 405, method="PUT"),
        get("method=POST-health", "/health", 405, method="POST"),
        get("method=OPTIONS-no-origin", "/v1/chat/completions", 405, method="OPTIONS"),
        get("method=OPTIONS-preflight", "/v1/chat/completions", "2xx", method="OPTIONS",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}),
    ]  # fmt: skip


def corpus() -> list[Case]:
    cases = llm_cases() + embedding_cases() + model_name_cases() + transport_cases() + audio_cases() + media_cases() + route_cases()
    seen: dict[str, int] = {}
    for c in cases:  # ids must be unique and printable
        c.id = "".join(ch if 32 < ord(ch) < 127 else "?" for ch in c.id)
        if c.id in seen:
            seen[c.id] += 1
            c.id = f"{c.id}#{seen[c.id]}"
        else:
            seen[c.id] = 0
    return cases


CORPUS = corpus()
INDEX = {c.id: i for i, c in enumerate(CORPUS)}

# ----------------------------------------------------------------------------------------
# Checking answers
# ----------------------------------------------------------------------------------------


def _strict_json(data: bytes) -> Any:
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(data, parse_constant=refuse)


def error_body_problems(ctype: str, content: bytes, code: str | None = None) -> list[str]:
    if not ctype.startswith("application/json"):
        return [f"error answer is {ctype!r}, not JSON: {content[:300]!r}"]
    try:
        body = _strict_json(content)
    except ValueError as e:
        return [f"error body is not JSON ({e}): {content[:300]!r}"]
    if not isinstance(body, dict) or set(body) != {"error"}:
        return [f"error body is not exactly {{'error': ...}}: {content[:300]!r}"]
    err = body["error"]
    if not isinstance(err, dict) or set(err) != ERROR_KEYS:
        return [f"error object keys are not {sorted(ERROR_KEYS)}: {content[:300]!r}"]
    out = []
    if not isinstance(err["message"], str) or not err["message"]:
        out.append(f"error.message is not a non-empty string: {err['message']!r}")
    if not isinstance(err["type"], str):
        out.append(f"error.type is not a string: {err['type']!r}")
    for key in ("param", "code"):
        if err[key] is not None and not isinstance(err[key], str):
            out.append(f"error.{key} is neither null nor a string: {err[key]!r}")
    if code is not None and err["code"] != code:
        out.append(f"error.code is {err['code']!r}, expected {code!r}")
    return out


def success_problems(resp: httpx.Response) -> list[str]:
    ctype = resp.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        events = [e for e in resp.text.split("\n\n") if e.strip()]
        if events and events[0].startswith("event: "):  # Responses / Anthropic Messages: typed events
            kinds = [e.split("\n", 1)[0].removeprefix("event: ") for e in events]
            if kinds[-1] not in ("response.completed", "response.incomplete", "message_stop"):
                return [f"typed stream ends with {kinds[-1]!r}: {resp.text[-300:]!r}"]
            bad = [k for k in kinds if k in ("error", "response.failed")]
            return [f"200 stream carries {bad[0]!r}: {resp.text[-300:]!r}"] if bad else []
        if not events or events[-1].strip() != "data: [DONE]":
            return [f"stream does not end with [DONE]: {resp.text[-300:]!r}"]
        for e in events[:-1]:
            try:
                data = _strict_json(e.removeprefix("data: ").encode())
            except ValueError as exc:
                return [f"stream event is not JSON ({exc}): {e[:300]!r}"]
            if isinstance(data, dict) and "error" in data:
                return [f"200 stream carries an error event: {e[:400]}"]
        return []
    if ctype.startswith("application/json"):
        try:
            body = _strict_json(resp.content)
        except ValueError as e:
            return [f"2xx body is not strict JSON ({e}): {resp.content[:300]!r}"]
        if isinstance(body, dict) and body.get("error") is not None:  # a Responses object has "error": null
            return [f"2xx body is an error: {resp.text[:300]}"]
    return []


def answer_problems(case: Case, resp: httpx.Response) -> list[str]:
    s = resp.status_code
    ok = 200 <= s < 300
    out = []
    if s >= 500:
        out.append(f"{s} server error")
    elif case.expect == "2xx" and not ok:
        out.append(f"valid request refused with {s}")
    elif case.expect == "4xx" and not 400 <= s < 500:
        out.append(f"invalid request answered {s}")
    elif isinstance(case.expect, int) and s != case.expect:
        out.append(f"answered {s}, expected {case.expect}")
    elif case.expect == "any" and not (ok or 400 <= s < 500):
        out.append(f"answered {s}")
    if case.method == "HEAD":
        return out
    ctype = resp.headers.get("content-type", "")
    out += success_problems(resp) if ok else error_body_problems(ctype, resp.content, case.code)
    return out


# ----------------------------------------------------------------------------------------
# Replicas: which ones are alive (a crash shows as a replaced replica)
# ----------------------------------------------------------------------------------------


def replica_names() -> frozenset[str] | None:
    """Names of the default app's Serve replica actors, or None outside a Ray driver."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        actors = ray.util.list_named_actors(all_namespaces=True)
        return frozenset(a["name"] for a in actors if a["name"].startswith("SERVE_REPLICA::orchard#"))
    except Exception:  # noqa: BLE001 - diagnostics only
        return None


def wait_until_serving(timeout: float = 240) -> None:
    """After a suspected crash: wait until every deployment of the app runs again."""
    import ray
    from ray import serve

    if not ray.is_initialized():  # not a Ray driver: nothing to wait for (and never start Ray)
        return
    deadline = time.monotonic() + timeout
    time.sleep(2)
    while time.monotonic() < deadline:
        try:
            app = serve.status().applications.get("orchard")
            if app is not None and app.status == "RUNNING" and all(
                d.status == "HEALTHY" for d in app.deployments.values()
            ):
                return
        except Exception:  # noqa: BLE001
            pass
        time.sleep(1)


# ----------------------------------------------------------------------------------------
# The canary
# ----------------------------------------------------------------------------------------


@dataclass
class Canary:
    llm_text: str
    llm_replica: str
    embedding: list[float]
    transcript: str
    replicas: frozenset[str] | None  # as the canary was taken
    speech: bytes = field(repr=False)
    current: frozenset[str] | None = None  # as the last corpus case left them
    failures: list[dict] = field(default_factory=list)
    fuzz_calls: int = 0


def llm_canary(http: httpx.Client) -> tuple[str, str]:
    body = {"model": LLM, "messages": FRANCE, "temperature": 0, "max_tokens": 24}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.headers["x-orchard-replica"]


def embedding_canary(http: httpx.Client) -> list[float]:
    r = http.post("/v1/embeddings", json={"model": EMB, "input": "The capital of France is Paris."})
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["embedding"]


def transcript_canary(http: httpx.Client, speech: bytes) -> str:
    r = http.post("/v1/audio/transcriptions", data={"model": ASR}, files={"file": ("speech.wav", speech, "audio/wav")})
    assert r.status_code == 200, r.text
    return r.json()["text"]


@pytest.fixture(scope="module")
def http(orchard) -> Iterator[httpx.Client]:
    # A fresh connection per request: one request cannot leave a broken connection to the next.
    with httpx.Client(base_url=orchard, timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        yield client


@pytest.fixture(scope="module")
def canary(http, tmp_path_factory) -> Iterator[Canary]:
    text, replica = llm_canary(http)
    assert "Paris" in text, text
    assert llm_canary(http) == (text, replica)  # greedy answers are stable before anything else
    speech = speak_wav(SENTENCE, tmp_path_factory.mktemp("hostile"))
    replicas = replica_names()
    if replicas is not None:  # ingress, llm, embeddings, whisper: else the crash checks see nothing
        assert len(replicas) >= 4, replicas
    c = Canary(text, replica, embedding_canary(http), transcript_canary(http, speech), replicas, speech, replicas)
    yield c
    report = os.environ.get("ORCHARD_HOSTILE_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"failures": c.failures, "schemathesis_calls": c.fuzz_calls}, f, indent=1)


# ----------------------------------------------------------------------------------------
# The tests, in order: corpus, fuzz, canary again
# ----------------------------------------------------------------------------------------


def test_corpus_is_large_and_covers_every_endpoint():
    assert len(CORPUS) >= 200
    paths = {c.path.split("?")[0] for c in CORPUS}
    for p in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/audio/transcriptions",
              "/v1/audio/translations", "/v1/responses", "/v1/messages", "/v1/models", f"/v1/models/{LLM}", "/health", "/v2/models"):  # fmt: skip
        assert p in paths, p


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_hostile_request(case: Case, http: httpx.Client, canary: Canary):
    request_id = f"hostile-{INDEX[case.id]}"
    headers = case.headers | {"x-request-id": request_id}
    body = case.body() if callable(case.body) else case.body
    before = canary.current
    try:
        resp = http.request(case.method, case.path, content=body, headers=headers, timeout=case.timeout)
        problems = answer_problems(case, resp)
    except httpx.HTTPError as e:
        resp, problems = None, [f"no answer: {type(e).__name__}: {e}"]
    after = replica_names()
    if before is not None and after is not None and after != before:
        gone = sorted(n.split("#", 1)[1] for n in before - after)
        problems.append(f"replica(s) replaced during this request (crash?): {gone}")
    if problems:
        canary.failures.append(
            {
                "id": case.id,
                "request_id": request_id,
                "method": case.method,
                "path": case.path,
                "status": resp.status_code if resp is not None else None,
                "body": resp.text[:1000] if resp is not None else None,
                "problems": problems,
            }
        )
        if resp is None or after != before:
            wait_until_serving()
            canary.current = replica_names()
    assert not problems, f"{case.method} {case.path} [{request_id}]: " + "; ".join(problems)


# Schemathesis: every operation of /openapi.json, schema-valid and schema-violating examples.
LLM_PATHS = {"/v1/chat/completions", "/v1/completions"}
REAL_MODEL = {"/v1/chat/completions": LLM, "/v1/completions": LLM, "/v1/embeddings": EMB}


def _tame(case, path: str) -> None:
    """Keep generated LLM requests short (max_tokens <= 4), and let most of them name a real
    model (generated names would all end at 404)."""
    body = case.body
    if not isinstance(body, dict):
        return
    if path in REAL_MODEL and isinstance(body.get("model"), str) and zlib.crc32(repr(body).encode()) % 4:
        body["model"] = REAL_MODEL[path]
    if path in LLM_PATHS:
        limited = False
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if isinstance(v, float) and math.isfinite(v) and v.is_integer():
                v = body[key] = int(v)
            if isinstance(v, str) and v.strip().isdigit():
                v = body[key] = int(v)
            if type(v) is int and v > 4:
                body[key] = 4
            limited = limited or type(body.get(key)) is int
        if not limited and body.get("max_tokens") is None:
            body["max_tokens"] = 4


def test_schemathesis_fuzz(orchard, canary: Canary):
    import schemathesis
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings

    schema = schemathesis.openapi.from_url(f"{orchard}/openapi.json", timeout=60)
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(
                max_examples=25,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                verbosity=Verbosity.quiet,
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                nonlocal calls
                _tame(case, operation.path)
                calls += 1
                label = f"{mode.value} {case.method} {case.formatted_path}"
                try:
                    resp = case.call(base_url=orchard, timeout=120)
                except Exception as e:  # noqa: BLE001 - a dropped connection is a failure too
                    failures.append(f"{label}: no answer: {type(e).__name__}: {e}")
                    return
                s = resp.status_code
                problems = [f"{s} server error"] if s >= 500 else []
                if not 200 <= s < 300:
                    ctype = (resp.headers.get("content-type") or [""])[0]  # schemathesis: lists of values
                    problems += error_body_problems(ctype, resp.content)
                if problems:
                    failures.append(f"{label} body={json.dumps(case.body, default=repr)[:300]}: {'; '.join(problems)}")

            try:
                fuzz()
            except Exception as e:  # noqa: BLE001 - e.g. no schema-violating input exists for the operation
                if "Unsatisfiable" not in type(e).__name__ and "unsatisfiable" not in str(e).lower():
                    label = f"{mode.value} {operation.method.upper()} {operation.path}"
                    failures.append(f"{label}: {type(e).__name__}: {e}")
    canary.failures += [{"id": "schemathesis", "problems": [f]} for f in failures]
    canary.fuzz_calls = calls
    assert not failures, f"{len(failures)} of {calls} fuzzed requests broke the contract:\n" + "\n".join(failures[:60])
    assert calls >= 50, calls


def test_canary_is_unchanged_after_the_corpus(http, canary: Canary):
    """The module's last test: the replicas that served the canary serve it again, identically."""
    text, replica = llm_canary(http)
    assert replica == canary.llm_replica, "the LLM canary is served by another replica than before"
    assert text.encode() == canary.llm_text.encode(), (text, canary.llm_text)
    assert embedding_canary(http) == canary.embedding
    assert transcript_canary(http, canary.speech) == canary.transcript
    after = replica_names()
    if canary.replicas is not None:
        assert after == canary.replicas, f"replicas replaced: {sorted(canary.replicas ^ after)}"

"""What crosses between the ingress and the model replicas: plain dataclasses, no MLX.

The ingress runs anywhere (it reserves no CPU and may sit on a node without MLX), so
it imports these and the protocol models, never an engine. Replicas turn them into
engine arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

# What a request gets when neither it nor the model's config says otherwise.
BUILTIN_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation. ``None`` means "the model's default": the replica
    fills those in (``with_defaults``), so the ingress never carries model settings."""

    max_tokens: int | None = None  # None: whatever the context leaves, capped by the engine's default
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    json_schema: str | None = None  # structured output: the text of a JSON schema the answer must match
    grammar: str | None = None  # or a Lark grammar (llguidance's dialect): forced tool calls
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely (0-20)
    prefilled: int = 0  # prompt tokens the grammar reads as already generated (a forced call's opening)

    def with_defaults(self, **defaults: float | int | None) -> SamplingParams:
        """Unset fields from ``defaults`` (a model's config), then from the built-in values."""
        unset: dict[str, Any] = {
            f.name: defaults.get(f.name) if defaults.get(f.name) is not None else BUILTIN_SAMPLING[f.name]
            for f in fields(self)
            if f.name in BUILTIN_SAMPLING and getattr(self, f.name) is None
        }
        return replace(self, **unset) if unset else self

    def with_changes(self, **changes) -> SamplingParams:
        return replace(self, **changes)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Accepted:
    """First item of every LLM generate stream: the request passed its checks and its
    sequences joined the batch on this replica."""

    prompt_tokens: int
    served_by: str  # "<deployment>#<replica id>@<node id prefix>", for the X-Orchard-Replica header
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    bytes: list[int]
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token, its log probability and the most likely alternatives."""

    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list[TopLogprob]


@dataclass(slots=True)
class ToolCallDelta:
    """Part of a tool call: its first delta has the id and the name, later ones more of the
    arguments (a JSON object, as text). A call read whole comes as one delta with all three."""

    index: int  # the call's place among the choice's calls
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolRequest:
    """The request's functions and what it asks of them; the replica renders them through
    the model's chat template and reads calls in the model's own format."""

    functions: list[dict]  # OpenAI function objects: name, description, parameters
    choice: str = "auto"  # "auto" | "required" | "none" | a function's name (forced)
    parallel: bool = True


@dataclass(slots=True)
class ChoiceChunk:
    """New output of one choice (several engine steps may be coalesced). Only what the
    ingress reads: with ``stream=False`` one chunk per choice, holding all of it. Answer
    text, reasoning and tool calls come apart here; the ingress shapes them per API."""

    index: int
    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | None while running
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] | None = None
    logprobs: list[TokenLogprob] | None = None
    stop_sequence: str | None = None  # the stop string that ended it, if one did


@dataclass
class LoadedModel:
    """One model loaded on one replica, as the replica reports it to the model manager."""

    name: str
    pinned: bool
    nbytes: int  # estimated weights + KV budget
    in_flight: int
    loaded_at: float  # epoch seconds
    last_used: float
    closing: bool = False  # being unloaded: no new requests, finishing the ones it has


@dataclass
class ReplicaReport:
    """A family replica's loaded models, sent to the model manager every few seconds."""

    replica_id: str
    deployment: str
    family: str
    node_id: str
    models: list[LoadedModel]
    memory_budget: int
    memory_used: int


@dataclass
class SpeechStart:
    """First item of a speech stream: the request passed the replica's checks (the ingress may send 200)."""

    media_type: str
    sample_rate: int
    chunks: int  # pieces of text synthesized one after another
    phonemes: int
    served_by: str


@dataclass
class SpeechEnd:
    """Last item of a speech stream: what was said and made."""

    phonemes: int
    samples: int


@dataclass
class ImagesStart:
    """First item of an image stream: the request passed the replica's checks."""

    width: int
    height: int
    steps: int
    seed: int
    served_by: str


@dataclass
class ImageOut:
    """One encoded image: a final one (``partial`` None) or the ``partial``-th preview of image ``index``."""

    index: int
    data: bytes
    partial: int | None = None

"""The typed ``args:`` block of ``serve_config.yaml``: what ``graph.build_app`` is built from.

Ray validates the YAML against ``OrchardArgs`` before anything starts, so a typo in a
model entry fails ``serve run`` at once instead of inside a replica.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DeploymentOptions(Strict):
    """The Ray Serve deployment options a user tunes per family (passed to ``.options``)."""

    num_replicas: int | Literal["auto"] | None = None
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = None
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] | None = None
    max_replicas_per_node: int | None = Field(None, ge=1)
    placement_group_bundles: list[dict[str, float]] | None = None
    placement_group_strategy: str | None = None
    health_check_period_s: float | None = None
    health_check_timeout_s: float | None = None
    graceful_shutdown_timeout_s: float | None = None

    def ray_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class SamplingDefaults(Strict):
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)


def _with_env(opts: dict[str, Any], env_vars: dict[str, str]) -> dict[str, Any]:
    actor = dict(opts.get("ray_actor_options") or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**env_vars, **(runtime_env.get("env_vars") or {})}
    actor["runtime_env"] = runtime_env
    opts["ray_actor_options"] = actor
    return opts


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class ModelEntry(Strict):
    name: str = Field(description="the id clients send as `model`")
    source: str = Field(
        description="a local MLX directory, a Hugging Face repo id, a .gguf file, "
        "or package:<python_package>/<path inside it>"
    )
    aliases: list[str] = []
    sha256: str | None = Field(None, description="checked before converting a file source")
    pinned: bool = Field(
        True, description="loaded when a replica starts and never evicted (false: loaded on first use, evictable)"
    )
    dedicated: bool = Field(
        False,
        description="its own deployment (own replicas, `deployment:` options) instead of a place in its family's pool",
    )
    deployment: DeploymentOptions = DeploymentOptions()

    @model_validator(mode="after")
    def _deployment_only_when_dedicated(self):
        if not self.dedicated and "deployment" in self.model_fields_set:
            raise ValueError(
                f"{self.name}: `deployment` options apply to a model with `dedicated: true`; "
                "models in a family's pool share the pool's deployment (`pools.<family>.deployment`)"
            )
        return self

    @field_validator("name", "aliases")
    @classmethod
    def _valid_names(cls, v):
        for name in [v] if isinstance(v, str) else v:
            if not _NAME.match(name):
                raise ValueError(f"invalid model name {name!r}")
        return v

    def all_names(self) -> list[str]:
        return [self.name, *self.aliases]

    def dedicated_pool(self) -> PoolOptions:
        """A dedicated model is a pool of its own: one model, this entry's deployment options."""
        return PoolOptions(max_num_models_per_replica=1, deployment=self.deployment, batching=getattr(self, "batching", None))


class SpeculativeOptions(Strict):
    """Speculative decoding inside the continuous batch, for greedy requests (their answers
    do not change). Each step verifies drafts only where that has been measured faster."""

    method: Literal["prompt_lookup", "draft_model"] = Field(
        "prompt_lookup",
        description="prompt_lookup: draft what followed the same n-gram earlier in the context; "
        "draft_model: a smaller model of the same vocabulary drafts",
    )
    draft_model: str | None = Field(None, description="draft_model's source (like a model's `source`)")
    draft_sha256: str | None = Field(None, description="the draft model file's checksum, where its source is one file")
    num_draft_tokens: int = Field(4, ge=1, le=32, description="most tokens drafted per sequence per step")
    ngram_max: int = Field(4, ge=1, le=16, description="longest context suffix looked up")
    ngram_min: int = Field(2, ge=1, le=16, description="shortest context suffix looked up")
    adaptive: bool = Field(True, description="verify drafts only in steps where that measured faster here")

    @model_validator(mode="after")
    def _ngram_range(self):
        if self.ngram_min > self.ngram_max:
            raise ValueError("ngram_min must not exceed ngram_max")
        if (self.method == "draft_model") != (self.draft_model is not None):
            raise ValueError("draft_model names the draft model exactly when method is draft_model")
        return self


class GenerativeEntry(ModelEntry):
    """What every text-generating model's entry has: the LLM and vision-language families."""

    max_batch_size: int = Field(32, ge=1, description="sequences decoded together per step")
    prefill_batch_size: int = Field(8, ge=1, description="prompts admitted and prefilled together")
    prefill_step_size: int = Field(512, ge=16, description="prompt tokens per prefill chunk")
    default_max_tokens: int = Field(2048, ge=1)
    max_tokens_limit: int | None = Field(None, ge=1, description="requests asking for more max_tokens get 400")
    context_length: int | None = Field(None, ge=16, description="overrides the model's own context length")
    chat_template: str | None = Field(
        None,
        description="a Jinja chat template replacing the model's: inline, a path to a .jinja file, or the name of "
        "one Orchard ships (chatml-tools: ChatML with Hermes-style tool calling)",
    )
    tool_parser: str | None = Field(
        None,
        description="how the model writes tool calls: hermes (qwen), llama3, mistral, mistral_v11, qwen3_coder, "
        "harmony (default: read from the chat template; none found: tools are refused)",
    )
    reasoning_parser: str | None = Field(
        None, description="reasoning markers: think (<think>...</think>), seed_think, harmony (default: from the template)"
    )
    prefix_cache_size: int = Field(16, ge=0, description="finished sequences whose KV cache is kept for reuse")
    prefix_cache_gb: float = Field(1.0, gt=0, description="bytes the prefix cache may hold, in GB")
    prefix_cache_disk_gb: float = Field(
        0.0, ge=0, description="the prefix cache's disk tier, in GB (0: off); survives restarts; "
        "under $ORCHARD_CACHE/prefix-cache/<model> unless prefix_cache_dir says"
    )
    prefix_cache_dir: str | None = Field(None, description="where the disk tier lives")
    kv_cache_gb: float | Literal["auto"] = Field(
        "auto",
        description="KV-cache memory the running sequences may grow to; a sequence is admitted only when "
        "its prompt + max_tokens fit (auto: a quarter of the machine's memory)",
    )
    max_waiting: int = Field(256, ge=1, description="sequences waiting for a batch slot; beyond, 503")
    max_queue_wait_s: float | None = Field(
        20.0, gt=0, description="a sequence not in the batch after this long is shed with 503 (None: never)"
    )
    sampling: SamplingDefaults = SamplingDefaults()

    @field_validator("tool_parser")
    @classmethod
    def _known_tool_parser(cls, v):
        from mlx_orchard.parsers.tool_formats import TOOL_FORMATS

        if v is not None and v not in TOOL_FORMATS:
            raise ValueError(f"unknown tool_parser {v!r}; known: {sorted(TOOL_FORMATS)}")
        return v

    @field_validator("reasoning_parser")
    @classmethod
    def _known_reasoning_parser(cls, v):
        from mlx_orchard.parsers.output import REASONING_FORMATS

        if v is not None and v not in (*REASONING_FORMATS, "harmony"):
            raise ValueError(f"unknown reasoning_parser {v!r}; known: {sorted([*REASONING_FORMATS, 'harmony'])}")
        return v


class LLMEntry(GenerativeEntry):
    dequantize: bool | Literal["auto"] = Field(
        "auto",
        description="GGUF only: write float32 weights (auto: yes on MLX's CPU backend, "
        "where fp32 decodes faster than 4-bit; no on Metal/CUDA)",
    )
    speculative: SpeculativeOptions | None = Field(None, description="speculative decoding (off: none)")
    kv_bits: Literal[2, 3, 4, 5, 6, 8] | None = Field(
        None, description="quantize the KV cache to these bits (off: none); 8 keeps answers, 4 costs small models "
        "their accuracy; admission counts the smaller bytes, so more sequences fit"
    )
    kv_group_size: Literal[32, 64, 128] = Field(64, description="values sharing one scale in the quantized KV cache")


class VLMEntry(GenerativeEntry):
    """A vision-language model (mlx-vlm): chat with images, in the same continuous batch as text."""

    image_cache_size: int = Field(64, ge=0, description="images whose vision-encoder features are kept for reuse")
    image_cache_mb: float = Field(512.0, gt=0, description="memory those features may hold, in MB")


class BatchingOptions(Strict):
    """``@serve.batch`` knobs; live-tunable through the deployment's ``user_config``."""

    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)


def check_batches_can_fill(what: str, batching: BatchingOptions, deployment: DeploymentOptions) -> None:
    # Serve admits at most max_ongoing_requests per replica and runs one batch at a
    # time here (max_concurrent_batches=1): a larger batch could never fill.
    limit = deployment.max_ongoing_requests
    need = batching.max_batch_size
    if limit is not None and need > limit:
        raise ValueError(
            f"{what}: batching.max_batch_size ({need}) exceeds "
            f"deployment.max_ongoing_requests ({limit}), so batches could never fill"
        )


class BatchedEntry(ModelEntry):
    batching: BatchingOptions = BatchingOptions()

    @model_validator(mode="after")
    def _batches_can_fill(self):
        if not self.dedicated and "batching" in self.model_fields_set:
            raise ValueError(
                f"{self.name}: models in a family's pool batch with the pool's knobs (`pools.<family>.batching`); "
                "`batching` here applies with `dedicated: true`"
            )
        check_batches_can_fill(self.name, self.batching, self.deployment)
        return self


class EmbeddingsEntry(BatchedEntry):
    max_batch_tokens: int = Field(16384, ge=1, description="padded tokens per forward pass")
    supports_dimensions: bool = Field(False, description="Matryoshka-trained: shorter vectors stay meaningful")


class WhisperEntry(BatchedEntry):
    batching: BatchingOptions = BatchingOptions(max_batch_size=8, batch_wait_timeout_s=0.05)
    max_audio_seconds: float = Field(3600.0, gt=0, description="longer audio is refused (decompression bombs)")


class TTSEntry(ModelEntry):
    """A text-to-speech model (mlx-audio): Kokoro converted from its PyPI ONNX export, or an
    mlx-audio directory."""

    lang_code: Literal["a", "b"] = Field("a", description="a: American English, b: British English")
    voices_dir: str | None = Field(
        None, description="more Kokoro voices: a directory of raw float32 (510, 1, 256) .bin files (npm kokoro-js)"
    )


class SeparationEntry(ModelEntry):
    """A source-separation model (mlx-audio's SAM-Audio): audio and a description of what to
    extract in, the target sound and the rest out."""

    max_audio_seconds: float = Field(600.0, gt=0, description="longer audio is refused (it is separated in 10 s chunks)")


class ImagesEntry(BatchedEntry):
    """An image generation model (mflux), named by its preset: the pipeline, its default steps
    and guidance. ``source`` is a local directory or a Hub repo of that pipeline's weights."""

    batching: BatchingOptions = BatchingOptions(max_batch_size=4, batch_wait_timeout_s=0.05)
    preset: Literal["flux-schnell", "flux-dev", "flux-kontext-dev", "flux2-klein", "z-image-turbo", "qwen-image",
                    "qwen-image-edit"] | None = Field(
        None, description="the mflux pipeline the weights are for (default: read from the model's model_index.json)")
    quantize: Literal[3, 4, 5, 6, 8] | None = Field(None, description="quantize the weights to this many bits at load")
    default_size: str = Field("1024x1024", pattern=r"^\d{2,5}x\d{2,5}$", description="the size `auto` means")
    max_pixels: int = Field(2048 * 2048, ge=256, description="largest width x height a request may ask for")
    max_steps: int = Field(100, ge=1, le=200)
    memory_gb: float | None = Field(
        None, gt=0, description="what one loaded copy holds (weights + activations at max_pixels); default: "
        "the weight files x 1.5. The pool's memory_gb and Ray resources decide where it may load"
    )


DEFAULT_REPLICA_CPUS = 0.25  # Ray's scheduling token for a family replica whose config names none


class PoolOptions(Strict):
    """A family's shared deployment: its replicas, and the models multiplexed onto each
    (Ray Serve model multiplexing: requests go to a replica that has their model loaded)."""

    max_num_models_per_replica: int = Field(
        3, ge=1, description="models loaded at once per replica (pinned ones included); beyond, the least recently used goes"
    )
    idle_timeout_s: float | None = Field(
        None, gt=0, description="a model nobody used for this long is unloaded (a request's `keep_alive` overrides it)"
    )
    memory_gb: float | Literal["auto"] = Field(
        "auto",
        description="what the models of one replica may hold (weights + KV cache, estimated before loading); "
        "a load that cannot fit gets 507 (auto: three quarters of the machine's memory)",
    )
    batching: BatchingOptions | None = Field(None, description="batched families: live knobs (default: the family's)")
    defaults: dict[str, Any] = Field(
        {}, description="settings of the family's model entry for models that are not in the config"
    )
    deployment: DeploymentOptions = DeploymentOptions()

    def ray_options(self, env_vars: dict[str, str], batching: BatchingOptions | None) -> dict[str, Any]:
        opts = _with_env(self.deployment.ray_options(), env_vars)
        # A model replica's MLX work is one thread. Serve's default reservation (1 CPU a replica)
        # would leave a 2-core machine no room for a fifth family: its replica would never start.
        opts["ray_actor_options"].setdefault("num_cpus", DEFAULT_REPLICA_CPUS)
        if batching is not None:  # the deployment's user_config: batching knobs change live
            opts["user_config"] = batching.model_dump()
            opts.setdefault("max_ongoing_requests", 2 * batching.max_batch_size)
        return opts


class ModelsOptions(Strict):
    """Models beyond the configured ones: found on disk, downloaded, loaded on demand."""

    on_demand: bool = Field(
        False,
        description="an unknown id that names a Hugging Face repo is downloaded and loaded on first use "
        "(by the family's pool: a family with no configured models needs `pools.<family>` to have one)",
    )
    management_api: bool = Field(
        True, description="POST /v1/models/download, /load, /unload and DELETE /v1/models/{id} (behind the API key)"
    )
    search_dirs: list[str] = Field(
        [], description="directories of local models (<dir>/<name> or <dir>/<owner>/<name>); default $ORCHARD_CACHE/models"
    )
    hf_cache_dir: str | None = Field(None, description="the Hugging Face cache to list and download into (default: HF's)")
    hub_endpoint: str | None = Field(None, description="a Hugging Face Hub mirror (default: HF_ENDPOINT or huggingface.co)")
    families: dict[str, str] = Field({}, description="model id -> family, where detection from the files is wrong")
    report_interval_s: float = Field(1.0, gt=0, le=60, description="how often replicas report their loaded models")


class ImageOptions(Strict):
    """Images in chat requests (vision models): what the ingress accepts and fetches."""

    max_image_mb: float = Field(20.0, gt=0, description="largest image, as sent or fetched")
    max_image_pixels: int = Field(40_000_000, ge=1, description="most pixels of one decoded image")
    fetch_timeout_s: float = Field(10.0, gt=0, description="an http(s) image not fetched by then: 400")
    max_redirects: int = Field(3, ge=0, le=10)
    max_images: int = Field(16, ge=1, le=256, description="images per request")
    max_edge: int = Field(3072, ge=64, description="longer image sides are scaled down to this once decoded")
    allow_private_networks: bool = Field(
        False, description="fetch image URLs that resolve to private, loopback or link-local addresses "
        "(off: no server-side request forgery into the server's network)"
    )

    def limits(self):
        from mlx_orchard.images import ImageLimits

        return ImageLimits(
            max_bytes=int(self.max_image_mb * 1e6),
            max_pixels=self.max_image_pixels,
            timeout_s=self.fetch_timeout_s,
            max_redirects=self.max_redirects,
            allow_private_networks=self.allow_private_networks,
            max_images=self.max_images,
            max_edge=self.max_edge,
        )


class IngressOptions(Strict):
    api_key: str | None = Field(
        None, description="require `Authorization: Bearer <key>` on /v1/*; env ORCHARD_API_KEY also works"
    )
    cors_origins: list[str] = ["*"]
    max_upload_mb: float = Field(25.0, gt=0, description="largest audio upload; bigger gets 413")
    max_body_mb: float = Field(16.0, gt=0, description="largest JSON request body; bigger gets 413")
    request_timeout_s: float = Field(600.0, gt=0, description="a request still unanswered after this gets 504")
    sse_keepalive_s: float = Field(
        15.0, ge=0, description="an SSE comment after this long without an event (a long prefill); 0: never"
    )
    default_priority: dict[str, int] = Field(
        {}, description="LLM scheduling priority by path when a request names none (lower runs first, default 0), "
        "e.g. {'/v1/messages': 10} to put agents behind interactive chat"
    )
    responses_store_size: int = Field(
        1000, ge=0, description="Responses API: stored responses (previous_response_id), least recently used out; per ingress replica"
    )
    responses_store_mb: float = Field(64.0, gt=0, description="Responses API: bytes the stored responses may hold")
    images: ImageOptions = ImageOptions()
    image_urls_ttl_s: float = Field(
        3600.0, gt=0, description="images answered as `url` (response_format: url) are served this long by the ingress"
    )
    image_urls_mb: float = Field(256.0, gt=0, description="bytes those images may hold (oldest out first); per ingress replica")
    realtime_model: str | None = Field(
        None, description="the transcription model of /v1/realtime sockets that name none (?model= or session.update)"
    )
    playground: bool = Field(
        True, description="serve the playground page at / (it uses only the public API, with the key the user enters); false: / is a 404"
    )
    deployment: DeploymentOptions = DeploymentOptions()

    def ray_options(self, env_vars: dict[str, str]) -> dict[str, Any]:
        opts = self.deployment.ray_options()
        return _with_env(opts, env_vars) if env_vars else opts


class RuntimeOptions(Strict):
    blas: Literal["auto", "reference"] | str = Field(
        "auto",
        description="Linux CPU backend: auto preloads Debian's OpenBLAS into replicas when installed; "
        "'reference' keeps the wheel's BLAS; any other value is a path to a BLAS library to preload",
    )
    env_vars: dict[str, str] = {}
    metrics: bool = Field(
        True, description="Orchard's metrics (ray_orchard_* in the Ray dashboard and Prometheus); false: none are recorded"
    )


def __getattr__(name: str):
    # OrchardArgs is built from the family registry, which itself names the entries above.
    if name == "OrchardArgs":
        from mlx_orchard.families import OrchardArgs

        return OrchardArgs
    raise AttributeError(name)

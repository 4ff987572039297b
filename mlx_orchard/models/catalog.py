"""What models this machine holds, and what they are, read from their files alone.

Plain Python (no Ray, no MLX): the catalog lists model directories under the configured
search dirs and the Hugging Face cache, tells each one's family from its config files,
and deletes a model only where it may. Ids arrive from clients, so every id is checked
before it is joined to a path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlx_orchard.errors import InvalidRequestError

logger = logging.getLogger("orchard.catalog")

_MODEL_ID_CHARS = re.compile(r"[A-Za-z0-9._:/-]+")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
_DRIVE = re.compile(r"[A-Za-z]:([/\\]|$)")


def _invalid(message: str, param: str, code: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def _shown(value: str) -> str:
    # repr escapes control characters; a hostile id may be long, so only its start is echoed.
    return repr(value[:64] + ("..." if len(value) > 64 else ""))


def check_model_id(value: str, param: str = "model") -> str:
    """``value`` unchanged if it can name a model; InvalidRequestError if it could escape a directory."""
    code = "invalid_model_id"
    if not isinstance(value, str) or not value:
        raise _invalid("model id must be a non-empty string", param, code)
    if len(value) > 128:
        raise _invalid(f"model id {_shown(value)} is longer than 128 characters", param, code)
    if value.startswith(("/", "~", "\\")) or _DRIVE.match(value):
        raise _invalid(f"model id {_shown(value)} must be a name, not an absolute path", param, code)
    if not _MODEL_ID_CHARS.fullmatch(value):
        raise _invalid(f"model id {_shown(value)} may only contain letters, digits and . _ : / -", param, code)
    segments = value.split("/")
    if len(segments) > 2:
        raise _invalid(f"model id {_shown(value)} has more than two path segments", param, code)
    for segment in segments:
        # Covers "..", ".hidden", "-flag", and the empty segments of "a//b" and "a/".
        if not segment or segment.startswith((".", "-")):
            raise _invalid(f"model id {_shown(value)} has an empty segment or one that starts with '.' or '-'", param, code)
    return value


def check_repo_id(value: str, param: str = "repo_id") -> str:
    """A Hugging Face model repo id, ``owner/name``, as the Hub accepts it."""
    code = "invalid_repo_id"
    parts = value.split("/") if isinstance(value, str) else []
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts):
        raise _invalid(f"repo id {_shown(str(value))} must be 'owner/name' (letters, digits, . _ -)", param, code)
    # "--" is the separator of the cache's folder names (models--owner--name): the Hub forbids it too.
    if ".." in value or "--" in value or value.endswith(".git"):
        raise _invalid(f"repo id {_shown(value)} must not contain '..' or '--' nor end with '.git'", param, code)
    return value


def check_revision(value: str, param: str = "revision") -> str:
    """A branch, tag or commit hash; it becomes a file name under the cache's ``refs/``."""
    if not isinstance(value, str) or not _REVISION.fullmatch(value) or ".." in value or "//" in value or value.endswith("/"):
        raise _invalid(f"revision {_shown(str(value))} is not a branch, tag or commit hash", param, "invalid_revision")
    return value


# --- families ---------------------------------------------------------------------------

_TTS_TYPES = {"kokoro", "csm", "sesame", "outetts", "spark", "dia", "bark", "orpheus", "llasa", "vibevoice", "chatterbox", "parler_tts"}
_ENCODER_TYPES = {"bert", "roberta", "xlm_roberta", "nomic_bert", "modernbert", "distilbert", "mpnet", "e5", "electra", "camembert", "deberta_v2"}
_SENTENCE_TRANSFORMERS = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_PROCESSORS = ("preprocessor_config.json", "processor_config.json")
_LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass
class _Files:
    """What the family rules look at: a directory's config.json and its file names."""

    path: Path
    config: dict[str, Any]
    names: set[str]

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type") or "").lower().replace("-", "_")

    @property
    def architectures(self) -> list[str]:
        archs = self.config.get("architectures")
        return [str(a) for a in archs] if isinstance(archs, list) else []

    def json(self, name: str) -> dict[str, Any]:
        return _read_json(self.path / name) if name in self.names else {}


def _is_tts(f: _Files) -> bool:
    # Kokoro's config has no model_type upstream, but its istftnet/plbert blocks are unmistakable.
    return f.model_type in _TTS_TYPES or (f.path / "voices").is_dir() or {"istftnet", "plbert"} <= f.config.keys()


def _is_separation(f: _Files) -> bool:
    # SAM-Audio: a codec, a DiT and a text encoder in one config.
    return f.model_type == "sam_audio" or {"audio_codec", "transformer", "text_encoder"} <= f.config.keys()


def _is_transcription(f: _Files) -> bool:
    whisper_dims = "n_audio_ctx" in f.config or {"n_mels", "n_text_ctx"} <= f.config.keys()
    ctranslate2 = "model.bin" in f.names and any(n.startswith("vocabulary.") for n in f.names)
    return f.model_type == "whisper" or whisper_dims or ctranslate2


def _is_images(f: _Files) -> bool:
    pipeline = "_class_name" in f.json("model_index.json")
    return pipeline or ((f.path / "transformer").is_dir() and (f.path / "vae").is_dir())


def _is_causal(f: _Files) -> bool:
    return any(a.endswith(_LM_HEADS) for a in f.architectures)


def _is_embeddings(f: _Files) -> bool:
    # Sentence-transformers files win even over a causal LM head (Qwen3-Embedding ships one).
    return any(n in f.names for n in _SENTENCE_TRANSFORMERS) or (f.model_type in _ENCODER_TYPES and not _is_causal(f))


def _is_vlm(f: _Files) -> bool:
    if "vision_config" in f.config:
        return True
    image_processor = any("image_processor_type" in p or "image_mean" in p for p in map(f.json, _PROCESSORS))
    text_model = "text_config" in f.config or _is_causal(f) or "vocab_size" in f.config
    return image_processor and text_model


def _is_llm(f: _Files) -> bool:
    text = f.config.get("text_config")
    has_vocab = "vocab_size" in f.config or (isinstance(text, dict) and "vocab_size" in text)
    return _is_causal(f) or (bool(f.model_type) and has_vocab) or any(n.endswith(".gguf") for n in f.names)


# First match wins: specific formats before the generic "has a vocabulary" LLM rule, so a
# whisper or BERT directory (both have vocab_size) is never called an LLM.
_FAMILY_RULES: tuple[tuple[str, Callable[[_Files], bool]], ...] = (
    ("tts", _is_tts),
    ("separation", _is_separation),
    ("transcription", _is_transcription),
    ("images", _is_images),
    ("embeddings", _is_embeddings),
    ("vlm", _is_vlm),
    ("llm", _is_llm),
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _names(path: Path) -> set[str]:
    try:
        return {p.name for p in path.iterdir()}
    except OSError:
        return set()


def detect_family(path: Path) -> str | None:
    """The family of the model in directory ``path`` (or a ``.gguf`` file); None if it has no config at all."""
    if path.is_file():
        return "llm" if path.suffix == ".gguf" else None
    names = _names(path)
    if not names & {"config.json", "model_index.json"} and not any(n.endswith(".gguf") for n in names):
        return None
    files = _Files(path, _read_json(path / "config.json") if "config.json" in names else {}, names)
    return next((family for family, rule in _FAMILY_RULES if rule(files)), None)


# --- facts ------------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".npz", ".gguf")
_CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "n_text_ctx", "n_ctx")


@dataclass
class ModelFacts:
    size_bytes: int
    quantization: dict[str, int] | None
    context_length: int | None


def _is_weight(path: Path) -> bool:
    return path.suffix in _WEIGHT_SUFFIXES or path.name == "model.bin" or path.name.startswith("weights.")


def _weight_files(path: Path) -> Iterable[Path]:
    if path.is_file():
        yield path
        return
    for p in path.rglob("*"):
        if _is_weight(p) and p.is_file():  # is_file follows the snapshot's symlinks into blobs/
            yield p


def _quantization(config: dict[str, Any]) -> dict[str, int] | None:
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        # Only MLX's format: bitsandbytes/GPTQ blocks have neither key and are not loadable here.
        if isinstance(q, dict) and isinstance(q.get("bits"), int) and isinstance(q.get("group_size"), int):
            return {"bits": q["bits"], "group_size": q["group_size"]}
    return None


def _context_length(config: dict[str, Any]) -> int | None:
    text = config.get("text_config")
    for block in (config, text if isinstance(text, dict) else {}):
        for key in _CONTEXT_KEYS:
            value = block.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def model_facts(path: Path) -> ModelFacts:
    config = _read_json(path / "config.json") if path.is_dir() else {}
    size, seen = 0, set()
    for weight in _weight_files(path):
        real = weight.resolve()
        if real not in seen:
            seen.add(real)
            size += real.stat().st_size
    return ModelFacts(size_bytes=size, quantization=_quantization(config), context_length=_context_length(config))


# --- scanning ---------------------------------------------------------------------------


@dataclass
class LocalModel:
    id: str
    path: Path
    family: str | None
    source: Literal["hf-cache", "local"]
    repo_id: str | None
    revision: str | None
    size_bytes: int
    quantization: dict[str, int] | None
    context_length: int | None
    created: int  # mtime, epoch seconds


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "model_index.json").is_file()


def _has_weights(path: Path) -> bool:
    return next(iter(_weight_files(path)), None) is not None


def is_complete_model(path: Path) -> bool:
    """A directory with a config (or a .gguf) and at least one weight file: something that can load."""
    try:
        has_config = _is_model_dir(path) or any(p.suffix == ".gguf" for p in path.iterdir())
        return has_config and _has_weights(path)
    except OSError:
        return False


def _describe(
    model_id: str,
    path: Path,
    source: Literal["hf-cache", "local"],
    repo_id: str | None = None,
    revision: str | None = None,
    created: float | None = None,
) -> LocalModel:
    facts = model_facts(path)
    return LocalModel(
        id=model_id,
        path=path,
        family=detect_family(path),
        source=source,
        repo_id=repo_id,
        revision=revision,
        size_bytes=facts.size_bytes,
        quantization=facts.quantization,
        context_length=facts.context_length,
        created=int(created if created is not None else path.stat().st_mtime),
    )


def _local_candidates(search_dir: Path) -> Iterable[tuple[str, Path]]:
    """``<dir>/<name>`` and ``<dir>/<owner>/<name>``; a model dir's own subfolders are not models."""
    for child in sorted(search_dir.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        if _is_model_dir(child):
            yield child.name, child
            continue
        for grandchild in sorted(child.iterdir()):
            if not grandchild.name.startswith(".") and grandchild.is_dir() and _is_model_dir(grandchild):
                yield f"{child.name}/{grandchild.name}", grandchild


def _scan_search_dir(search_dir: Path) -> Iterable[LocalModel]:
    try:
        candidates = list(_local_candidates(search_dir))
    except OSError as e:
        logger.warning("model search dir %s is unreadable: %s", search_dir, e)
        return
    for model_id, path in candidates:
        try:
            yield _describe(check_model_id(model_id), path, "local")
        except (OSError, InvalidRequestError) as e:
            logger.warning("skipping %s: %s", path, e)


def _pick_revision(repo: Any) -> Any:
    # The revision "main" points at, else the newest one.
    return max(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))


def _scan_hf_cache(hf_cache_dir: Path | None, exclude_repos: Iterable[str]) -> Iterable[LocalModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hf_cache_dir)
    except CacheNotFound:
        return
    except OSError as e:
        logger.warning("Hugging Face cache %s is unreadable: %s", hf_cache_dir, e)
        return
    for warning in info.warnings:
        logger.warning("skipping a corrupt Hugging Face cache entry: %s", warning)
    excluded = set(exclude_repos)
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or repo.repo_id in excluded or not repo.revisions:
            continue
        revision = _pick_revision(repo)
        snapshot = Path(revision.snapshot_path)
        try:
            if not is_complete_model(snapshot):
                logger.info("skipping %s: its snapshot %s has no config or no weights", repo.repo_id, revision.commit_hash)
                continue
            yield _describe(
                check_model_id(repo.repo_id),
                snapshot,
                "hf-cache",
                repo_id=repo.repo_id,
                revision=revision.commit_hash,
                created=revision.last_modified,
            )
        except (OSError, InvalidRequestError) as e:
            logger.warning("skipping %s: %s", repo.repo_id, e)


def scan_local(
    search_dirs: list[Path],
    hf_cache_dir: Path | None = None,
    family_overrides: dict[str, str] | None = None,
    exclude_repos: set[str] | frozenset[str] = frozenset(),
) -> dict[str, LocalModel]:
    """Every model on this machine by id: the search dirs first, then the Hugging Face cache.

    ``exclude_repos`` are repos being downloaded or whose download failed: not ready, not listed.
    Unreadable or corrupt entries are logged and skipped; scanning never raises for them.
    """
    found: dict[str, LocalModel] = {}
    local = (m for d in search_dirs if d.is_dir() for m in _scan_search_dir(d))
    for model in [*local, *_scan_hf_cache(hf_cache_dir, exclude_repos)]:
        if model.id in found:
            logger.info("model id %s at %s is shadowed by %s", model.id, model.path, found[model.id].path)
            continue
        found[model.id] = model
    for model_id, family in (family_overrides or {}).items():
        if model_id in found:
            found[model_id].family = family
    return found


def delete_local(model: LocalModel, search_dirs: list[Path], hf_cache_dir: Path | None = None) -> None:
    """Remove a model from disk: a local directory inside a search dir, or a cached Hub repo."""
    if model.source == "local":
        target = model.path.resolve()
        roots = [d.resolve() for d in search_dirs]
        # Strictly inside: a search dir itself (or anything a symlink leads out to) is never removed.
        if not any(root in target.parents for root in roots):
            raise InvalidRequestError(f"model {model.id!r} is not inside a model search dir; not deleting it", param="model", code="not_deletable")
        shutil.rmtree(target)
        return
    _delete_cached_repo(model, hf_cache_dir)


def _delete_cached_repo(model: LocalModel, hf_cache_dir: Path | None) -> None:
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hf_cache_dir)
    repos = [r for r in info.repos if r.repo_type == "model" and r.repo_id == model.repo_id]
    if not repos:
        return
    repo = repos[0]
    # Scoped to this repo: delete_revisions matches commit hashes across every cached repo.
    scoped = dataclasses.replace(info, repos=frozenset({repo}))
    scoped.delete_revisions(*(r.commit_hash for r in repo.revisions)).execute()
    repo_path = Path(repo.repo_path)
    if repo_path.is_dir() and not any(p.is_file() for p in repo_path.rglob("*")):
        shutil.rmtree(repo_path)

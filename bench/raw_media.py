"""In-process baselines for the ``@serve.batch`` families, run as their own process (started
with the BLAS preload Orchard's replicas get) and answered as JSON on stdout.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python -m bench.raw_media embeddings --model <dir> --n 32 --repeats 5
    LD_PRELOAD=... python -m bench.raw_media whisper --model <mlx dir> --wav-dir <dir> --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.media_inputs import embedding_texts, load_clips


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def embeddings(model: Path, n: int, batch: int, repeats: int) -> dict:
    """Tokenize + ``EmbeddingEngine.embed`` of ``n`` texts in calls of ``batch``: texts/s per repeat."""
    from mlx_orchard.engines.embeddings import EmbeddingEngine

    engine = EmbeddingEngine(model)
    texts = embedding_texts(n)

    def run() -> None:
        for i in range(0, n, batch):
            engine.embed(engine.tokenize(texts[i : i + batch]))

    run()  # warm-up
    walls = [_timed(run) for _ in range(repeats)]
    # The same texts one at a time: what a server without batching can at best reach.
    single = [_timed(lambda: [engine.embed(engine.tokenize([t])) for t in texts]) for _ in range(repeats)]
    return {
        "texts": n,
        "batch": batch,
        "texts_per_s": [n / w for w in walls],
        "single_texts_per_s": [n / w for w in single],
    }


def whisper(model: Path, wav_dir: Path, n: int, repeats: int) -> dict:
    """Real-time speed (audio seconds / wall seconds) of one clip, and ``n`` clips batched vs one by one."""
    from mlx_orchard.engines.whisper import ClipRequest, WhisperEngine

    engine = WhisperEngine(model, max_batch_size=n)
    clips = load_clips(wav_dir, n)
    reqs = [ClipRequest(audio) for _, audio in clips]
    seconds = [len(a) / 16_000 for _, a in clips]
    engine.transcribe(reqs[:1])  # warm-up
    engine.transcribe(reqs)
    one = [_timed(lambda: engine.transcribe(reqs[:1])) for _ in range(repeats)]
    batched = [_timed(lambda: engine.transcribe(reqs)) for _ in range(repeats)]
    sequential = [_timed(lambda: [engine.transcribe([r]) for r in reqs]) for _ in range(repeats)]
    texts = [r.text for r in engine.transcribe(reqs)]
    return {
        "clips": n,
        "one_clip_audio_s": seconds[0],
        "batch_audio_s": sum(seconds),
        "one_wall_s": one,
        "batched_wall_s": batched,
        "sequential_wall_s": sequential,
        "texts": texts,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="family", required=True)
    e = sub.add_parser("embeddings")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--n", type=int, default=32)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--repeats", type=int, default=5)
    w = sub.add_parser("whisper")
    w.add_argument("--model", type=Path, required=True)
    w.add_argument("--wav-dir", type=Path, required=True)
    w.add_argument("--n", type=int, default=8)
    w.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import mlx.core as mx

    if args.family == "embeddings":
        out = embeddings(args.model, args.n, args.batch, args.repeats)
    else:
        out = whisper(args.model, args.wav_dir, args.n, args.repeats)
    out |= {"ld_preload": os.environ.get("LD_PRELOAD"), "device": str(mx.default_device())}
    print(json.dumps(out), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()

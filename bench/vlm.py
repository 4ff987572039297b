"""Vision-language generation (issue #12), side by side in one run:

    python -m bench.vlm [--tokens 32] [--rounds 2]

A random-weight SmolVLM built with mlx-vlm's classes (no package ships real small VLM
weights): SigLIP-style tower on 384-pixel images (144 image tokens each), a 4-layer text
model. Everything runs in this process, on the same model files:

1. Throughput: 1 and 8 requests at once, each one image (different pixels) and a question,
   greedy, ``--tokens`` new tokens each. Orchard's ``VLMEngine`` (continuous batch) with the
   8 together vs the same 8 one after another; and mlx-vlm's own ``stream_generate`` one by
   one, and its ``batch_generate`` (a static batch of 8), as peers. Images/s (requests
   answered per second, one image each) and generated tok/s.
2. The encoder cache: a 6-turn conversation about one image, each turn re-sending the image
   after a different opening line (so no cached prefix reaches it and every turn prefills
   it). Encoder cache on vs off (prefix cache off in both): seconds per conversation and
   time to first token of the later turns.

Writes bench/results/vlm-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import datetime
from pathlib import Path

from PIL import Image, ImageDraw

from bench.compare_llm import ROOT, _git_commit, log, model_dir
from bench.family_server import write_report
from mlx_orchard.engines.sampling import SamplingParams
from mlx_orchard.engines.vlm import VLMEngine
from mlx_orchard.images import LoadedImage, pixel_hash
from mlx_orchard.runtime import mlx_uses_cpu_backend

QUESTION = "Describe this picture in detail."
FAILED_PEERS: dict[str, str] = {}


def picture(i: int) -> LoadedImage:
    image = Image.new("RGB", (480, 360), ((37 * i) % 256, (91 * i) % 256, (53 * i + 100) % 256))
    ImageDraw.Draw(image).ellipse((20 + 10 * i, 30, 200 + 10 * i, 300), fill=(250 - 20 * i, 20 * i, 128))
    return LoadedImage(image, pixel_hash(image), "png")


def build_model() -> Path:
    from tests.vlm_model import build_tiny_smolvlm

    tokenizer = model_dir(ROOT / "serve_config.yaml", dequantize=mlx_uses_cpu_backend())[1]
    out = Path.home() / ".cache" / "orchard" / "bench" / "smolvlm-384-w256"
    return build_tiny_smolvlm(out, tokenizer, image_size=384, patch=16, vision_hidden=256, vision_layers=4,
                              text_hidden=256, text_layers=4)


def chat(engine: VLMEngine, image: LoadedImage, lead: str = "") -> tuple[list[int], list]:
    parts = ([{"type": "text", "text": lead}] if lead else []) + [{"type": "image"}, {"type": "text", "text": QUESTION}]
    return engine.encode_vision_chat([{"role": "user", "content": parts}], [image])


async def answer(engine: VLMEngine, image: LoadedImage, tokens: int, lead: str = "") -> tuple[int, float]:
    """Generated tokens and seconds to the first of them."""
    ids, spans = chat(engine, image, lead)
    t0 = time.perf_counter()
    first, count = None, 0
    async for chunk in engine.generate(ids, SamplingParams(max_tokens=tokens, temperature=0), media=spans):
        first = first if first is not None else time.perf_counter() - t0
        count += len(chunk.token_ids)
    return count, first or 0.0


async def orchard_rates(path: Path, tokens: int, rounds: int) -> dict[str, tuple[float, float]]:
    """{setting: (images/s, tok/s)} for Orchard's engine; fresh images every round."""
    engine = VLMEngine(path, prefix_cache_size=0, image_cache_size=0, max_batch_size=16)
    out: dict[str, list[tuple[float, float]]] = {"1 request": [], "8 together": [], "8 one by one": []}
    try:
        await answer(engine, picture(99), 4)  # warm-up
        for r in range(rounds):
            images = [picture(10 * r + i) for i in range(8)]
            t0 = time.perf_counter()
            n = (await answer(engine, images[0], tokens))[0]
            out["1 request"].append((1 / (time.perf_counter() - t0), n / (time.perf_counter() - t0)))
            t0 = time.perf_counter()
            done = await asyncio.gather(*(answer(engine, i, tokens) for i in images))
            s = time.perf_counter() - t0
            out["8 together"].append((8 / s, sum(d[0] for d in done) / s))
            t0 = time.perf_counter()
            n = 0
            for i in images:
                n += (await answer(engine, i, tokens))[0]
            s = time.perf_counter() - t0
            out["8 one by one"].append((8 / s, n / s))
    finally:
        engine.shutdown()
    return {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in out.items()}


def mlx_vlm_rates(path: Path, tokens: int, rounds: int) -> dict[str, tuple[float, float]]:
    """mlx-vlm's own loops: stream_generate one by one, batch_generate on all 8."""
    import mlx_vlm
    from mlx_vlm import batch_generate, stream_generate

    model, processor = mlx_vlm.load(str(path))
    template = processor.tokenizer.chat_template
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False, add_generation_prompt=True, chat_template=template)
    out: dict[str, list[tuple[float, float]]] = {"mlx-vlm stream_generate, 8 one by one": [],
                                                  "mlx-vlm batch_generate, 8 at once": []}
    for r in range(rounds):
        images = [picture(10 * r + i).image for i in range(8)]
        t0 = time.perf_counter()
        n = 0
        for image in images:
            n += sum(1 for _ in stream_generate(model, processor, prompt, image=[image], max_tokens=tokens, temperature=0.0))
        s = time.perf_counter() - t0
        out["mlx-vlm stream_generate, 8 one by one"].append((8 / s, n / s))
        try:
            t0 = time.perf_counter()
            result = batch_generate(model, processor, images=images, prompts=[prompt] * 8, max_tokens=tokens)
            s = time.perf_counter() - t0
            generated = sum(len(processor.tokenizer.encode(t)) for t in result.texts)
            out["mlx-vlm batch_generate, 8 at once"].append((8 / s, generated / s))
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            log(f"batch_generate failed: {type(e).__name__}: {e}")
            FAILED_PEERS["mlx-vlm batch_generate, 8 at once"] = f"{type(e).__name__}: {e}"
    return {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in out.items() if v}


async def encoder_cache(path: Path, turns: int) -> dict[str, tuple[float, float, int]]:
    """{setting: (seconds per conversation, median TTFT of turns 2.., encoder passes)}."""
    out = {}
    for name, size in (("encoder cache on", 64), ("encoder cache off", 0)):
        engine = VLMEngine(path, prefix_cache_size=0, image_cache_size=size)
        try:
            await answer(engine, picture(98), 2)  # warm-up (another image)
            image = picture(7)
            before = engine.stats().images_encoded
            t0 = time.perf_counter()
            ttfts = [(await answer(engine, image, 8, lead=f"Turn {t}: look again."))[1] for t in range(turns)]
            out[name] = (time.perf_counter() - t0, statistics.median(ttfts[1:]), engine.stats().images_encoded - before)
        finally:
            engine.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()
    path = build_model()
    log(f"model: {path}")
    rates = asyncio.run(orchard_rates(path, args.tokens, args.rounds))
    log(f"orchard: {rates}")
    peers = mlx_vlm_rates(path, args.tokens, args.rounds)
    log(f"mlx-vlm: {peers}")
    cache = asyncio.run(encoder_cache(path, args.turns))
    log(f"encoder cache: {cache}")

    lines = [f"# Vision-language generation — {datetime.now():%Y-%m-%d %H:%M}", "",
             f"commit {_git_commit()}; `python -m bench.vlm --tokens {args.tokens} --rounds {args.rounds}`; "
             f"random-weight SmolVLM (384 px images = 144 image tokens, 4+4 layers, width 256), greedy, "
             f"{args.tokens} tokens per answer, medians of {args.rounds} rounds.", "",
             "| setting | images/s | generated tok/s |", "|---|---:|---:|"]
    for name, (ips, tps) in {**rates, **peers}.items():
        lines.append(f"| {name} | {ips:.2f} | {tps:.1f} |")
    for name, error in FAILED_PEERS.items():
        lines.append(f"| {name} | failed: {error[:160]} | |")
    together, alone = rates["8 together"], rates["8 one by one"]
    lines += ["", f"Orchard, 8 together vs one by one: **{together[0] / alone[0]:.2f}x** images/s.", "",
              f"## Encoder cache: a {args.turns}-turn conversation about one image (prefix cache off)", "",
              "| setting | seconds per conversation | TTFT, turns 2.. (median) | encoder passes |", "|---|---:|---:|---:|"]
    for name, (seconds, ttft, passes) in cache.items():
        lines.append(f"| {name} | {seconds:.2f} | {ttft * 1000:.0f} ms | {passes} |")
    on, off = cache["encoder cache on"], cache["encoder cache off"]
    lines += ["", f"Encoder cache on vs off: **{off[0] / on[0]:.2f}x** faster per conversation, "
              f"**{off[1] / on[1]:.2f}x** lower TTFT on later turns."]
    report = "\n".join(lines) + "\n"
    print(report)
    write_report("vlm", report, {"rates": rates, "peers": peers, "encoder_cache": cache})


if __name__ == "__main__":
    main()

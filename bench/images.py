"""Image generation through Serve (issue #14):

    python -m bench.images [--rounds 2] [--size 128]

Orchard serving only the tests' tiny random-weight FLUX.2-klein (tests/images_model.py),
through ``serve run``, 4 denoising steps. Reported side by side in one run: images per
minute for 1 request, for 4 requests at once (one batch through the denoiser), and for the
same 4 one after another; and mflux's own ``generate_image`` in this process, one by one.

Writes bench/results/images-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from bench.compare_llm import model_dir
from bench.family_server import ROOT, family_server, log, median, meta, wait_ready, write_report
from bench.servers import free_port
from mlx_orchard.runtime import mlx_uses_cpu_backend

STEPS = 4


def build_model() -> Path:
    from tests.images_model import build_tiny_image_model

    tokenizer = model_dir(ROOT / "serve_config.yaml", dequantize=mlx_uses_cpu_backend())[1]
    return build_tiny_image_model(Path.home() / ".cache" / "orchard" / "bench" / "tiny-flux2-klein", tokenizer)


async def make(client: httpx.AsyncClient, url: str, prompt: str, seed: int, size: int) -> float:
    t0 = time.perf_counter()
    r = await client.post(f"{url}/v1/images/generations", timeout=600, json={
        "model": "tiny-klein", "prompt": prompt, "size": f"{size}x{size}", "seed": seed, "steps": STEPS})
    r.raise_for_status()
    return time.perf_counter() - t0


async def served(url: str, rounds: int, size: int) -> dict[str, float]:
    """{setting: images per minute} through Orchard."""
    out: dict[str, list[float]] = {"1 request": [], "4 at once": [], "4 one by one": []}
    async with httpx.AsyncClient() as client:
        await make(client, url, "warm-up", 0, size)
        for r in range(rounds):
            out["1 request"].append(60 / await make(client, url, f"a lighthouse {r}", r, size))
            t0 = time.perf_counter()
            await asyncio.gather(*(make(client, url, f"a garden {r}-{i}", i, size) for i in range(4)))
            out["4 at once"].append(4 * 60 / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for i in range(4):
                await make(client, url, f"a garden {r}-{i}", i, size)
            out["4 one by one"].append(4 * 60 / (time.perf_counter() - t0))
    return {k: median(v) for k, v in out.items()}


def raw_mflux(path: Path, rounds: int, size: int) -> float:
    """Images per minute of mflux's own generate_image, one by one, in this process."""
    from mflux.models.flux2.variants.txt2img.flux2_klein import Flux2Klein

    from tests.images_model import tiny_model_config

    model = Flux2Klein(model_config=tiny_model_config(path), model_path=str(path))
    model.generate_image(seed=0, prompt="warm-up", num_inference_steps=STEPS, width=size, height=size)
    rates = []
    for r in range(rounds):
        t0 = time.perf_counter()
        for i in range(4):
            model.generate_image(seed=i, prompt=f"a garden {r}-{i}", num_inference_steps=STEPS, width=size, height=size)
        rates.append(4 * 60 / (time.perf_counter() - t0))
    return median(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    path = build_model()
    workdir = Path(tempfile.mkdtemp(prefix="orchard-bench-images-"))
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["applications"][0]["args"]["images"] = [{"name": "tiny-klein", "source": str(path), "preset": "flux2-klein"}]
    config_path = workdir / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    rows: dict[str, float] = {}
    for name, batch in (("batched", {"max_batch_size": 4, "batch_wait_timeout_s": 0.05}),
                        ("unbatched", {"max_batch_size": 1, "batch_wait_timeout_s": 0.0})):
        port = free_port()
        with family_server(config_path, "images", port, workdir, batching=batch, tag=f"-{name}") as server:
            ready = wait_ready(server, lambda port=port: httpx.post(
                f"http://127.0.0.1:{port}/v1/images/generations", timeout=120,
                json={"model": "tiny-klein", "prompt": "probe", "size": "32x32", "steps": 1}).status_code == 200, 600)
            log(f"{name}: ready in {ready:.0f}s")
            rows.update({f"Orchard ({name}), {k}": v for k, v in asyncio.run(served(
                f"http://127.0.0.1:{port}", args.rounds, args.size)).items()})
    rows["mflux generate_image, 4 one by one (in process)"] = raw_mflux(path, args.rounds, args.size)
    info = meta()
    lines = [f"# Image generation — {info['date']}", "",
             f"commit {info['commit']}; `python -m bench.images --rounds {args.rounds} --size {args.size}`; "
             f"{info['machine']}; tiny random-weight FLUX.2-klein, {args.size}x{args.size}, {STEPS} steps.", "",
             "| setting | images per minute |", "|---|---:|"]
    lines += [f"| {name} | {rate:.1f} |" for name, rate in rows.items()]
    report = "\n".join(lines) + "\n"
    print(report)
    write_report("images", report, {"rows": rows, "meta": info})


if __name__ == "__main__":
    main()

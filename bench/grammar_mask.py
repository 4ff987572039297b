"""Which grammar library should constrain decoding (issue #10)? Mask cost per token, measured
side by side on the default model's tokenizer, for a batch of 16 sequences:

    pip install xgrammar outlines-core apache-tvm-ffi     # llguidance comes with mlx-vlm
    python -m bench.grammar_mask [--repeats 3]

Each library compiles the same JSON schemas (nested objects, enums, arrays, bounded
numbers, the shape ``chat.completions.parse`` sends), then follows 16 different valid
documents token by token, as 16 sequences of one continuous batch would: at every step
it fills each live sequence's next-token bitmask (the cost the engine thread pays per
token), checks that the document's next token is allowed, and advances. Reported per
library: compile time, mask time per token (p50 / p99), the batch-of-16 step (serial on
the engine thread; llguidance's and xgrammar's own batch calls too), and that cost as a
share of a measured decode step of the default model at 16 streams. The cost of applying
a bitmask to a [16, vocab] logits array in MLX is measured once (it is the same for all).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from bench.family_server import write_report

BATCH = 16


class Address(BaseModel):
    street: str
    city: str
    country: Literal["FR", "DE", "IT", "ES", "GB", "US"]


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)
    score: float = Field(ge=0, le=1)
    tags: list[str] = Field(max_length=5)
    address: Address
    role: Literal["admin", "user", "guest"]


class Invoice(BaseModel):
    number: int
    paid: bool
    items: list[dict[str, int]]
    notes: str | None


SCHEMAS = {"person (nested, enums, bounded)": Person, "invoice (arrays, optional)": Invoice}
CITIES = ["Paris", "Berlin", "Rome", "Madrid", "London", "Boston", "Lyon", "Munich"]


def documents(schema: type[BaseModel]) -> list[str]:
    out = []
    for i in range(BATCH):
        if schema is Person:
            doc = Person(
                name=f"Person number {i} with a longer name",
                age=20 + i,
                score=round(0.05 * i, 2),
                tags=[f"tag{j}" for j in range(i % 5)],
                address=Address(street=f"{i + 1} Main Street", city=CITIES[i % 8], country=["FR", "DE", "IT", "ES", "GB", "US"][i % 6]),
                role=["admin", "user", "guest"][i % 3],
            )
        else:
            doc = Invoice(number=1000 + i, paid=i % 2 == 0, items=[{"widget": j, "gadget": i} for j in range(i % 4)],
                          notes=None if i % 3 else f"note {i}")
        out.append(doc.model_dump_json())
    return out


def tokenizer_dir():
    import yaml

    from bench.compare_llm import ROOT
    from mlx_orchard.models.registry import resolve_llm
    from mlx_orchard.runtime import mlx_uses_cpu_backend

    entry = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]["llm"][0]
    return resolve_llm(entry["source"], dequantize=mlx_uses_cpu_backend(), sha256=entry.get("sha256"))


# ---- one adapter per library: compile(schema) -> list of matchers; fill(matcher, row); advance ----


class Library:
    name = ""

    def compile(self, schema_json: str) -> Callable[[], object]:
        raise NotImplementedError

    def fill(self, matcher, bitmask: np.ndarray, row: int) -> None:
        raise NotImplementedError

    def advance(self, matcher, token: int) -> None:
        raise NotImplementedError

    def fill_batch(self, matchers, bitmask: np.ndarray) -> None | bool:
        return None  # no batch call


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, hf_tokenizer, vocab: int):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema_json):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema_json)
        self.ll.LLMatcher(self.tok, grammar)  # compiled once here (timed)
        return lambda: self.ll.LLMatcher(self.tok, grammar)

    def fill(self, matcher, bitmask, row):
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(matcher, bitmask, row)

    def advance(self, matcher, token):
        assert matcher.consume_token(token), matcher.get_error()

    def fill_batch(self, matchers, bitmask):
        from llguidance.numpy import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        return True


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, hf_tokenizer, vocab: int):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.batcher = xgr.BatchGrammarMatcher()

    def compile(self, schema_json):
        compiled = self.compiler.compile_json_schema(schema_json, any_whitespace=False, separators=(",", ":"))
        return lambda: self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask, row):
        import torch

        matcher.fill_next_token_bitmask(torch.from_numpy(bitmask), row)

    def advance(self, matcher, token):
        assert matcher.accept_token(token)

    def fill_batch(self, matchers, bitmask):
        import torch

        self.batcher.batch_fill_next_token_bitmask(matchers, torch.from_numpy(bitmask))
        return True


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, hf_tokenizer, vocab: int):
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema

        self.oc, self.build_regex = oc, build_regex_from_schema
        # Byte-level BPE tokens ("Ġhello") as the bytes they stand for.
        byte_decoder = {v: k for k, v in _bytes_to_unicode().items()}
        tokens: dict[bytes, list[int]] = {}
        eos = hf_tokenizer.eos_token_id
        for token, tid in hf_tokenizer.get_vocab().items():
            if tid == eos or tid >= vocab:
                continue
            try:
                raw = bytes(byte_decoder[c] for c in token)
            except KeyError:  # special tokens
                continue
            tokens.setdefault(raw, []).append(tid)
        self.vocabulary = oc.Vocabulary(eos, tokens)

    def compile(self, schema_json):
        index = self.oc.Index(self.build_regex(schema_json), self.vocabulary)
        return lambda: self.oc.Guide(index)

    def fill(self, matcher, bitmask, row):
        v = bitmask[row]
        matcher.write_mask_into(v.ctypes.data, v.size, 4)

    def advance(self, matcher, token):
        matcher.advance(token, return_tokens=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table (what byte-level BPE tokens are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def allowed(bitmask: np.ndarray, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def run(lib: Library, schema_json: str, docs: list[list[int]], repeats: int) -> dict:
    t0 = time.perf_counter()
    make = lib.compile(schema_json)
    compile_s = time.perf_counter() - t0
    words = (VOCAB + 31) // 32
    per_token: list[float] = []
    serial_steps: list[float] = []
    batch_steps: list[float] = []
    for _ in range(repeats):
        matchers = [make() for _ in docs]
        bitmask = np.zeros((BATCH, words), dtype=np.int32)
        for step in range(max(len(d) for d in docs)):
            live = [i for i, d in enumerate(docs) if step < len(d)]
            t_step = time.perf_counter()
            for i in live:
                t = time.perf_counter()
                lib.fill(matchers[i], bitmask, i)
                per_token.append(time.perf_counter() - t)
            serial_steps.append(time.perf_counter() - t_step)
            if len(live) == BATCH:
                t = time.perf_counter()
                if lib.fill_batch(matchers, bitmask):
                    batch_steps.append(time.perf_counter() - t)
            for i in live:
                assert allowed(bitmask, i, docs[i][step]), f"{lib.name}: token {docs[i][step]} refused at {step}"
                lib.advance(matchers[i], docs[i][step])
    pt = sorted(per_token)
    return {
        "compile_s": compile_s,
        "mask_us_p50": 1e6 * statistics.median(pt),
        "mask_us_p99": 1e6 * pt[int(0.99 * (len(pt) - 1))],
        "step16_serial_ms_p50": 1e3 * statistics.median(serial_steps),
        "step16_batch_call_ms_p50": 1e3 * statistics.median(batch_steps) if batch_steps else None,
    }


def mlx_apply_ms() -> dict[str, float]:
    """Applying a [16, vocab/32] int32 bitmask to [16, vocab] logits in MLX (CPU here): the
    bits unpacked inside MLX (a gather per token id), or by numpy and handed over as bools."""
    import mlx.core as mx

    logits = mx.random.normal((BATCH, VOCAB))
    packed = np.random.randint(-(2**31), 2**31 - 1, size=(BATCH, (VOCAB + 31) // 32), dtype=np.int32)
    idx = mx.arange(VOCAB)
    words, shifts = idx // 32, (idx % 32).astype(mx.uint32)

    def in_mlx():
        bits = mx.array(packed).view(mx.uint32)
        keep = ((bits[:, words] >> shifts) & 1).astype(mx.bool_)
        return mx.where(keep, logits, -mx.inf)

    def via_numpy():
        keep = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")[:, :VOCAB].astype(bool)
        return mx.where(mx.array(keep), logits, -mx.inf)

    out = {}
    for name, fn in (("unpacked in MLX", in_mlx), ("unpacked by numpy", via_numpy)):
        times = []
        for _ in range(50):
            t = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - t)
        out[name] = 1e3 * statistics.median(times[5:])
    return out


VOCAB = 0


def main() -> None:
    global VOCAB
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-step-ms", type=float, default=120.0,
                    help="a decode step of the default model at 16 streams (bench/README: ITL p50 at 16 streams)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    path = tokenizer_dir()
    hf = AutoTokenizer.from_pretrained(str(path))
    VOCAB = json.loads((path / "config.json").read_text())["vocab_size"]
    libs: list[Library] = []
    for cls in (LLGuidance, XGrammar, OutlinesCore):
        try:
            libs.append(cls(hf, VOCAB))
        except ImportError as e:
            print(f"skipping {cls.name}: {e}")
    results: dict = {}
    for title, schema in SCHEMAS.items():
        schema_json = json.dumps(schema.model_json_schema())
        docs = [hf.encode(d, add_special_tokens=False) for d in documents(schema)]
        for lib in libs:
            print(f"{title}: {lib.name} ...", flush=True)
            results[f"{title} | {lib.name}"] = run(lib, schema_json, docs, args.repeats)
    apply_ms = mlx_apply_ms()
    lines = [
        f"# Grammar mask cost per token — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"Default model's tokenizer (vocab {VOCAB}); {BATCH} sequences following 16 valid documents; "
        f"{args.repeats} repeats; load average {os.getloadavg()[0]:.2f}. Share = the batch-of-16 serial mask "
        f"time over a {args.decode_step_ms:.0f} ms decode step at 16 streams.",
        "",
        "| schema | library | compile (s) | mask p50 (µs) | mask p99 (µs) | 16 masks, serial (ms) | 16 masks, batch call (ms) | share of a step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in results.items():
        title, name = key.split(" | ")
        batch = f"{r['step16_batch_call_ms_p50']:.2f}" if r["step16_batch_call_ms_p50"] is not None else "—"
        share = r["step16_serial_ms_p50"] / args.decode_step_ms
        lines.append(
            f"| {title} | {name} | {r['compile_s']:.3f} | {r['mask_us_p50']:.0f} | {r['mask_us_p99']:.0f} | "
            f"{r['step16_serial_ms_p50']:.2f} | {batch} | {100 * share:.1f}% |"
        )
    lines += ["", f"Applying a [16, {VOCAB}] bitmask to the logits in MLX, per step: "
              + "; ".join(f"{k} {v:.2f} ms" for k, v in apply_ms.items()) + "."]
    text = "\n".join(lines) + "\n"
    write_report("grammar-mask", text, {"results": results, "mlx_apply_ms": apply_ms, "vocab": VOCAB})
    print(text)


if __name__ == "__main__":
    main()

"""Fixed, varied prompts that make a small chat model talk at length.

Shared by the load generator and the in-process baselines so both see the same work.
"""

from __future__ import annotations

import itertools
import random

PROMPTS: tuple[str, ...] = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step, for a curious teenager.",
    "Describe a busy city market at dawn: the sounds, the smells, the people and the stalls.",
    "Write a detailed guide to planting and caring for a vegetable garden through a whole year.",
    "Tell me everything you know about the history of the bicycle, from its invention to today.",
    "Write a long letter from a sailor at sea to his family, describing a storm and a calm day.",
    "Explain how the water cycle works and why it matters for farming, with many examples.",
    "Describe, in great detail, how to bake a loaf of bread from flour, water, salt and yeast.",
    "Write an essay about why people enjoy music, covering rhythm, memory, culture and emotion.",
    "Describe a journey by train across a large country, the landscapes and the passengers met.",
    "Explain how computers store numbers and text in memory, with simple examples for beginners.",
    "Write a long fairy tale about a fox, a crow and a clever little girl who outwits them both.",
    "Describe the life cycle of a butterfly in detail, from the egg to the adult insect.",
    "Write a detailed travel guide for a weekend in an old European town with a castle and a river.",
    "Explain the rules and the strategy of chess to someone who has never played a board game.",
    "Write a long diary entry of an astronaut on her first week aboard a space station.",
)

# The short prompt for the 1-token latency test: prefill cost stays small next to overhead.
LATENCY_PROMPT = "Say hello."


# Servers with a prompt cache (mlx_lm.server has one) would skip the prefill of a prompt
# they saw before; a fresh number at the start of every request keeps prefill honest while
# the chat template's shared system prompt can still be reused. Random start: a server
# that stays up across runs sees new numbers too.
_serial = itertools.count(random.randrange(10_000, 90_000))


def tagged(prompt: str, n: int | None = None) -> str:
    return f"Request {next(_serial) if n is None else n:05d}. {prompt}"


def chat_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]

"""What a model's text means: tool calls and reasoning, split out of the generated text.

Plain Python (no MLX, no Ray). A model's config names its tool-call format and reasoning
markers (or they are detected from its chat template); the LLM replica runs one
``OutputParser`` per choice over the text deltas the engine produces.
"""

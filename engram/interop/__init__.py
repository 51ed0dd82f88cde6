"""Other implementations' checkpoints and conventions.

- :mod:`engram.interop.deepseek`: DeepSeek-V4.1's Engram layers (docs/deepseek_v41.md): the
  hashing with its tokenizer check and image-token rule, and its safetensors weights, tables
  read through memory maps.
"""

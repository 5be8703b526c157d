"""A small decoder LM with DeepSeek Engram conditional memory, trainable on CPU and servable from tierstore.

Modules: tokenizer (BPE training), compression (compressed-id map), hasher (n-gram row ids),
memory (where table rows come from), engram (the Engram layer), model (the decoder LM),
train, generate; deepseek_v41 (DeepSeek-V4.1-Flash's Engram from its config.json, served
from a store built from its checkpoint).
"""

from engram_model.compression import CompressionMap, build_compression
from engram_model.errors import EngramConfigError
from engram_model.hasher import NgramHasher
from engram_model.tokenizer import load_tokenizer, save_tokenizer, stdlib_text_files, train_tokenizer

__all__ = [
    "CompressionMap",
    "EngramConfigError",
    "NgramHasher",
    "build_compression",
    "load_tokenizer",
    "save_tokenizer",
    "stdlib_text_files",
    "train_tokenizer",
]

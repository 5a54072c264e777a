"""Loopback servers for the teacher tests: vLLM completions, chat completions and Cortex SSE, backed by a
real tiny model, with fault injection."""

from .loopback import LoopbackServer, LoopbackServerProcess
from .tiny_lm import TinyLM, build_tokenizer

__all__ = ["LoopbackServer", "LoopbackServerProcess", "TinyLM", "build_tokenizer"]

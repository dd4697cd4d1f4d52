"""The native PyTorch engine: continuous batching on a background thread over a slot KV cache."""

from twinkle_async.engines.torch.args import TorchEngineArgs
from twinkle_async.engines.torch.engine import TorchEngine

__all__ = ['TorchEngine', 'TorchEngineArgs']

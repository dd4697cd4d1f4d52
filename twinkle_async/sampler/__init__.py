"""Samplers: the asyncio core and the blocking facades with Twinkle's interface."""

from twinkle_async.sampler.async_sampler import AsyncSampler
from twinkle_async.sampler.base import Sampler
from twinkle_async.sampler.sync import TorchSampler, vLLMSampler

__all__ = ['AsyncSampler', 'Sampler', 'TorchSampler', 'vLLMSampler']

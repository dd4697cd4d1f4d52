"""Weights streamed from a trainer process into the sampler's engines over ``torch.distributed``."""

from twinkle_async.transfer.channel import WeightChannel
from twinkle_async.transfer.receiver import StreamedWeights
from twinkle_async.transfer.sender import WeightSender

__all__ = ['WeightChannel', 'StreamedWeights', 'WeightSender']

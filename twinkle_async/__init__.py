"""twinkle_async: an asyncio-first streaming sampler for LLM post-training.

``AsyncSampler`` is the core (``await sample(...)``, ``async for ... in stream(...)``);
``TorchSampler`` / ``vLLMSampler`` are blocking facades with ModelScope Twinkle's interface.
"""

from twinkle_async import errors
from twinkle_async.data_format import (
    InputFeature,
    Message,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    TokenDelta,
    Trajectory,
)
from twinkle_async.infra import get_device_placement, get_logger, initialize
from twinkle_async.mesh import DeviceGroup, DeviceMesh
from twinkle_async.models import DEFAULT_MODEL, resolve_model
from twinkle_async.ray.remote import remote_class, remote_function
from twinkle_async.sampler import AsyncSampler, Sampler, TorchSampler, vLLMSampler
from twinkle_async.template import Template
from twinkle_async.transfer import WeightSender

__version__ = '0.1.0'

__all__ = ['errors', 'InputFeature', 'Message', 'SampledSequence', 'SampleResponse', 'SamplingParams', 'TokenDelta',
           'Trajectory', 'DeviceGroup', 'DeviceMesh', 'initialize', 'get_logger', 'get_device_placement',
           'DEFAULT_MODEL', 'resolve_model', 'remote_class', 'remote_function', 'AsyncSampler', 'Sampler',
           'TorchSampler', 'vLLMSampler', 'Template', 'WeightSender', '__version__']

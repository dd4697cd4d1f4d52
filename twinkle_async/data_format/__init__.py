"""Data shapes shared by every layer (Twinkle-compatible names and fields)."""

from twinkle_async.data_format.inputs import InputFeature, Message, Tool, ToolCall, Trajectory
from twinkle_async.data_format.outputs import LogprobRow, SampledSequence, SampleResponse, StopReason, TokenDelta
from twinkle_async.data_format.sampling_params import SamplingParams

__all__ = ['InputFeature', 'Message', 'Tool', 'ToolCall', 'Trajectory', 'LogprobRow', 'SampledSequence',
           'SampleResponse', 'StopReason', 'TokenDelta', 'SamplingParams']

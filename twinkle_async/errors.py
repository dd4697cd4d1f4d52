"""The exception tree of twinkle_async.

Every error raised by this package derives from :class:`TwinkleAsyncError`::

    TwinkleAsyncError
    ├── InvalidRequestError (ValueError)     one request is bad; it fails alone
    │   ├── InvalidSamplingParamsError       a SamplingParams field (named in the message)
    │   ├── InvalidInputError                input_ids / trajectory / messages
    │   │   ├── PromptTooLongError           prompt does not fit max_model_len
    │   │   └── InvalidImageError            an image that cannot be read (named), or one sent to a
    │   │                                    text-only model
    │   ├── TemplateNotFoundError            unknown template name
    │   ├── AdapterNotFoundError             unknown adapter name
    │   ├── InvalidAdapterError              an adapter that cannot be loaded (format, config, tensors)
    │   └── WeightUpdateError                bad update_weights payload, or it failed midway;
    │                                        rolled back: the previous weights are still served
    ├── ConfigurationError (ValueError)      the sampler cannot be built as asked
    │   ├── EngineArgsError                  unknown or invalid engine_args key
    │   └── ModelNotFoundError               model id or path cannot be resolved
    ├── NotSupportedError                    valid, but not available here (yet)
    ├── OverloadedError                      too many queued requests
    └── EngineError                          the engine failed
        ├── EngineDeadError                  unrecoverable: every waiter gets it,
        │                                    new requests are refused
        └── ReplicaDiedError                 a remote replica died with this request in flight
                                             (the replica is restarted; retry=True resends)
"""

from __future__ import annotations

__all__ = [
    'TwinkleAsyncError', 'InvalidRequestError', 'InvalidSamplingParamsError', 'InvalidInputError',
    'PromptTooLongError', 'InvalidImageError', 'TemplateNotFoundError', 'AdapterNotFoundError', 'InvalidAdapterError',
    'WeightUpdateError', 'ConfigurationError',
    'EngineArgsError', 'ModelNotFoundError', 'NotSupportedError', 'OverloadedError', 'EngineError',
    'EngineDeadError', 'ReplicaDiedError',
]


class TwinkleAsyncError(Exception):
    """Base of every error raised by twinkle_async."""


class InvalidRequestError(TwinkleAsyncError, ValueError):
    """One request is malformed; it fails alone and the engine keeps serving."""


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is missing, unknown or out of range (the message names it)."""


class InvalidInputError(InvalidRequestError):
    """The input (token ids, trajectory, messages) cannot be sampled from."""


class PromptTooLongError(InvalidInputError):
    """The prompt leaves no room for a generated token within ``max_model_len``."""


class InvalidImageError(InvalidInputError):
    """An image input cannot be used: unreadable or corrupt bytes, an unsupported type, a URL that cannot be
    fetched, more images than the engine's ``limit_mm_per_prompt``, or an image for a text-only model."""


class TemplateNotFoundError(InvalidRequestError):
    """A template name that is not registered."""


class AdapterNotFoundError(InvalidRequestError):
    """An adapter name that was never added (or was removed)."""


class InvalidAdapterError(InvalidRequestError):
    """An adapter that cannot be loaded: not safetensors, a bad config, tensors that do not fit the model."""


class WeightUpdateError(InvalidRequestError):
    """An ``update_weights`` payload is bad (name, shape, dtype named) or its source failed midway.

    Nothing of the update was applied: the sampler keeps serving the previous weights and version.
    """


class ConfigurationError(TwinkleAsyncError, ValueError):
    """The sampler or engine cannot be built with the given configuration."""


class EngineArgsError(ConfigurationError):
    """An ``engine_args`` key is unknown or has an invalid value."""


class ModelNotFoundError(ConfigurationError):
    """A model id or path cannot be resolved to a local model directory."""


class NotSupportedError(TwinkleAsyncError):
    """The operation is valid but not supported by this engine, platform or version."""


class OverloadedError(TwinkleAsyncError):
    """The engine's queue is full; retry later."""


class EngineError(TwinkleAsyncError):
    """The engine failed while serving a request."""


class EngineDeadError(EngineError):
    """The engine died; every waiter fails with this and new requests are refused."""


class ReplicaDiedError(EngineError):
    """A Ray replica died while serving this request; the other replicas keep serving and it is restarted.

    ``resendable``: the sampler was built with ``retry=True`` and the request can be sampled again from the start
    (``sample`` does so; a stream cannot, its first tokens were already yielded)."""

    resendable: bool = False

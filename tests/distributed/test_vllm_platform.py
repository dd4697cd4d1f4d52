"""vLLM settings by platform: the arguments built for a GPU and for vLLM-CPU, and sleep mode's call order (a GPU
feature: vLLM's ``sleep`` / ``wake_up`` recorded on a stand-in, the platform faked)."""

from __future__ import annotations

import asyncio

import pytest

from twinkle_async.engines.vllm.args import build_engine_args
from twinkle_async.engines.vllm.sleep import SleepMode
from twinkle_async.errors import ConfigurationError, NotSupportedError


def test_a_gpu_keeps_vllms_own_defaults_and_the_cpu_gets_its_workarounds(tiny_model_dir):
    gpu = build_engine_args(str(tiny_model_dir), {}, on_cpu=False)
    assert gpu.dtype == 'auto' and gpu.enable_chunked_prefill is not False and gpu.max_num_batched_tokens is None
    assert not gpu.enforce_eager and gpu.kv_cache_memory_bytes is None
    cpu = build_engine_args(str(tiny_model_dir), {'max_model_len': 512}, on_cpu=True)
    assert cpu.dtype == 'float32' and cpu.enable_chunked_prefill is False and cpu.max_num_batched_tokens == 8192
    assert cpu.enforce_eager and cpu.kv_cache_memory_bytes == 512 * 2**20
    chosen = build_engine_args(str(tiny_model_dir), {'dtype': 'bfloat16', 'enable_chunked_prefill': True},
                               on_cpu=True)
    assert chosen.dtype == 'bfloat16' and chosen.enable_chunked_prefill  # the user's choice wins


@pytest.mark.parametrize('on_cpu', [True, False])
def test_tensor_parallel_ranks_are_processes_of_the_replica_on_every_platform(tiny_model_dir, on_cpu):
    sharded = build_engine_args(str(tiny_model_dir), {'tensor_parallel_size': 2}, on_cpu=on_cpu)
    assert sharded.distributed_executor_backend == 'mp'  # not vLLM's Ray executor, even inside a Ray actor
    assert build_engine_args(str(tiny_model_dir), {}, on_cpu=on_cpu).distributed_executor_backend is None


class RecordingLLM:
    """vLLM's ``AsyncLLM`` sleep API, recording the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def sleep(self, level: int) -> None:
        self.calls.append(('sleep', level))

    async def wake_up(self, tags: list[str]) -> None:
        self.calls.append(('wake_up', tuple(tags)))


def test_sleep_2_update_wake_wakes_the_weights_before_loading_and_the_kv_cache_last():
    async def run() -> list[tuple]:
        llm = RecordingLLM()
        mode = SleepMode(llm, enabled=True)
        await mode.sleep(2)
        with pytest.raises(ConfigurationError, match='send them with update_weights'):
            await mode.wake_up()
        await mode.wake_weights()   # what update_weights does first
        llm.calls.append(('load weights',))
        mode.weights_loaded()
        await mode.wake_up()
        await mode.wake_up()        # awake: nothing more to wake
        return llm.calls

    assert asyncio.run(run()) == [('sleep', 2), ('wake_up', ('weights',)), ('load weights',),
                                  ('wake_up', ('kv_cache',))]


def test_sleep_1_then_wake_up_restores_weights_then_kv_cache():
    async def run() -> list[tuple]:
        llm = RecordingLLM()
        mode = SleepMode(llm, enabled=True)
        await mode.sleep(1)
        await mode.wake_up()
        return llm.calls

    assert asyncio.run(run()) == [('sleep', 1), ('wake_up', ('weights',)), ('wake_up', ('kv_cache',))]


def test_without_sleep_mode_sleep_is_refused_naming_the_setting():
    mode = SleepMode(RecordingLLM(), enabled=False)
    with pytest.raises(NotSupportedError, match="enable_sleep_mode': True"):
        asyncio.run(mode.sleep(1))
    with pytest.raises(NotSupportedError, match='sleep level must be 1 or 2'):
        asyncio.run(SleepMode(RecordingLLM(), enabled=True).sleep(3))


class RecordingRunner:
    """A vLLM worker's model runner: records what ``load_weights`` (in place) and ``reload_weights`` (whole) got."""

    def __init__(self, fail_in_place: bool = False) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail_in_place = fail_in_place

    def get_model(self):
        return self

    def load_weights(self, weights):
        self.calls.append(('in place', dict(weights)))
        if self.fail_in_place:
            raise RuntimeError('injected: a weight loader failed')

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        self.calls.append(('whole checkpoint', dict(weights_iterator)))


def worker_with_staged(tiny_model_dir, tmp_path, runner: RecordingRunner):
    """A worker object with the extension mixed in (as vLLM does) and one bucket of two new tensors staged."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import save_file

    from twinkle_async.engines.vllm.worker_extension import TwinkleWorkerExtension

    worker = TwinkleWorkerExtension()
    worker.model_runner = runner
    worker.vllm_config = SimpleNamespace(model_config=SimpleNamespace(
        model=str(tiny_model_dir), hf_text_config=SimpleNamespace(tie_word_embeddings=False)))
    new = {'model.layers.0.mlp.up_proj.weight': torch.ones(2, 2), 'model.norm.weight': torch.ones(2)}
    save_file(new, str(tmp_path / 'bucket.safetensors'))
    worker.twinkle_stage(str(tmp_path / 'bucket.safetensors'))
    return worker, set(new)


@pytest.mark.parametrize('gpu', [True, False])
def test_an_update_loads_only_the_changed_tensors_in_place_except_on_vllm_cpu(tiny_model_dir, tmp_path, monkeypatch,
                                                                               gpu):
    from twinkle_async.engines.vllm import worker_extension
    from twinkle_async.weights import checkpoint_specs

    monkeypatch.setattr(worker_extension, 'partial_loads', lambda: gpu)
    runner = RecordingRunner()
    worker, changed = worker_with_staged(tiny_model_dir, tmp_path, runner)
    worker.twinkle_commit()
    [(how, tensors)] = runner.calls
    if gpu:
        assert how == 'in place' and set(tensors) == changed
    else:
        assert how == 'whole checkpoint' and set(tensors) == set(checkpoint_specs(tiny_model_dir))
        assert all(tensors[name].shape == (2,) or tensors[name].shape == (2, 2) for name in changed)


def test_a_failed_in_place_load_reloads_the_previous_weights_whole_and_raises(tiny_model_dir, tmp_path, monkeypatch):
    from twinkle_async.engines.vllm import worker_extension

    monkeypatch.setattr(worker_extension, 'partial_loads', lambda: True)
    runner = RecordingRunner(fail_in_place=True)
    worker, _ = worker_with_staged(tiny_model_dir, tmp_path, runner)
    with pytest.raises(RuntimeError, match='injected'):
        worker.twinkle_commit()
    assert [how for how, _ in runner.calls] == ['in place', 'whole checkpoint']
    assert worker.__dict__.get('_twinkle_overlay', {}) == {}, 'the failed update is not part of the model'

"""Twinkle's mesh, group and initialize forms, engine_args it passes, get_logger / get_device_placement (no model)."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

import twinkle_async
from twinkle_async import DeviceGroup, DeviceMesh, get_device_placement, get_logger, initialize
from twinkle_async.engines.torch.args import parse_engine_args
from twinkle_async.errors import ConfigurationError, EngineArgsError, NotSupportedError
from twinkle_async.mesh import with_tensor_parallel
from twinkle_async.ray.cluster import actor_resources, bundle_for
from twinkle_async.ray.replica_engine import replica_tp_size


@pytest.mark.parametrize('kwargs,dp,tp', [
    ({'world_size': 4, 'dp_size': 4}, 4, 1), ({'world_size': 2, 'tp_size': 2}, 1, 2), ({'world_size': 4,
                                                                                        'tp_size': 2}, 2, 2),
    ({'dp_size': 2}, 2, 1), ({}, 1, 1), ({'world_size': 2, 'dp_size': 2, 'pp_size': 1, 'fsdp_size': None}, 2, 1)])
def test_from_sizes_takes_twinkles_keywords(kwargs, dp, tp):
    mesh = DeviceMesh.from_sizes(**kwargs)
    assert (mesh.dp_size, mesh.tp_size, mesh.world_size) == (dp, tp, dp * tp)


@pytest.mark.parametrize('kwargs,named', [
    ({'pp_size': 2}, 'pp_size=2'), ({'fsdp_size': 4}, 'fsdp_size=4'), ({'cp_size': 2}, 'cp_size=2'),
    ({'world_size': 3, 'dp_size': 2}, 'world_size=3'), ({'world_size': 3, 'tp_size': 2}, 'world_size=3'),
    ({'sequence_parallel': True}, 'sequence_parallel'), ({'bogus_size': 1}, 'bogus_size')])
def test_from_sizes_refuses_what_a_sampler_cannot_use_naming_it(kwargs, named):
    with pytest.raises(ConfigurationError, match=named):
        DeviceMesh.from_sizes(**kwargs)


def test_device_groups_in_twinkles_forms():
    gpu = DeviceGroup(name='sampler', ranks=list(range(4, 8)), device_type='GPU', gpus_per_worker=2)
    assert (gpu.device_type, gpu.num_ranks, gpu.workers) == ('cuda', 4, 2)
    assert bundle_for(gpu) == {'GPU': 2.0} and actor_resources(gpu) == {'num_gpus': 2.0, 'num_cpus': 0}
    cpu = DeviceGroup('env', 2, 'CPU')
    assert (cpu.device_type, cpu.workers, bundle_for(cpu), actor_resources(cpu)) == \
        ('cpu', 2, {'CPU': 1.0}, {'num_cpus': 1.0})
    assert DeviceGroup(name='m', ranks=1, device_type='cuda').device_type == 'cuda'
    for bad, named in [({'device_type': 'npu'}, 'npu'), ({'ranks': 3, 'gpus_per_worker': 2}, 'gpus_per_worker=2'),
                       ({'ranks': [0, 0]}, 'distinct'), ({'ranks': 0}, 'ranks=0')]:
        with pytest.raises(ConfigurationError, match=named):
            DeviceGroup(**{'name': 'g', 'ranks': 2, 'device_type': 'cpu', **bad})


def test_replica_tensor_parallelism_follows_the_groups_workers():
    assert replica_tp_size(DeviceMesh.from_sizes(world_size=2, tp_size=2), 1, 2, 'vllm', 'g') == 2
    assert replica_tp_size(DeviceMesh.from_sizes(dp_size=2), 2, 2, 'vllm', 'g') == 2, 'Twinkle: all visible GPUs'
    assert replica_tp_size(DeviceMesh.from_sizes(dp_size=2), 2, 1, 'torch', 'g') == 1
    with pytest.raises(ConfigurationError, match='gpus_per_worker=2'):
        replica_tp_size(DeviceMesh.from_sizes(tp_size=2), 2, 1, 'vllm', 'g')
    with pytest.raises(ConfigurationError, match='dp_size=4 replicas need 4 workers'):
        replica_tp_size(DeviceMesh.from_sizes(dp_size=4), 2, 1, 'vllm', 'g')
    with pytest.raises(NotSupportedError, match='torch engine'):
        with_tensor_parallel({}, 'torch', replica_tp_size(DeviceMesh.from_sizes(tp_size=2), 1, 2, 'torch', 'g'))


def test_tp_size_becomes_vllms_tensor_parallel_size_unless_given():
    assert with_tensor_parallel({}, 'vllm', 2) == {'tensor_parallel_size': 2}
    assert with_tensor_parallel({'tensor_parallel_size': 1}, 'vllm', 2) == {'tensor_parallel_size': 1}
    assert with_tensor_parallel({}, 'vllm', 1) == {} and with_tensor_parallel({}, 'torch', 1) == {}


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_initialize_takes_twinkles_keywords_and_seeds_python_numpy_and_torch():
    groups = [DeviceGroup(name='sampler', ranks=2, device_type='CPU')]
    initialize(mode='local', nproc_per_node=2, ncpu_proc_per_node=2, seed=1234, full_determinism=False,
               groups=groups, lazy_collect=False, name='port')
    first = draws()
    initialize('local', seed=1234)
    assert draws() == first
    initialize('local', seed=99)
    assert draws() != first
    with pytest.raises(ConfigurationError, match='nproc_per_node=0'):
        initialize('local', nproc_per_node=0)


def test_get_logger_and_get_device_placement_at_top_level():
    assert twinkle_async.get_logger is get_logger
    logger = get_logger()
    assert isinstance(logger, logging.Logger) and logger.name == 'twinkle_async'
    initialize('local', groups=[DeviceGroup(name='sampler', ranks=[0, 1], device_type='GPU', gpus_per_worker=2)],
               name='demo', global_device_mesh=DeviceMesh.from_sizes(world_size=2, tp_size=2))
    placement = get_device_placement()
    assert "run 'demo'" in placement and 'tp_size=2' in placement
    assert "group 'sampler': 2 x cuda, 1 worker(s) of 2 device(s)" in placement
    initialize('local')


def test_torch_engine_takes_twinkles_engine_args(caplog):
    with caplog.at_level(logging.WARNING):
        args = parse_engine_args({'gpu_memory_utilization': 0.8, 'logprobs_mode': 'processed_logprobs',
                                  'max_logprobs': 64, 'torch_dtype': 'bfloat16'})
    assert (args.logprobs_mode, args.max_logprobs, args.dtype) == ('processed_logprobs', 64, 'bfloat16')
    assert 'gpu_memory_utilization=0.8 ignored' in caplog.text
    with pytest.raises(EngineArgsError, match='logprobs_mode'):
        parse_engine_args({'logprobs_mode': 'raw_logits'})
    with pytest.raises(EngineArgsError, match='not both'):
        parse_engine_args({'dtype': 'float32', 'torch_dtype': 'bfloat16'})


def test_vllm_engine_on_cpu_drops_gpu_only_args_with_a_warning(caplog, tiny_model_dir):
    from twinkle_async.engines.vllm.args import build_engine_args
    with caplog.at_level(logging.WARNING):
        args = build_engine_args(str(tiny_model_dir), {'gpu_memory_utilization': 0.7, 'max_logprobs': 64,
                                                       'logprobs_mode': 'processed_logprobs'}, on_cpu=True)
    assert "ignoring GPU-only engine_args {'gpu_memory_utilization': 0.7}" in caplog.text
    assert (args.max_logprobs, args.logprobs_mode) == (64, 'processed_logprobs')
    kept = build_engine_args(str(tiny_model_dir), {'gpu_memory_utilization': 0.7}, on_cpu=False)
    assert kept.gpu_memory_utilization == 0.7

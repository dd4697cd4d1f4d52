"""Twinkle's cookbook flows ported by renaming imports, on the embedded default model, in three set-ups:
the torch engine and the vLLM engine in this process, and vLLM replicas under Ray (dp=2).

One sampler per set-up serves every flow (built as the cookbooks build theirs); flows that use a second sampler
(GKD's teacher) use the same one, which is also built with the teacher's engine_args.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import twinkle_async
from twinkle_async import DeviceGroup, DeviceMesh
from twinkle_async.sampler import TorchSampler, vLLMSampler

from .common import MODEL_ID

SETUPS = ['torch', 'vllm', 'ray']

# the student's engine_args from the cookbooks, plus the GKD teacher's (logprobs_mode, max_logprobs)
VLLM_ENGINE_ARGS = {'gpu_memory_utilization': 0.8, 'max_model_len': 2048, 'max_lora_rank': 32, 'enable_lora': True,
                    'max_loras': 1, 'enable_tower_connector_lora': True, 'logprobs_mode': 'raw_logprobs',
                    'max_logprobs': 64}
TORCH_ENGINE_ARGS = {'gpu_memory_utilization': 0.8, 'max_model_len': 2048, 'logprobs_mode': 'raw_logprobs',
                     'max_logprobs': 64, 'max_num_seqs': 32}


def _ray_sampler():
    sampler_gpus = 2
    device_groups = [DeviceGroup(name='sampler', ranks=list(range(sampler_gpus)), device_type='CPU')]
    sampler_mesh = DeviceMesh.from_sizes(world_size=sampler_gpus, dp_size=sampler_gpus)
    twinkle_async.initialize(mode='ray', nproc_per_node=sampler_gpus, groups=device_groups, lazy_collect=False,
                             num_cpus=2, object_store_memory=256 * 2**20)
    return vLLMSampler(model_id=MODEL_ID, engine_args=VLLM_ENGINE_ARGS, device_mesh=sampler_mesh,
                       remote_group='sampler')


@pytest.fixture(scope='package', params=SETUPS)
def setup(request, ray_environment):
    """``(name, sampler)``: one set-up at a time (pytest groups the tests by it)."""
    if request.param == 'torch':
        sampler = TorchSampler(model_id=MODEL_ID, engine_args=TORCH_ENGINE_ARGS)
    elif request.param == 'vllm':
        sampler = vLLMSampler(model_id=MODEL_ID, engine_args=VLLM_ENGINE_ARGS)
    else:
        sampler = _ray_sampler()
    yield request.param, sampler
    sampler.shutdown()
    if request.param == 'ray':
        import ray
        twinkle_async.initialize('local')
        ray.shutdown()


@pytest.fixture(scope='package')
def hf_default(default_model_dir):
    """The default model in float32 with plain transformers: what a trainer computes logprobs with."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype='float32').eval()


@pytest.fixture(scope='package')
def lora_path(default_model_dir, tmp_path_factory) -> Path:
    """A PEFT LoRA (r=8 on q/v, random non-zero weights) for the default model: the cookbook's LORA_PATH."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'],
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if 'lora_' in name:
                parameter.normal_(0.0, 0.3)
    directory = tmp_path_factory.mktemp('cookbook-lora')
    model.save_pretrained(directory)
    return directory

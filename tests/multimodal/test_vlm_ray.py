"""Images through Ray replicas (dp=2, torch engine): the driver's template renders them with the model's processor
and both replicas sample what HF ``generate`` does."""

from __future__ import annotations

import pytest_asyncio

from twinkle_async import DeviceMesh

from .conftest import VLM_ENGINE_ARGS
from .test_vlm_generation import GREEDY, described, hf_described, reference
from .tiny_vlm import picture
from conftest import ray_sampler, within


@pytest_asyncio.fixture(scope='module', loop_scope='session')
async def remote_vlm(ray_environment, vlm_dir):
    async with ray_sampler('vlm', vlm_dir, engine='torch', engine_args=VLM_ENGINE_ARGS,
                           device_mesh=DeviceMesh.from_sizes(dp_size=2)) as sampler:
        yield sampler


async def test_both_replicas_sample_images_as_hf_generate(remote_vlm, hf_vlm):
    image = picture(40)
    feature = remote_vlm.template.encode(described(image))
    assert 'pixel_values' in feature and len(feature['images']) == 1  # rendered in the driver with the processor
    responses = await within(remote_vlm.sample([described(image), described(image)], GREEDY))
    assert sorted(s.served for s in await remote_vlm.engine.replica_status()) == [1, 1]
    prompt, tokens, _ = reference(hf_vlm, hf_described(), [image])
    assert [r.prompt_token_ids for r in responses] == [prompt, prompt]
    assert [r.sequences[0].tokens for r in responses] == [tokens, tokens]

"""A weight update while a request with an image runs: its KV cache is rebuilt with the image (pause 'keep', update,
resume), so the rest of its tokens are those HF ``generate`` gives the whole prompt with its pixels."""

from __future__ import annotations

from safetensors.torch import load_file

from .test_vlm_generation import described, hf_described, reference
from .tiny_vlm import picture
from conftest import start_stream, within


async def test_an_update_mid_request_recomputes_the_image(vlm_sampler, hf_vlm, vlm_dir):
    image = picture(30)
    task, deltas = await start_stream(vlm_sampler, described(image), {'max_tokens': 24, 'temperature': 0,
                                                                      'ignore_eos': True})
    old = vlm_sampler.weight_version
    await within(vlm_sampler.pause('keep'))
    new = await within(vlm_sampler.update_weights(load_file(str(vlm_dir / 'model.safetensors'))))
    kept = sum(len(d.token_ids) for d in deltas)
    await within(vlm_sampler.resume())
    await within(task)
    tokens = [t for d in deltas for t in d.token_ids]
    versions = [d.weight_version for d in deltas for _ in d.token_ids]
    assert versions == [old] * kept + [new] * (24 - kept) and kept < 24
    _, expected, _ = reference(hf_vlm, hf_described(), [image], max_new_tokens=24)
    assert tokens == expected

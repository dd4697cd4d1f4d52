"""Bad images on both engines: each a typed error naming what was wrong, while 8 good requests finish beside them,
and no KV slot is left held."""

from __future__ import annotations

import asyncio
import base64

import pytest

from twinkle_async.errors import InvalidImageError, InvalidInputError
from twinkle_async.multimodal.processing import MultiModalPrompt

from .test_vlm_generation import GREEDY, described
from .tiny_vlm import picture
from conftest import chat, counters_when, within

BAD_IMAGES = {
    'corrupt bytes': (b'\x89PNG\r\n\x1a\n' + b'\x00' * 64, 'not a readable image'),
    'corrupt data URL': ('data:image/png;base64,' + base64.b64encode(b'GIF89a-broken').decode(), 'not a readable'),
    'unsupported type': ({1, 2, 3}, 'unsupported image type set'),
    'missing file': ('/nonexistent/cat.png', 'not an existing file'),
    'float array': (__import__('numpy').zeros((8, 8, 3)), 'must be uint8'),
    'remote URL offline': ('http://127.0.0.1:9/cat.png', 'cannot fetch http://127.0.0.1:9/cat.png'),
}


async def good_requests(sampler, count: int = 8) -> list:
    return [asyncio.ensure_future(sampler.sample(described(picture(10 + i)), GREEDY)) for i in range(count)]


@pytest.mark.parametrize('case', list(BAD_IMAGES))
async def test_a_bad_image_fails_alone(vlm_sampler, case: str):
    image, named = BAD_IMAGES[case]
    good = await good_requests(vlm_sampler)
    with pytest.raises(InvalidImageError, match=named):
        await within(vlm_sampler.sample(described(image), GREEDY))
    for response in await within(asyncio.gather(*good)):
        assert response.sequences[0].stop_reason == 'length' and len(response.sequences[0].tokens) == 8
    await within(counters_when(vlm_sampler, lambda s: s.running == 0 and s.used_slots == 0))


async def test_more_images_than_the_engines_limit(vlm_sampler):
    """``limit_mm_per_prompt={'image': 3}``: a prompt with 4 is refused by the engine itself."""
    good = await good_requests(vlm_sampler)
    four = {'messages': [{'role': 'user', 'content': [*({'type': 'image', 'image': picture(i)} for i in range(4)),
                                                      {'type': 'text', 'text': 'Compare.'}]}]}
    with pytest.raises(InvalidImageError, match=r"4 images, over this engine's limit_mm_per_prompt=\{'image': 3\}"):
        await within(vlm_sampler.sample(four, GREEDY))
    assert all(r.sequences[0].stop_reason == 'length' for r in await within(asyncio.gather(*good)))
    await within(counters_when(vlm_sampler, lambda s: s.running == 0 and s.used_slots == 0))


async def test_an_image_sent_to_a_text_only_model(sampler):
    with pytest.raises(InvalidImageError, match='text-only'):
        await within(sampler.sample(described(picture(0)), GREEDY))
    assert (await within(sampler.sample(chat('still serving'), GREEDY))).sequences[0].stop_reason == 'length'


async def test_an_image_sent_to_a_text_only_engine_directly(sampler):
    """Past the template (a hand-built request): the engine refuses it too."""
    from twinkle_async.engines.base import EngineRequest, RequestParams
    images = MultiModalPrompt((picture(0),), [1, 2, 3])
    request = EngineRequest('direct-image', [1, 2, 3], RequestParams(max_tokens=2), multi_modal=images)
    with pytest.raises(InvalidImageError, match='text-only'):
        async for _ in sampler.engine.generate(request):
            pass


async def test_placeholders_and_image_tokens_that_do_not_match_the_images(vlm_sampler):
    good = await good_requests(vlm_sampler)
    two_placeholders = {'messages': [{'role': 'user', 'content': '<image><image>Compare.', 'images': [picture(0)]}]}
    with pytest.raises(InvalidInputError, match='2 <image> placeholders but 1 images'):
        await within(vlm_sampler.sample(two_placeholders, GREEDY))
    first = await within(vlm_sampler.sample(described(picture(1)), GREEDY))
    two_images = {**first.sequences[0].new_input_feature, 'images': [picture(1), picture(2)]}
    with pytest.raises(InvalidInputError, match='do not hold image 1'):
        await within(vlm_sampler.sample(two_images, GREEDY))
    unexpanded = {'input_ids': vlm_sampler.template.tokenizer('<image>hi', add_special_tokens=False)['input_ids'],
                  'images': [picture(1)]}
    with pytest.raises(InvalidInputError, match='do not hold image 0'):
        await within(vlm_sampler.sample(unexpanded, GREEDY))
    without_images = {key: value for key, value in first.sequences[0].new_input_feature.items() if key != 'images'}
    with pytest.raises(InvalidInputError, match=r'holds image tokens \(<image>\) but no images'):
        await within(vlm_sampler.sample(without_images, GREEDY))
    with pytest.raises(InvalidInputError, match='holds image tokens'):
        await within(vlm_sampler.sample({'messages': [{'role': 'user', 'content': 'a literal <image> tag'}]}, GREEDY))
    assert all(r.sequences[0].stop_reason == 'length' for r in await within(asyncio.gather(*good)))

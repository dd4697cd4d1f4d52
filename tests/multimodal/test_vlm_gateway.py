"""The gateway's ``/v1/chat/completions`` takes OpenAI ``image_url`` parts (real uvicorn, real ``openai`` client)."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from serve.conftest import serving

from .test_vlm_generation import GREEDY, described
from .tiny_vlm import picture
from conftest import within


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode()


async def test_image_url_parts_answer_as_in_process_sampling(vlm_sampler):
    image = picture(9)
    expected = await within(vlm_sampler.sample(described(image), GREEDY))
    async with serving(vlm_sampler) as served:
        reply = await within(served.client().chat.completions.create(
            model='tiny', max_tokens=8, temperature=0.0, extra_body={'return_token_ids': True},
            messages=[{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': data_url(image)}},
                                                   {'type': 'text', 'text': 'What is in the picture?'}]}]))
        assert reply.choices[0].model_extra['token_ids'] == expected.sequences[0].tokens
        assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
        with pytest.raises(openai.BadRequestError, match='not a readable image'):
            await within(served.client().chat.completions.create(
                model='tiny', max_tokens=8, messages=[{'role': 'user', 'content': [
                    {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,' + 'A' * 40}}]}]))


async def test_a_streamed_answer_sees_the_image(vlm_sampler):
    image = picture(11)
    expected = await within(vlm_sampler.sample(described(image), GREEDY))
    async with serving(vlm_sampler) as served:
        stream = await within(served.client().chat.completions.create(
            model='tiny', max_tokens=8, temperature=0.0, stream=True,
            messages=[{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': data_url(image)}},
                                                   {'type': 'text', 'text': 'What is in the picture?'}]}]))
        text = ''.join([chunk.choices[0].delta.content or '' async for chunk in stream if chunk.choices])
    assert text == expected.sequences[0].decoded

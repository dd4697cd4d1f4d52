"""Every image form Twinkle and OpenAI clients send renders the same prompt and pixels as a PIL image does."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from twinkle_async.multimodal import gather_images

from .test_vlm_generation import GREEDY, described
from .tiny_vlm import picture
from conftest import within


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
    image = picture(7)
    path = tmp_path_factory.mktemp('images') / 'seven.png'
    path.write_bytes(png_bytes(image))
    return image, path


def forms(image, path) -> dict:
    data = png_bytes(image)
    b64 = base64.b64encode(data).decode()
    return {'PIL': image, 'path': str(path), 'pathlib': path, 'file URL': path.as_uri(),
            'data URL': f'data:image/png;base64,{b64}', 'base64': b64, 'bytes': data,
            'datasets bytes': {'bytes': data, 'path': None}, 'datasets path': {'path': str(path)},
            'numpy': np.asarray(image), 'tensor': torch.from_numpy(np.asarray(image).copy())}


def trajectories(image) -> dict:
    text = 'What is in the picture?'
    return {
        'image part': described(image, text),
        'url part': {'messages': [{'role': 'user', 'content': [{'type': 'image', 'url': image},
                                                               {'type': 'text', 'text': text}]}]},
        'path part': {'messages': [{'role': 'user', 'content': [{'type': 'image', 'path': image},
                                                                {'type': 'text', 'text': text}]}]},
        'OpenAI image_url': {'messages': [{'role': 'user', 'content': [
            {'type': 'image_url', 'image_url': {'url': image}}, {'type': 'text', 'text': text}]}]},
        'message images + placeholder': {'messages': [{'role': 'user', 'content': f'<image>{text}',
                                                        'images': [image]}]},
        'message images, no placeholder': {'messages': [{'role': 'user', 'content': text, 'images': [image]}]},
        'trajectory images + empty part': {'images': [image], 'messages': [
            {'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': text}]}]},
        'trajectory images + placeholder': {'images': [image], 'messages': [{'role': 'user',
                                                                             'content': f'<image>{text}'}]},
        'trajectory images, prepended': {'images': [image], 'messages': [{'role': 'user', 'content': text}]},
    }


def test_every_image_form_renders_as_the_pil_image(torch_vlm_sampler, image_files):
    template = torch_vlm_sampler.template
    image, path = image_files
    expected = template.encode(described(image))
    for name, value in forms(image, path).items():
        got = template.encode(described(value))
        assert got['input_ids'] == expected['input_ids'], name
        assert torch.equal(got['pixel_values'], expected['pixel_values']), name
    for name, trajectory in trajectories(image).items():
        got = template.encode(trajectory)
        assert got['input_ids'] == expected['input_ids'], name
        assert torch.equal(got['pixel_values'], expected['pixel_values']), name
        assert len(got['images']) == 1 and got['messages'][0]['content'][0] == {'type': 'image'}, name


def test_images_are_gathered_in_prompt_order():
    a, b, c, d = 'a', 'b', 'c', 'd'
    trajectory = {'images': [c, d], 'messages': [
        {'role': 'system', 'content': 'S'},
        {'role': 'user', 'content': 'first <image> then', 'images': [a]},
        {'role': 'assistant', 'content': 'ok'},
        {'role': 'user', 'content': [{'type': 'image', 'image': b}, {'type': 'image'}, {'type': 'text', 'text': 'x'}]}]}
    messages, images = gather_images(trajectory)
    # d has no part left: it goes first in the first user message
    assert images == [d, a, b, c]
    assert messages[1]['content'] == [{'type': 'image'}, {'type': 'text', 'text': 'first '}, {'type': 'image'},
                                      {'type': 'text', 'text': ' then'}]
    assert gather_images({'messages': [{'role': 'user', 'content': 'no <image> here'}]}) is None


async def test_an_input_feature_with_images_only(vlm_sampler):
    """``InputFeature['images']`` and expanded ``input_ids``: sampled as the trajectory is, and its continuation gets
    the pixel tensors it lacked."""
    image = picture(8)
    trajectory = await within(vlm_sampler.sample(described(image), GREEDY))
    feature = {'input_ids': trajectory.prompt_token_ids, 'images': [image]}
    response = await within(vlm_sampler.sample(feature, GREEDY))
    assert response.sequences[0].tokens == trajectory.sequences[0].tokens
    continued = response.sequences[0].new_input_feature
    assert torch.equal(continued['pixel_values'], trajectory.sequences[0].new_input_feature['pixel_values'])

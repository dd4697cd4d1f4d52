"""Images on both engines against HF ``generate`` with the same processor inputs (tiny Idefics3, float32)."""

from __future__ import annotations

import torch

from .tiny_vlm import IMAGE_TOKENS_PER_IMAGE, picture
from conftest import within

GREEDY = {'max_tokens': 8, 'temperature': 0.0}


QUESTION = 'What is in the picture?'


def described(image, text: str = QUESTION) -> dict:
    return {'messages': [{'role': 'user', 'content': [{'type': 'image', 'image': image},
                                                      {'type': 'text', 'text': text}]}]}


def hf_described(text: str = QUESTION) -> list:
    """``described``'s messages as the processor's chat template takes them (the image passed beside)."""
    return [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': text}]}]


def reference(hf_vlm, messages: list, images: list, max_new_tokens: int = 8) -> tuple[list[int], list[int], dict]:
    """HF ``generate`` on the processor's own inputs: (prompt ids, greedy tokens, processor outputs)."""
    model, processor = hf_vlm
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=images, return_tensors='pt', add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt = inputs['input_ids'][0].tolist()
    return prompt, out[0, len(prompt):].tolist(), inputs


def image_token_count(sampler, ids: list[int]) -> int:
    return ids.count(sampler.template.tokenizer.convert_tokens_to_ids('<image>'))


async def test_greedy_tokens_equal_hf_generate_with_the_same_image(vlm_sampler, hf_vlm):
    image = picture(0)
    response = await within(vlm_sampler.sample(described(image), GREEDY))
    hf_messages = hf_described()
    prompt, tokens, inputs = reference(hf_vlm, hf_messages, [image])
    assert response.prompt_token_ids == prompt
    assert response.sequences[0].tokens == tokens
    # image tokens counted once: 4 <image> tokens per image, as the processor makes them
    assert image_token_count(vlm_sampler, response.prompt_token_ids) == 4
    assert len(prompt) == len(vlm_sampler.template.tokenizer(
        hf_vlm[1].apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)['input_ids']) + IMAGE_TOKENS_PER_IMAGE - 1
    feature = response.sequences[0].new_input_feature
    assert torch.equal(feature['pixel_values'], inputs['pixel_values'])  # the trainer sees the sampler's pixels
    assert feature['input_ids'] == prompt + tokens and len(feature['images']) == 1


async def test_another_image_changes_the_tokens_as_in_hf_generate(vlm_sampler, hf_vlm):
    hf_messages = hf_described()
    results = []
    for seed in (1, 2):
        image = picture(seed, (64, 64))
        response = await within(vlm_sampler.sample(described(image), GREEDY))
        _, tokens, _ = reference(hf_vlm, hf_messages, [image])
        assert response.sequences[0].tokens == tokens
        results.append(tokens)
    assert results[0] != results[1]


async def test_two_turns_continued_from_new_input_feature_keep_the_first_image(vlm_sampler, hf_vlm):
    first_image, second_image = picture(3), picture(4)
    first = await within(vlm_sampler.sample(described(first_image, 'Describe it.'), GREEDY))
    feature = first.sequences[0].new_input_feature
    second_turn = {**feature, 'messages': [*feature['messages'], {'role': 'user', 'content': [
        {'type': 'image', 'image': second_image}, {'type': 'text', 'text': 'And this one?'}]}]}
    del second_turn['input_ids']  # re-rendered from the messages: the trajectory form
    second = await within(vlm_sampler.sample(second_turn, GREEDY))
    assert second.prompt_token_ids[:len(first.prompt_token_ids)] == first.prompt_token_ids
    assert image_token_count(vlm_sampler, second.prompt_token_ids) == 8
    hf_messages = [*hf_described('Describe it.'), {'role': 'assistant', 'content': feature['messages'][-1]['content']},
                   *hf_described('And this one?')]
    prompt, tokens, _ = reference(hf_vlm, hf_messages, [first_image, second_image])
    assert second.prompt_token_ids == prompt and second.sequences[0].tokens == tokens
    assert second.sequences[0].new_input_feature['images'] == [first_image, second_image]


async def test_a_continuation_feature_is_sampled_token_for_token(vlm_sampler, hf_vlm):
    """``new_input_feature`` sent back as it is (input_ids with the image tokens expanded, and its images): the
    engine sees the exact tokens, no image expanded twice."""
    image = picture(5)
    first = await within(vlm_sampler.sample(described(image), GREEDY))
    feature = first.sequences[0].new_input_feature
    tail = vlm_sampler.template.tokenizer('<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n',
                                          add_special_tokens=False)['input_ids']
    follow_up = {**feature, 'input_ids': feature['input_ids'] + tail}
    follow_up.pop('labels')
    second = await within(vlm_sampler.sample(follow_up, GREEDY))
    assert second.prompt_token_ids == feature['input_ids'] + tail
    model, processor = hf_vlm
    inputs = processor.image_processor([image], return_tensors='pt')
    ids = torch.tensor([second.prompt_token_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs, max_new_tokens=8,
                             do_sample=False)
    assert second.sequences[0].tokens == out[0, ids.shape[1]:].tolist()


async def test_mm_processor_kwargs_reach_the_processor(vlm_sampler, hf_vlm):
    """Twinkle's per-input ``mm_processor_kwargs``: here image splitting into 64-px tiles (4 tiles and the whole
    image), expanded alike by the sampler's processor and the engine's, as HF ``generate`` does."""
    image, kwargs = picture(12, (100, 150)), {'size': {'longest_edge': 128}, 'do_image_splitting': True}
    response = await within(vlm_sampler.sample({**described(image), 'mm_processor_kwargs': kwargs}, GREEDY))
    model, processor = hf_vlm
    text = processor.apply_chat_template(hf_described(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[image], return_tensors='pt', add_special_tokens=False, **kwargs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert inputs['pixel_values'].shape[1] == 5 and image_token_count(vlm_sampler, response.prompt_token_ids) == 20
    assert response.prompt_token_ids == inputs['input_ids'][0].tolist()
    assert response.sequences[0].tokens == out[0, inputs['input_ids'].shape[1]:].tolist()

"""The tiny vision-language test model: a random Idefics3 (SmolVLM-shaped: a 2-layer vision tower, image 64 px,
patch 16, scale factor 2, image splitting off -> 4 image tokens per image; a 2-layer Llama text model) with the
default model's tokenizer plus the image tokens, and a ChatML chat template that renders image parts. No downloads.
"""

from __future__ import annotations

from pathlib import Path

from tiny_model import with_random_weights

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_TOKENS_PER_IMAGE = 7  # <fake_token_around_image> <global-img> <image> x 4 <fake_token_around_image>


def build_tiny_vlm(directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlamaConfig,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({'additional_special_tokens': ['<image>', '<fake_token_around_image>',
                                                                '<global-img>']})
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={'longest_edge': 64},
                                       max_image_size={'longest_edge': 64})
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=CHAT_TEMPLATE)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                       tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    vision = Idefics3VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=64, patch_size=16)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids('<image>'),
                            pad_token_id=tokenizer.pad_token_id)
    model = with_random_weights(Idefics3ForConditionalGeneration, config, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory


def picture(seed: int, size: tuple[int, int] = (48, 80)):
    """A random RGB PIL image."""
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)

"""Images in prompts: loading them in every accepted form, finding them in trajectories, and the model's own
processor that expands them into image tokens and pixel tensors."""

from twinkle_async.multimodal.images import load_image
from twinkle_async.multimodal.messages import IMAGE_PLACEHOLDER, gather_images
from twinkle_async.multimodal.processing import ImageProcessor, MultiModalPrompt, load_image_processor

__all__ = ['load_image', 'gather_images', 'IMAGE_PLACEHOLDER', 'ImageProcessor', 'MultiModalPrompt',
           'load_image_processor']

"""Templates by name: Twinkle's class names and ours, resolved by ``set_template``."""

from __future__ import annotations

from typing import Any, Type, Union

from twinkle_async.errors import TemplateNotFoundError
from twinkle_async.template.base import ChatMLTemplate, Template

__all__ = ['Qwen3_5Template', 'DeepseekV4Template', 'TEMPLATES', 'TemplateSpec', 'build_template']


class Qwen3_5Template(Template):  # noqa: N801 - Twinkle's name
    """Twinkle's Qwen3.5 template name: the model's own chat template (``enable_thinking`` reaches it)."""


class DeepseekV4Template(Template):
    """Twinkle's DeepSeek-V4 template name: the model's own chat template."""


TEMPLATES: dict[str, Type[Template]] = {
    'default': Template, 'Template': Template, 'chatml': ChatMLTemplate,
    'Qwen3_5Template': Qwen3_5Template, 'DeepseekV4Template': DeepseekV4Template,
}
"""Names ``set_template`` accepts. Twinkle's model-family names map to the model's own chat template."""

TemplateSpec = Union[str, Template, Type[Template]]


def build_template(spec: TemplateSpec, tokenizer: Any, **kwargs: Any) -> Template:
    """Resolve ``set_template``'s argument: a registered name or a Template class (built on ``tokenizer`` with
    ``kwargs``: Twinkle's template arguments), or an instance (used as it is).

    Raises:
        TemplateNotFoundError: an unregistered name (the message lists the known ones).
        ConfigurationError: an invalid template argument.
    """
    if isinstance(spec, Template):
        return spec
    if isinstance(spec, type) and issubclass(spec, Template):
        return spec(tokenizer, **kwargs)
    if isinstance(spec, str):
        if spec not in TEMPLATES:
            raise TemplateNotFoundError(f'unknown template {spec!r}; known: {sorted(TEMPLATES)}')
        return TEMPLATES[spec](tokenizer, **kwargs)
    raise TemplateNotFoundError(f'template must be a name, a Template class or instance, got {spec!r}')

"""Chat templates: Trajectory -> prompt token ids, token ids -> text, and streaming detokenization."""

from __future__ import annotations

import json
from typing import Any, Sequence, Type, Union

from twinkle_async.data_format.inputs import InputFeature, Message, Trajectory
from twinkle_async.errors import InvalidInputError, TemplateNotFoundError

__all__ = ['Template', 'ChatMLTemplate', 'IncrementalDetokenizer', 'TEMPLATES', 'build_template']

_ROLES = ('system', 'user', 'assistant', 'tool')
_MAX_PENDING = 8  # tokens held back waiting for a multi-byte character to complete

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Template:
    """Encodes trajectories with a tokenizer's chat template (the model's own by default).

    Args:
        tokenizer: a Hugging Face tokenizer.
        chat_template: a Jinja chat template overriding the tokenizer's.
    """

    chat_template: str | None = None

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        if chat_template is not None:
            self.chat_template = chat_template
        if self.chat_template is None and not getattr(tokenizer, 'chat_template', None):
            self.chat_template = _CHATML

    def encode(self, trajectory: Trajectory, add_generation_prompt: bool = True) -> InputFeature:
        """Render ``trajectory`` (messages, tools) and tokenize it, ending with the generation prompt.

        Raises:
            InvalidInputError: no messages, unknown roles, or malformed messages or tools.
        """
        messages = [_to_hf_message(m, i) for i, m in enumerate(_messages_of(trajectory))]
        tools = [_to_hf_tool(t, i) for i, t in enumerate(trajectory.get('tools') or [])] or None
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja raises its own error types for template-level problems
            raise InvalidInputError(f'chat template failed on this trajectory: {exc}') from exc
        input_ids = self.tokenizer(text, add_special_tokens=False)['input_ids']
        return InputFeature(input_ids=list(input_ids))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids to text."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_token_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer."""
        return IncrementalDetokenizer(self.tokenizer, prompt_token_ids)


class ChatMLTemplate(Template):
    """ChatML (``<|im_start|>role\\n...<|im_end|>``), whatever the tokenizer ships."""

    chat_template = _CHATML


TEMPLATES: dict[str, Type[Template]] = {'default': Template, 'chatml': ChatMLTemplate}


def build_template(spec: Union[str, Template, Type[Template]], tokenizer: Any, **kwargs: Any) -> Template:
    """Resolve ``set_template``'s argument: a registered name, a Template class, or an instance.

    Raises:
        TemplateNotFoundError: an unregistered name (the message lists the known ones).
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


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a multi-byte character.

    Decodes only a short window of recent tokens per step, so cost does not grow with length. Bytes that
    never form a character (after ``_MAX_PENDING`` tokens) are let through as U+FFFD.
    """

    __slots__ = ('tokenizer', 'token_ids', 'read_offset', 'prefix_text')

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = list(prompt_token_ids[-6:])  # context for the first tokens' spacing
        self.read_offset = len(self.token_ids)
        self.prefix_text = self._decode(self.token_ids)

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        self.token_ids.append(token_id)
        new_text = self._decode(self.token_ids)
        pending = len(self.token_ids) - self.read_offset
        if new_text.endswith('\ufffd') and pending < _MAX_PENDING:
            return ''
        delta = new_text[len(self.prefix_text):]
        del self.token_ids[:self.read_offset]  # keep only the window: cost stays flat with length
        self.read_offset = len(self.token_ids)
        self.prefix_text = self._decode(self.token_ids)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ''


def _messages_of(trajectory: Any) -> list[Message]:
    if not isinstance(trajectory, dict):
        raise InvalidInputError(f'a trajectory must be a dict with "messages", got {type(trajectory).__name__}')
    messages = trajectory.get('messages')
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError('trajectory has no messages: "messages" must be a non-empty list')
    return messages


def _to_hf_message(message: Any, position: int) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise InvalidInputError(f'messages[{position}] must be a dict, got {type(message).__name__}')
    role = message.get('role')
    if role not in _ROLES:
        raise InvalidInputError(f'messages[{position}].role must be one of {_ROLES}, got {role!r}')
    content = message.get('content', '')
    if not isinstance(content, (str, list)):
        raise InvalidInputError(f'messages[{position}].content must be a string or a list of parts, '
                                f'got {type(content).__name__}')
    hf: dict[str, Any] = {'role': role, 'content': content}
    if message.get('tool_calls'):
        hf['tool_calls'] = [_to_hf_tool_call(c, position) for c in message['tool_calls']]
    return hf


def _to_hf_tool_call(call: Any, position: int) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get('tool_name'), str):
        raise InvalidInputError(f'messages[{position}].tool_calls entries need a "tool_name" string')
    arguments = call.get('arguments', '{}')
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or '{}')
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f'messages[{position}].tool_calls arguments are not JSON: {exc}') from exc
    return {'type': 'function', 'function': {'name': call['tool_name'], 'arguments': arguments}}


def _to_hf_tool(tool: Any, position: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or not isinstance(tool.get('tool_name'), str):
        raise InvalidInputError(f'tools[{position}] must be a dict with a "tool_name" string')
    parameters = tool.get('parameters') or {}
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f'tools[{position}].parameters is not JSON: {exc}') from exc
    if not isinstance(parameters, dict):
        raise InvalidInputError(f'tools[{position}].parameters must be a JSON object')
    function = {'name': tool['tool_name'], 'description': tool.get('description', ''), 'parameters': parameters}
    return {'type': 'function', 'function': function}

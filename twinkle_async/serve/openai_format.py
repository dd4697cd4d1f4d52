"""Pure conversions between OpenAI's wire shapes and the sampler's: sampling parameters in, choices, logprobs,
stream chunks and usage out."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Optional, Sequence

from twinkle_async.data_format.outputs import LogprobRow, SampleResponse
from twinkle_async.data_format.sampling_params import SamplingParams
from twinkle_async.serve.protocol import ChatCompletionRequest, CompletionRequest
from twinkle_async.template.tool_parsers import detect_tool_parser, partial_marker

__all__ = ['sampling_params', 'chat_message', 'chat_logprobs', 'completion_logprobs', 'chat_body',
           'completion_body', 'chunk', 'usage', 'new_id', 'shown_before_calls', 'ToolCallDeltas']

Decode = Callable[[Sequence[int]], str]
ParseCalls = Callable[[str], tuple[str, list[dict[str, Any]]]]


def new_id(prefix: str) -> str:
    return f'{prefix}-{uuid.uuid4().hex}'


def sampling_params(request: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    """OpenAI's fields as ``SamplingParams`` (OpenAI's defaults: temperature 1, top_p 1).

    Raises:
        InvalidSamplingParamsError: a value the sampler refuses (named).
    """
    if isinstance(request, ChatCompletionRequest):
        max_tokens = request.max_completion_tokens or request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        max_tokens, logprobs = request.max_tokens or 16, request.logprobs  # OpenAI's completions default: 16
    given = {'max_tokens': max_tokens, 'temperature': request.temperature, 'top_p': request.top_p,
             'stop': request.stop, 'seed': request.seed, 'logprobs': logprobs, 'num_samples': request.n,
             'top_k': request.top_k, 'repetition_penalty': request.repetition_penalty,
             'ignore_eos': request.ignore_eos}
    return SamplingParams(**{key: value for key, value in given.items() if value is not None})


def chat_message(text: str, parse_calls: Optional[ParseCalls]) -> tuple[dict[str, Any], Optional[str]]:
    """The assistant message for ``text`` and ``'tool_calls'`` when it holds calls (``parse_calls`` given when
    the request offered tools)."""
    if parse_calls is not None:
        content, calls = parse_calls(text)
        if calls:
            message = {'role': 'assistant', 'content': content or None, 'tool_calls': openai_tool_calls(calls)}
            return message, 'tool_calls'
    return {'role': 'assistant', 'content': text}, None


def shown_before_calls(text: str, starts: Sequence[str]) -> str:
    """The part of a streamed ``text`` that can be sent as content now: up to the first tool-call opening, less a
    tail that may be the beginning of one."""
    cut = min((at for at in (text.find(start) for start in starts) if at >= 0), default=len(text))
    held = max((partial_marker(text, start) for start in starts), default=0) if cut == len(text) else 0
    return text[:cut - held]


class ToolCallDeltas:
    """The ``tool_calls`` deltas of one streamed choice, as OpenAI streams them: a call's first delta carries its
    ``index``, ``id``, ``type`` and ``function.name`` (with the arguments so far), later ones only more
    ``function.arguments`` text; concatenated per index they give the call. A call is announced once its name is
    written; one whose block then turns out not to be a valid call (which the whole reply would leave as content)
    cannot be taken back."""

    def __init__(self) -> None:
        self._sent: dict[int, tuple[int, str]] = {}  # call block -> (OpenAI index, arguments sent)

    @property
    def calls(self) -> int:
        """How many calls were begun."""
        return len(self._sent)

    def update(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        """The deltas that ``text`` (the choice's whole text so far; ``final`` once complete) adds."""
        parser = detect_tool_parser(text)
        deltas: list[dict[str, Any]] = []
        for block, call in enumerate(parser.partial_calls(text, final) if parser else []):
            if call.name is None:
                continue
            if block not in self._sent:
                self._sent[block] = (len(self._sent), call.arguments)
                deltas.append({'index': self._sent[block][0], 'id': _call_id(), 'type': 'function',
                               'function': {'name': call.name, 'arguments': call.arguments}})
                continue
            index, sent = self._sent[block]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                self._sent[block] = (index, call.arguments)
                deltas.append({'index': index, 'function': {'arguments': call.arguments[len(sent):]}})
        return deltas


def openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parsed calls in OpenAI's shape: a fresh ``call_`` id each, ``arguments`` as a JSON string."""
    return [{'id': _call_id(), 'type': 'function',
             'function': {'name': call['function']['name'],
                          'arguments': json.dumps(call['function']['arguments'], ensure_ascii=False)}}
            for call in calls]


def _call_id() -> str:
    return f'call_{uuid.uuid4().hex[:24]}'


def chat_logprobs(rows: Sequence[LogprobRow], decode: Decode) -> dict[str, Any]:
    """OpenAI chat ``logprobs``: per token its text, logprob, bytes and the top alternatives."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = decode([token])
        return {'token': text, 'logprob': logprob, 'bytes': list(text.encode())}

    return {'content': [{**entry(*row[0]), 'top_logprobs': [entry(*alt) for alt in row[1:]]} for row in rows]}


def completion_logprobs(rows: Sequence[LogprobRow], decode: Decode) -> dict[str, Any]:
    """Legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [decode([row[0][0]]) for row in rows]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {'tokens': tokens, 'token_logprobs': [row[0][1] for row in rows],
            'top_logprobs': [{decode([t]): lp for t, lp in row[1:]} for row in rows], 'text_offset': offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
            'total_tokens': prompt_tokens + completion_tokens}


def chat_body(response: SampleResponse, model: str, decode: Decode, parse_calls: Optional[ParseCalls],
              with_token_ids: bool, with_logprobs: bool = True) -> dict[str, Any]:
    """A ``chat.completion`` object for ``response`` (its logprobs only ``with_logprobs``)."""
    choices = []
    for index, sequence in enumerate(response.sequences):
        message, calls_reason = chat_message(sequence.decoded or '', parse_calls)
        choice: dict[str, Any] = {'index': index, 'message': message,
                                  'finish_reason': calls_reason or sequence.stop_reason,
                                  'logprobs': chat_logprobs(sequence.logprobs, decode)
                                  if sequence.logprobs and with_logprobs else None}
        if with_token_ids:
            choice.update(token_ids=sequence.tokens, weight_versions=sequence.weight_versions)
        choices.append(choice)
    return _body('chat.completion', 'chatcmpl', model, choices, response, with_token_ids)


def completion_body(response: SampleResponse, model: str, decode: Decode, with_token_ids: bool) -> dict[str, Any]:
    """A ``text_completion`` object for ``response``."""
    choices = []
    for index, sequence in enumerate(response.sequences):
        choice: dict[str, Any] = {
            'index': index, 'text': sequence.decoded or '', 'finish_reason': sequence.stop_reason,
            'logprobs': completion_logprobs(sequence.logprobs, decode) if sequence.logprobs else None}
        if with_token_ids:
            choice.update(token_ids=sequence.tokens, weight_versions=sequence.weight_versions)
        choices.append(choice)
    return _body('text_completion', 'cmpl', model, choices, response, with_token_ids)


def chunk(kind: str, request_id: str, created: int, model: str, choices: list[dict[str, Any]],
          usage_: Optional[dict[str, int]] = None) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk`` / ``text_completion`` object."""
    body: dict[str, Any] = {'id': request_id, 'object': kind, 'created': created, 'model': model, 'choices': choices}
    if usage_ is not None:
        body['usage'] = usage_
    return body


def _body(kind: str, prefix: str, model: str, choices: list[dict[str, Any]], response: SampleResponse,
          with_token_ids: bool) -> dict[str, Any]:
    prompt = response.prompt_token_ids or []
    body = {'id': new_id(prefix), 'object': kind, 'created': int(time.time()), 'model': model, 'choices': choices,
            'usage': usage(len(prompt), sum(len(s.tokens) for s in response.sequences))}
    if with_token_ids:
        body['prompt_token_ids'] = prompt
    return body

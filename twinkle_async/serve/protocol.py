"""The OpenAI request bodies the gateway accepts (validated; unknown OpenAI fields are ignored, as vLLM does)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ['ChatCompletionRequest', 'CompletionRequest', 'StreamOptions']


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields both endpoints share; ``return_token_ids`` (vLLM's name) adds token ids and weight versions."""

    model_config = ConfigDict(extra='ignore')

    model: Optional[str] = None
    n: int = Field(default=1, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    return_token_ids: bool = False
    # vLLM's extra sampling fields
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[Literal['auto', 'none'], None] = None
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0)

    @property
    def wants_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != 'none'


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[int]]
    logprobs: Optional[int] = Field(default=None, ge=0)

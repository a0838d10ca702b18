"""Chat on top of generation: OpenAI-style messages and tools are formatted by
mistral-common's encode_chat_completion (the model's own template: v3 puts
[AVAILABLE_TOOLS] before the last user turn, the model answers with
[TOOL_CALLS] followed by a JSON list of {"name", "arguments", "id"}), and the
model's tool-call tokens are parsed back into ToolCall objects. Output that
does not parse as tool calls comes back as plain text content."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from .errors import ChatFormatError
from .generation import Usage
from .tokenizer import Tokenizer

TOOL_CALLS_TOKEN = "[TOOL_CALLS]"
_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """A fresh call id in the form Mistral's v3 format uses: 9 letters or digits."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


@dataclass
class ToolCall:
    """One function call the model asked for; arguments are the parsed JSON object."""

    id: str
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class AssistantMessage:
    """The model's reply: text content, or tool calls (then content is None)."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    role: str = "assistant"

    def to_openai(self) -> dict[str, Any]:
        """The message as an OpenAI-style dict, ready to append to the conversation."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return message


@dataclass
class ChatResult:
    message: AssistantMessage
    finish_reason: str  # "stop", "length" or "tool_calls"
    usage: Usage
    time_to_first_token: float
    tokens_per_second: float


def encode_chat(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """Prompt token ids of an OpenAI-style conversation in the tokenizer's chat format."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ChatFormatError("messages must be a non-empty list of dicts with 'role' and 'content'")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ChatFormatError("tools must be a list of OpenAI-style tool dicts or None")
    if tools and tokenizer.special_id(TOOL_CALLS_TOKEN) is None:
        raise ChatFormatError(f"the tokenizer {tokenizer.path} has no tool-call format; call chat() without tools")
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    try:
        request = ChatCompletionRequest.from_openai(messages, tools or None)
        return tokenizer.mistral.encode_chat_completion(request).tokens
    except Exception as e:  # mistral-common raises pydantic, key, type and its own errors for bad messages
        raise ChatFormatError(f"cannot format the conversation: {type(e).__name__}: {e}") from None


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls in the JSON the model wrote after [TOOL_CALLS], or None if it is not a valid call list."""
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(payload, dict):
        payload = [payload]
    if not isinstance(payload, list) or not payload:
        return None
    calls = []
    for item in payload:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):  # some checkpoints write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return None
        if not isinstance(arguments, dict):
            return None
        call_id = item.get("id")
        calls.append(ToolCall(call_id if isinstance(call_id, str) and call_id else new_tool_call_id(),
                              item["name"], arguments))
    return calls

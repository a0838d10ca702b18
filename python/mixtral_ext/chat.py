"""Chat on top of generation: OpenAI-style messages and tools are formatted by
mistral-common's encode_chat_completion (the model's own template: v3 puts
[AVAILABLE_TOOLS] before the last user turn, the model answers with
[TOOL_CALLS] followed by a JSON list of {"name", "arguments", "id"}), and the
model's tool-call tokens are parsed back into ToolCall objects. Output that
does not parse as calls of the tools given comes back as plain text content.
Tool-call ids of other formats (OpenAI's "call_..." among them) are mapped to
the 9-character ids the format needs, the same way every time, and the model's
calls carry the original ids back. A conversation that ends with an assistant
message is continued (prefix continuation)."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from .errors import ChatFormatError
from .generation import Usage
from .tokenizer import Tokenizer

TOOL_CALLS_TOKEN = "[TOOL_CALLS]"
_ID_ALPHABET = string.ascii_letters + string.digits


_MISTRAL_ID = re.compile(r"[a-zA-Z0-9]{9}")


def new_tool_call_id() -> str:
    """A fresh call id in the form Mistral's v3 format uses: 9 letters or digits."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def foreign_call_ids(messages: list[dict]) -> dict[str, str]:
    """The tool-call ids of the conversation that the format cannot hold (OpenAI's "call_abc123",
    say), each mapped to 9 letters or digits derived from it: the same every time, so a follow-up
    request formats the shared history alike (and reuses its KV cache)."""
    found = [call.get("id") for m in messages if m.get("role") == "assistant" for call in m.get("tool_calls") or []
             if isinstance(call, dict)]
    found += [m.get("tool_call_id") for m in messages if m.get("role") == "tool"]
    mapped = {}
    for call_id in found:
        if isinstance(call_id, str) and call_id and not _MISTRAL_ID.fullmatch(call_id):
            digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
            mapped[call_id] = "".join(_ID_ALPHABET[(digest >> (6 * i)) % len(_ID_ALPHABET)] for i in range(9))
    return mapped


def _with_ids(messages: list[dict], mapped: dict[str, str]) -> list[dict]:
    """A copy of messages with the mapped tool-call ids replaced."""
    messages = copy.deepcopy(messages)
    for m in messages:
        for call in m.get("tool_calls") or [] if m.get("role") == "assistant" else []:
            if isinstance(call, dict) and call.get("id") in mapped:
                call["id"] = mapped[call["id"]]
        if m.get("role") == "tool" and m.get("tool_call_id") in mapped:
            m["tool_call_id"] = mapped[m["tool_call_id"]]
    return messages


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

    continued = messages[-1].get("role") == "assistant"  # the reply goes on from the assistant's text
    try:
        request = ChatCompletionRequest.from_openai(_with_ids(messages, foreign_call_ids(messages)), tools or None,
                                                    continue_final_message=continued)
        return tokenizer.mistral.encode_chat_completion(request).tokens
    except Exception as e:  # mistral-common raises pydantic, key, type and its own errors for bad messages
        raise ChatFormatError(f"cannot format the conversation: {type(e).__name__}: {e}") from None


def tool_names(tools: list[dict] | None) -> set[str]:
    """The function names of OpenAI-style tools."""
    return {t["function"]["name"] for t in tools or [] if isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)}


def parse_tool_calls(text: str, names: set[str]) -> list[ToolCall] | None:
    """The calls in the JSON the model wrote after [TOOL_CALLS], or None if it is not a valid call
    list or calls a function not among `names` (the tools given)."""
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
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or item["name"] not in names:
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
        calls.append(ToolCall(call_id if isinstance(call_id, str) and _MISTRAL_ID.fullmatch(call_id) else new_tool_call_id(),
                              item["name"], arguments))
    return calls

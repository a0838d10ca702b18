"""Chat: prompts equal mistral-common's encode_chat_completion (with and
without tools), tool calls are parsed from what the model writes (malformed
JSON comes back as text), follow-up turns re-use the KV cache, and the
interactive command line holds a multi-turn conversation."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest

import mixtral_ext
from mixtral_ext.__main__ import main
from mixtral_ext.chat import parse_tool_calls
from mixtral_ext.synthetic import DEMO_CONFIG, write_random_checkpoint

mistral_common = pytest.importorskip("mistral_common")
from mistral_common.protocol.instruct.messages import (  # noqa: E402
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall  # noqa: E402

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI_TOOLS = [{"type": "function", "function": WEATHER}]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "Abc123xyz", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "Abc123xyz", "name": "get_weather", "content": "22 C, sunny"},
    {"role": "assistant", "content": "It is 22 C and sunny in Paris."},
    {"role": "user", "content": "Und in Köln? 🌧"},
]


def reference_messages():
    """CONVERSATION built with mistral-common's own message classes."""
    call = ToolCall(id="Abc123xyz", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
    return [
        SystemMessage(content="Answer briefly."),
        UserMessage(content="What is the weather in Paris?"),
        AssistantMessage(tool_calls=[call]),
        ToolMessage(tool_call_id="Abc123xyz", name="get_weather", content="22 C, sunny"),
        AssistantMessage(content="It is 22 C and sunny in Paris."),
        UserMessage(content="Und in Köln? 🌧"),
    ]


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    config = replace(DEMO_CONFIG, hidden_size=64, num_layers=2, head_dim=16, intermediate_size=96)
    path = write_random_checkpoint(tmp_path_factory.mktemp("chat_model"), config, seed=9)
    return mixtral_ext.Engine.from_pretrained(path, max_context=512)


@pytest.mark.parametrize("with_tools", [False, True])
def test_chat_prompt_equals_mistral_common(chat_engine, with_tools):
    tools = [Tool(function=Function(**WEATHER))] if with_tools else None
    request = ChatCompletionRequest(messages=reference_messages(), tools=tools)
    expected = chat_engine.tokenizer.mistral.encode_chat_completion(request).tokens
    assert chat_engine.chat_prompt(CONVERSATION, OPENAI_TOOLS if with_tools else None) == expected
    assert (chat_engine.tokenizer.special_id("[AVAILABLE_TOOLS]") in expected) == with_tools


def test_chat_prompt_v1_tokenizer(tiny_dir):
    engine = mixtral_ext.Engine.from_pretrained(tiny_dir, max_context=64)  # vocab 101: no shipped tokenizer
    with pytest.raises(mixtral_ext.ModelLoadError, match="tokenizer"):
        engine.chat([{"role": "user", "content": "hi"}])
    from mixtral_ext.tokenizer import Tokenizer, _shipped_path

    v1 = Tokenizer(_shipped_path("tokenizer.model.v1"))
    messages = [{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Salut"},
                {"role": "user", "content": "Ça va ?"}]
    request = ChatCompletionRequest(messages=[UserMessage(content="Bonjour"), AssistantMessage(content="Salut"),
                                              UserMessage(content="Ça va ?")])
    from mixtral_ext.chat import encode_chat

    assert encode_chat(v1, messages, None) == v1.mistral.encode_chat_completion(request).tokens
    assert v1.special_id("[TOOL_CALLS]") is None
    with pytest.raises(mixtral_ext.ChatFormatError, match="no tool-call format"):
        encode_chat(v1, messages, OPENAI_TOOLS)


def tool_call_tokens(tokenizer, calls):
    """The tokens mistral-common writes for an assistant turn with these calls: [TOOL_CALLS] ... </s>."""
    results = [ToolMessage(tool_call_id=call.id, name=call.function.name, content="ok") for call in calls]
    request = ChatCompletionRequest(messages=[UserMessage(content="x"), AssistantMessage(tool_calls=calls), *results])
    tokens = tokenizer.mistral.encode_chat_completion(request).tokens
    start = tokens.index(tokenizer.special_id("[TOOL_CALLS]"))
    return tokens[start : tokens.index(tokenizer.eos_id, start) + 1]


def test_parse_tool_calls_from_mistral_common_tokens(chat_engine):
    tokenizer = chat_engine.tokenizer
    calls = [ToolCall(id="q1w2e3r4t", function=FunctionCall(name="get_weather", arguments='{"city": "Lyon"}')),
             ToolCall(id="z9x8c7v6b", function=FunctionCall(name="get_time", arguments='{"tz": "CET", "n": [1, 2]}'))]
    tokens = tool_call_tokens(tokenizer, calls)
    assert tokens[-1] == tokenizer.eos_id
    parsed = parse_tool_calls(tokenizer.decode(tokens[1:-1]), {"get_weather", "get_time"})
    assert [(c.id, c.name, c.arguments) for c in parsed] == [
        ("q1w2e3r4t", "get_weather", {"city": "Lyon"}), ("z9x8c7v6b", "get_time", {"tz": "CET", "n": [1, 2]})]
    assert parsed[0].to_openai()["function"]["arguments"] == '{"city": "Lyon"}'


@pytest.mark.parametrize("text", ['[{"name": "f", "argu', "[]", '{"arguments": {}}', '[{"name": "f", "arguments": 3}]',
                                  '[{"name": "", "arguments": {}}]', "[1]", "null", '"f"', "[" * 5000,
                                  '[{"name": "f", "arguments": "{not json"}]', '[{"name": {"x": 1}, "id": "ab"}]'])
def test_malformed_tool_calls_are_not_parsed(text):
    assert parse_tool_calls(text, {"f"}) is None


def test_calls_of_functions_not_given_are_not_parsed():
    text = '[{"name": "get_weather", "arguments": {}}, {"name": "rm_rf", "arguments": {}}]'
    assert parse_tool_calls(text, {"get_weather"}) is None and parse_tool_calls(text, set()) is None
    assert len(parse_tool_calls(text, {"get_weather", "rm_rf"})) == 2


def test_parse_tool_calls_fills_missing_ids_and_string_arguments():
    calls = parse_tool_calls('{"name": "f", "arguments": "{\\"a\\": 1}"}', {"f"})
    assert len(calls) == 1 and calls[0].arguments == {"a": 1}
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()


class Script:
    """The tokens the model is made to write, from the start in every generation."""

    tokens: list[int] = []


@pytest.fixture
def scripted(monkeypatch):
    """Stands in for the engine's sampler: the model runs, the tokens come from the script."""
    script = Script()
    real_new_sampler = mixtral_ext.Engine._new_sampler

    def new_sampler(self, *args):
        script.remaining = iter(script.tokens)
        return real_new_sampler(self, *args)

    def append_sample(self, token_ids, sampler, cancel=None):
        self.append(token_ids)
        return next(script.remaining), 0.0, [], []

    def decode_next(self, token, sampler, queue_ahead, cancel=None):
        return append_sample(self, [token], sampler)

    monkeypatch.setattr(mixtral_ext.Engine, "_new_sampler", new_sampler)
    monkeypatch.setattr(mixtral_ext.Sequence, "_append_sample", append_sample)
    monkeypatch.setattr(mixtral_ext.Sequence, "_decode_next", decode_next)
    return script


def test_chat_returns_tool_calls_and_reuses_the_cache_next_turn(chat_engine, scripted):
    tokenizer = chat_engine.tokenizer
    calls = [ToolCall(id="Abc123xyz", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))]
    scripted.tokens = tool_call_tokens(tokenizer, calls)
    messages = CONVERSATION[:2]
    streamed = list(chat_engine.chat_stream(messages, tools=OPENAI_TOOLS, max_tokens=100))
    assert all(d.text == "" for d in streamed) and streamed[-1].finish_reason == "tool_calls"
    result = chat_engine.chat(messages, tools=OPENAI_TOOLS, max_tokens=100)
    assert result.finish_reason == "tool_calls" and result.message.content is None
    assert [(c.id, c.name, c.arguments) for c in result.message.tool_calls] == [("Abc123xyz", "get_weather", {"city": "Paris"})]
    first_prompt = chat_engine.chat_prompt(messages, OPENAI_TOOLS)
    assert result.usage.prompt_tokens == len(first_prompt) and result.usage.completion_tokens == len(scripted.tokens)

    # The next turn: the tool's answer. Its prompt starts with the first prompt and the calls the model wrote.
    follow = messages + [result.message.to_openai(),
                         {"role": "tool", "tool_call_id": "Abc123xyz", "name": "get_weather", "content": "22 C"}]
    scripted.tokens = tokenizer.encode("Sunny, 22 C.", bos=False) + [tokenizer.eos_id]
    answer = chat_engine.chat(follow, tools=OPENAI_TOOLS, max_tokens=100)
    assert answer.message.content == "Sunny, 22 C." and answer.finish_reason == "stop" and not answer.message.tool_calls
    assert answer.usage.cached_tokens == len(first_prompt) + len(tool_call_tokens(tokenizer, calls)) - 1


def test_openai_tool_call_ids_pass_through(chat_engine, scripted):
    """A history from an OpenAI client ("call_..." ids) is formatted with 9-character ids derived
    from them, the same every time; a call the model writes with such an id comes back with the
    client's own."""
    from mixtral_ext.chat import foreign_call_ids

    history = CONVERSATION[:2] + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "3 C"}]
    mapped = foreign_call_ids(history)["call_1"]
    assert len(mapped) == 9 and mapped.isalnum() and foreign_call_ids(history) == {"call_1": mapped}
    renamed = [dict(m) for m in history]
    renamed[2] = dict(renamed[2], tool_calls=[dict(history[2]["tool_calls"][0], id=mapped)])
    renamed[3] = dict(renamed[3], tool_call_id=mapped)
    assert chat_engine.chat_prompt(history, OPENAI_TOOLS) == chat_engine.chat_prompt(renamed, OPENAI_TOOLS)
    assert history[2]["tool_calls"][0]["id"] == "call_1"  # the caller's messages are left as they were
    calls = [ToolCall(id=mapped, function=FunctionCall(name="get_weather", arguments='{"city": "Bergen"}'))]
    scripted.tokens = tool_call_tokens(chat_engine.tokenizer, calls)
    result = chat_engine.chat(history, tools=OPENAI_TOOLS, max_tokens=100)
    assert [(c.id, c.arguments) for c in result.message.tool_calls] == [("call_1", {"city": "Bergen"})]


def test_tool_calls_are_parsed_only_for_the_tools_given(chat_engine, scripted):
    calls = [ToolCall(id="Abc123xyz", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))]
    scripted.tokens = tool_call_tokens(chat_engine.tokenizer, calls)
    plain = chat_engine.chat(CONVERSATION[:2], max_tokens=100)  # no tools: the output is text
    assert plain.finish_reason == "stop" and not plain.message.tool_calls
    assert plain.message.content.startswith("[TOOL_CALLS]") and "get_weather" in plain.message.content
    other_tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    other = chat_engine.chat(CONVERSATION[:2], tools=other_tools, max_tokens=100)
    assert other.finish_reason == "stop" and not other.message.tool_calls


def test_a_final_assistant_message_is_continued(chat_engine, scripted):
    messages = [{"role": "user", "content": "Name a city."}, {"role": "assistant", "content": "The capital of France is"}]
    request = ChatCompletionRequest.from_openai(messages, continue_final_message=True)
    expected = chat_engine.tokenizer.mistral.encode_chat_completion(request).tokens
    assert chat_engine.chat_prompt(messages) == expected and expected[-1] != chat_engine.tokenizer.eos_id
    scripted.tokens = chat_engine.tokenizer.encode(" Paris.", bos=False) + [chat_engine.tokenizer.eos_id]
    assert chat_engine.chat(messages, max_tokens=20).message.content == " Paris."


def test_malformed_tool_call_comes_back_as_text(chat_engine, scripted):
    tokenizer = chat_engine.tokenizer
    raw = tokenizer.encode(' [{"name": "get_weather", "argu', bos=False)
    scripted.tokens = [tokenizer.special_id("[TOOL_CALLS]")] + raw + [tokenizer.eos_id]
    result = chat_engine.chat(CONVERSATION[:2], tools=OPENAI_TOOLS, max_tokens=100)
    assert result.finish_reason == "stop" and not result.message.tool_calls
    assert result.message.content == "[TOOL_CALLS]" + tokenizer.decode(raw)
    scripted.tokens = [tokenizer.special_id("[TOOL_CALLS]")] + raw  # cut off by max_tokens
    cut = chat_engine.chat(CONVERSATION[:2], tools=OPENAI_TOOLS, max_tokens=len(raw) + 1)
    assert cut.finish_reason == "length" and cut.message.content == "[TOOL_CALLS]" + tokenizer.decode(raw)


def test_chat_with_the_model_streams_and_reuses_the_prompt(chat_engine):
    # (no system message: the v3 format repeats it in the last user turn, so it moves every turn)
    messages = [{"role": "user", "content": "Tell me about Mixtral."}]
    result = chat_engine.chat(messages, max_tokens=12, temperature=0)
    streamed = list(chat_engine.chat_stream(messages, max_tokens=12, temperature=0))
    assert "".join(d.text for d in streamed) == (result.message.content or "")
    assert streamed[-1].finish_reason == result.finish_reason
    follow = messages + [{"role": "assistant", "content": "It is a model."}, {"role": "user", "content": "More?"}]
    again = chat_engine.chat(follow, max_tokens=4, temperature=0)
    assert again.usage.cached_tokens >= len(chat_engine.chat_prompt(messages)) - 1


@pytest.mark.parametrize("messages", [[], "hello", [{"role": "assistant", "content": "first"}],
                                      [{"role": "robot", "content": "x"}], [{"content": "no role"}],
                                      [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], [1, 2]])
def test_bad_messages_raise_chat_format_error(chat_engine, messages):
    with pytest.raises(mixtral_ext.ChatFormatError):
        chat_engine.chat(messages, max_tokens=2)
    assert chat_engine.chat([{"role": "user", "content": "ok"}], max_tokens=2).usage.completion_tokens >= 1


def test_bad_tools_raise_chat_format_error(chat_engine):
    for tools in ({"type": "function"}, [{"type": "function", "function": {"description": "no name"}}], ["x"]):
        with pytest.raises(mixtral_ext.ChatFormatError):
            chat_engine.chat([{"role": "user", "content": "hi"}], tools=tools, max_tokens=2)


def test_async_chat(chat_engine):
    import asyncio

    async def scenario():
        result = await chat_engine.achat([{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)
        parts = [d.text async for d in chat_engine.achat_stream([{"role": "user", "content": "Hi"}],
                                                                 max_tokens=6, temperature=0)]
        return result, parts

    result, parts = asyncio.run(scenario())
    assert "".join(parts) == (result.message.content or "")


def test_chat_command_line(tmp_path, monkeypatch, capsys):
    model = write_random_checkpoint(tmp_path, replace(DEMO_CONFIG, hidden_size=64, num_layers=1, head_dim=16,
                                                      intermediate_size=64), seed=3)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n\n/reset\nBonjour\nAnd again\n"))
    assert main(["chat", "--model", model, "--max-tokens", "5", "--seed", "1", "--system", "Be kind."]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("> ") == 6  # three turns, the empty line, /reset, then end of input
    assert captured.err.count("tokens in") == 3 and "finish:" in captured.err



def test_chat_stream_checks_its_input_before_the_first_delta(chat_engine):
    with pytest.raises(mixtral_ext.ChatFormatError):
        chat_engine.chat_stream([{"role": "robot", "content": "x"}])
    with pytest.raises(mixtral_ext.SettingError, match="top_p"):
        chat_engine.chat_stream([{"role": "user", "content": "x"}], top_p=2.0)

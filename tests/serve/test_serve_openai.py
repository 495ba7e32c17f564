"""The official `openai` client against a live `frugalm` server on 127.0.0.1.

The model is tiny and has memorised one R1-style chat reply ("<think>two plus two</think>4"), so the
tests know what greedy decoding must return, reasoning split included.
"""

from __future__ import annotations

import asyncio

import pytest

from frugalm.serve import EngineConfig, LLMEngine
from serve_helpers import live_server, make_tokenizer, random_model, single_thread, train_chat_reply

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

QUESTION = [{"role": "user", "content": "2+2?"}]
REPLY = "<think>two plus two</think>4"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    tok = make_tokenizer(path)
    prompt_ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    reply_ids = tok.encode(REPLY, add_special_tokens=False) + [tok.eos_id]
    model = train_chat_reply(random_model(2, vocab_size=tok.vocab_size, max_position_embeddings=256),
                             prompt_ids + reply_ids)
    engine = LLMEngine(model, EngineConfig(block_size=8, max_num_seqs=16), tokenizer=tok)
    with single_thread(), live_server(engine, model_name="tiny") as srv:
        yield srv, tok, prompt_ids, reply_ids


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_returns_reasoning_content_and_usage(client, served):
    _, _, prompt_ids, reply_ids = served
    r = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "4"
    assert choice.message.model_extra["reasoning_content"] == "two plus two"
    assert choice.finish_reason == "stop"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(reply_ids)  # the EOS counts, as in vLLM
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_deltas_finish_reason_and_usage_chunk(client):
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert (reasoning, content) == ("two plus two", "4")
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_logprobs(client, served):
    _, tok, prompt_ids, reply_ids = served
    r = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=20, temperature=0, logprobs=2)
    c = r.choices[0]
    assert c.text == REPLY and c.finish_reason == "stop"
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-6)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))  # greedy takes the top token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_n_two_choices(client):
    r = client.chat.completions.create(model="tiny", messages=QUESTION, n=2, temperature=1.0, seed=1, max_tokens=6)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(isinstance(c.message.content, str) and c.finish_reason in ("stop", "length") for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 12  # summed over both choices, prompt counted once
    assert r.usage.prompt_tokens < r.usage.total_tokens


def test_stop_list_is_not_returned(client, served):
    prompt_ids = served[2]
    r = client.completions.create(model="tiny", prompt=prompt_ids, temperature=0, max_tokens=20,
                                  stop=["plus", "never-appears"])
    assert r.choices[0].text == "<think>two " and r.choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(client):
    r = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_completion_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_seed_gives_identical_outputs(client):
    def ask(top_k=None, **kw):
        extra = {"ignore_eos": True, **({"top_k": top_k} if top_k is not None else {})}
        return client.completions.create(model="tiny", prompt="Hello", max_tokens=12, extra_body=extra, **kw)

    assert ask(temperature=0, seed=5).choices[0].text == ask(temperature=0, seed=5).choices[0].text
    a, b = ask(temperature=1.0, seed=9), ask(temperature=1.0, seed=9)
    assert a.choices[0].text == b.choices[0].text
    greedy = ask(temperature=0).choices[0].text
    assert ask(temperature=1.5, top_k=1).choices[0].text == greedy


def test_errors_map_to_client_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=QUESTION, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=QUESTION, n=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=100000)


def test_raw_response_headers(client):
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=QUESTION, temperature=0)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("application/json")
    assert raw.parse().choices[0].message.content == "4"


def test_async_client_concurrent_streams(served):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=served[0].url + "/v1", api_key="x", max_retries=0, timeout=60)

        async def one():
            stream = await aclient.chat.completions.create(model="tiny", messages=QUESTION, temperature=0,
                                                           stream=True)
            text, finish = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            return text, finish

        try:
            return await asyncio.gather(*(one() for _ in range(8)))
        finally:
            await aclient.close()

    assert asyncio.run(main()) == [("4", "stop")] * 8

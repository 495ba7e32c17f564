"""The byte-level BPE: ids, round trips, Hugging Face loading and the chat template in three renderers."""

from __future__ import annotations

import json
import sys

import pytest

from frugalm.data import CHAT_TEMPLATE, ChatTemplateError, DataError, load_tokenizer, render_chat, train_tokenizer
from frugalm.data.chat_template import render_jinja
from frugalm.data.tokenizer import REASONING_TOKENS, SPECIAL_TOKENS

VOCAB = 600

CONVERSATIONS = [
    [],
    [{"role": "user", "content": "What is 12+30?"}],
    [
        {"role": "system", "content": "Answer briefly.\n"},
        {"role": "user", "content": "  2+2?  "},
        {"role": "assistant", "content": "<think>two and two</think><answer>4</answer>"},
        {"role": "user", "content": "And {{ braces }} and {% tags %}?"},
    ],
    [{"role": "assistant", "content": ""}],
]


def _texts():
    from pydoc_data import topics

    return [topics.topics[k] for k in sorted(topics.topics)[:40]]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(_texts(), VOCAB, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_layout_and_special_ids(tok, tok_dir):
    assert {p.name for p in tok_dir.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.vocab_size == VOCAB
    assert [tok.token_to_id(t) for t in REASONING_TOKENS] == list(range(VOCAB - 4, VOCAB))
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["eos_token"] == "<|eos|>"


def test_round_trip_and_digits(tok):
    for text in ["Hello, world!", "  spaces\tand\nnewlines  ", "naïve café 東京 🎉", "x = [1, 2, 3]\n", ""]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.encode(text) == [tok.bos_id] + ids
    digits = tok.encode("2024", add_special_tokens=False)
    assert [tok.decode([i]) for i in digits] == ["2", "0", "2", "4"]
    # The reasoning tags are single ids that survive skip_special_tokens; role tokens do not.
    ids = tok.encode("<|user|><think>a</think>", add_special_tokens=False)
    assert ids[0] == tok.token_to_id("<|user|>") and tok.token_to_id("<think>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think>"


def test_split_special_tokens_reads_markup_as_text(tok):
    text = "literal <|eos|> in a document"
    assert tok.eos_id in tok.encode(text)
    plain = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert tok.eos_id not in plain and tok.decode(plain) == text
    batch = tok.encode_batch([text, "b"], add_special_tokens=False, split_special_tokens=True)
    assert batch[0] == plain


def test_training_is_deterministic(tok, tmp_path):
    again = train_tokenizer(_texts(), VOCAB, tmp_path)
    assert again.sha256 == tok.sha256


def test_transformers_autotokenizer_agrees(tok, tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == tok.vocab_size
    for text in ["Hello <think>12</think> world", "naïve café", "a <|eos|> b"]:
        assert hf(text)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    for messages in CONVERSATIONS[1:]:  # transformers refuses an empty conversation
        for gen in (False, True):
            text = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert text == tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            ids = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert list(ids) == tok.apply_chat_template(messages, add_generation_prompt=gen)


def test_python_and_jinja_renderers_agree():
    for messages in CONVERSATIONS:
        for gen in (False, True):
            kw = dict(bos_token="<|bos|>", eos_token="<|eos|>", add_generation_prompt=gen)
            assert render_chat(messages, **kw) == render_jinja(CHAT_TEMPLATE, messages, **kw)
    expected = "<|bos|><|system|>S<|eos|><|user|>U<|eos|><|assistant|>A<|eos|><|assistant|>"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert render_chat(messages, bos_token="<|bos|>", eos_token="<|eos|>", add_generation_prompt=True) == expected
    for bad in ([{"role": "tool", "content": "x"}], [{"role": "user", "content": None}], [{"role": "user"}]):
        with pytest.raises(ChatTemplateError):
            render_chat(bad, bos_token="<|bos|>", eos_token="<|eos|>")
        with pytest.raises(ChatTemplateError):
            render_jinja(CHAT_TEMPLATE, bad, bos_token="<|bos|>", eos_token="<|eos|>")


def test_chat_template_without_jinja2(tok, monkeypatch):
    with_jinja = tok.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True)
    monkeypatch.setitem(sys.modules, "jinja2", None)
    assert tok.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True) == with_jinja
    tok_custom = load_tokenizer(tok.path)
    tok_custom.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ChatTemplateError, match="needs jinja2"):
        tok_custom.apply_chat_template(CONVERSATIONS[1])


def test_chat_template_file_wins_like_transformers(tok_dir, tmp_path):
    for f in tok_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_tokenizer(tmp_path).apply_chat_template(CONVERSATIONS[1], tokenize=False) == "<|bos|>[What is 12+30?]"


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(DataError, match="cannot read"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["abc"], 280, tmp_path / "small")

"""`frugalm serve --model DIR` as a user runs it: a subprocess on a free local port answers the openai client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from serve_helpers import make_tokenizer, random_model

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_frugalm_serve_command_answers_the_openai_client(tmp_path):
    tok = make_tokenizer(tmp_path)
    random_model(1, vocab_size=tok.vocab_size).save_pretrained(tmp_path)
    port = free_port()
    env = {**os.environ, "FRUGALM_API_KEY": "k1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "frugalm", "serve", "--model", str(tmp_path), "--port", str(port), "--threads", "1",
         "--served-model-name", "tiny", "--speculative", "mtp", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not start: {proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=5, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

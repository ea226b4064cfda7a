"""Serving: the engine check, the streaming client against a fake server, and llama.cpp serving our own export."""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from labkit import LabkitError
from labkit.serve import (INSTALL, AdapterEngine, Server, chat, chat_many, check_engine, engine_missing, free_port,
                          summarize)

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeOpenAI(BaseHTTPRequestHandler):
    """Streams 'Hello', ' world' as OpenAI chat-completion chunks, then stops; remembers the last request body."""

    last_body: dict = {}

    def do_POST(self):
        FakeOpenAI.last_body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece, finish in [("Hello", None), (" world", None), (None, "stop")]:
            delta = {"content": piece} if piece else {}
            chunk = {"choices": [{"delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_chat_streams_the_reply_and_times_it(fake_url):
    reply = chat(fake_url, [{"role": "user", "content": "hi"}], max_tokens=5)
    assert reply.text == "Hello world" and reply.tokens == 3  # two text chunks + the end-of-turn token
    assert 0 < reply.ttft <= reply.seconds


def test_chat_asks_for_greedy_decoding_without_a_repeat_penalty(fake_url):
    chat(fake_url, [{"role": "user", "content": "hi"}])
    body = FakeOpenAI.last_body
    assert body["temperature"] == 0.0 and body["repeat_penalty"] == 1.0 and body["stream"] is True


def test_chat_sends_a_response_format_only_when_given_one(fake_url):
    chat(fake_url, [{"role": "user", "content": "hi"}])
    assert "response_format" not in FakeOpenAI.last_body
    schema_format = {"type": "json_object", "schema": {"type": "object"}}
    chat_many(fake_url, [[{"role": "user", "content": "hi"}]], response_format=schema_format)
    assert FakeOpenAI.last_body["response_format"] == schema_format


def test_chat_many_keeps_the_order_of_the_requests(fake_url):
    replies, wall = chat_many(fake_url, [[{"role": "user", "content": str(i)}] for i in range(4)], concurrency=4)
    assert [r.text for r in replies] == ["Hello world"] * 4 and wall > 0
    stats = summarize(replies, wall)
    assert stats["throughput_tok_s"] == pytest.approx(12 / wall)


def test_free_port_can_be_bound():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_a_missing_engine_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp.server", None)  # import fails as if not installed
    assert INSTALL in engine_missing()
    monkeypatch.delenv("LABKIT_REQUIRE_ENGINE", raising=False)
    assert check_engine() is False


def test_a_missing_engine_is_an_error_when_required(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp.server", None)
    monkeypatch.setenv("LABKIT_REQUIRE_ENGINE", "1")
    with pytest.raises(LabkitError, match="LABKIT_REQUIRE_ENGINE"):
        check_engine()


def test_a_server_for_a_missing_file_is_refused(tmp_path):
    with pytest.raises(LabkitError, match="no such GGUF"):
        Server(tmp_path / "missing.gguf").__enter__()


@pytest.fixture(scope="module")
def engine():
    """Skip when llama.cpp is not installed, unless LABKIT_REQUIRE_ENGINE=1 (CI), where that fails the test."""
    if not check_engine():
        pytest.skip(engine_missing())


def test_llama_cpp_serves_our_f32_export_with_the_same_greedy_reply(engine, tokenizer, tiny_llama, tmp_path):
    import torch

    from labkit.evaluate import generate
    from labkit.export import export_gguf

    model = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=100000.0,
                       max_position_embeddings=512)
    path = export_gguf(model, tokenizer, tmp_path / "tiny-F32.gguf", "F32")
    messages = [{"role": "system", "content": "Triage."}, {"role": "user", "content": "My router is broken."}]
    expected = generate(model, tokenizer, [messages], max_new_tokens=8, progress=False)[0]
    with Server(path, threads=1) as server:
        served = chat(server.url, messages, max_tokens=8)
        assert server.rss() > 0
    assert server.process.poll() is not None  # stopped on exit
    assert served.text == expected and torch.is_tensor(model.lm_head.weight)


def test_llama_cpp_with_the_triage_schema_answers_valid_triage_json_even_untrained(engine, tokenizer, tiny_llama,
                                                                                    tmp_path):
    from labkit.constrain import triage_json_schema
    from labkit.export import export_gguf
    from labkit.tickets import follows_schema, parse_triage

    model = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=100000.0,
                       max_position_embeddings=512)  # random weights: only the schema can make its reply valid
    path = export_gguf(model, tokenizer, tmp_path / "tiny-F32.gguf", "F32")
    messages = [{"role": "system", "content": "Triage."}, {"role": "user", "content": "My router is broken."}]
    with Server(path, threads=1) as server:
        reply = chat(server.url, messages, max_tokens=200,
                     response_format={"type": "json_object", "schema": triage_json_schema()})
    assert follows_schema(parse_triage(reply.text)), reply.text


def test_llama_cpp_applies_our_lora_exports_per_request_as_peft_does(engine, tokenizer, tiny_llama, tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model

    from labkit.deploy import select
    from labkit.evaluate import generate
    from labkit.export import export_gguf, export_lora_gguf
    from labkit.lora import randomize_adapters

    base = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=100000.0,
                      max_position_embeddings=512)
    base_path = export_gguf(base, tokenizer, tmp_path / "base-F32.gguf", "F32")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                           adapter_name="one")
    model.add_adapter("two", LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]))
    randomize_adapters(model, seed=1, std=0.3)  # large enough to change a random model's greedy reply
    files = {name: export_lora_gguf(model, name, tmp_path / f"{name}.gguf") for name in ["one", "two"]}
    messages = [{"role": "system", "content": "Triage."}, {"role": "user", "content": "My router is broken."}]
    routes = [["one"], ["two"], ["one", "two"], ["one"]]
    expected = []
    for names in routes:
        select(model, names)
        expected.append(generate(model, tokenizer, [messages], max_new_tokens=8, progress=False)[0])
    with AdapterEngine(base_path, files) as served:
        replies = []
        for names in routes:
            assert served.select(names) >= 0
            replies.append(served.chat(messages, max_tokens=8))
    assert replies == expected and len(set(expected)) > 1  # the adapters change the reply, and the switch works


def test_an_adapter_engine_refuses_an_adapter_it_did_not_load(engine, tokenizer, tiny_llama, tmp_path):
    from labkit.export import export_gguf

    base = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=True, rope_theta=100000.0,
                      max_position_embeddings=512)
    with AdapterEngine(export_gguf(base, tokenizer, tmp_path / "base-F32.gguf", "F32"), {}) as served:
        with pytest.raises(LabkitError, match="not loaded"):
            served.select(["triage"])

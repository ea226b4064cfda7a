"""Serve a GGUF file on a real inference engine (llama.cpp's OpenAI-compatible server) and measure it over HTTP."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from labkit import LabkitError
from labkit.course.colab import install_on_colab

ENGINE = "llama-cpp-python[server]==0.3.36"
INSTALL = f'pip install "{ENGINE}"   (builds llama.cpp from source: needs cmake and a C++ compiler, ~10 min once)'


def engine_missing() -> str | None:
    """None when llama.cpp's server can be imported here, else a one-line message saying what to install."""
    try:
        import llama_cpp.server  # noqa: F401
        import requests  # noqa: F401
    except ImportError as e:
        return f"the serving engine is not installed ({e.name} missing). Fix: {INSTALL}"
    return None


def engine_required() -> bool:
    """Whether this run must have the engine (LABKIT_REQUIRE_ENGINE=1, as CI sets): then skipping is an error."""
    return os.environ.get("LABKIT_REQUIRE_ENGINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_engine() -> bool:
    """True if the engine is here; False (after printing what to install) if not; raises when it is required."""
    missing = engine_missing()
    if missing and install_on_colab(ENGINE, "the serving engine"):
        missing = engine_missing()
    if missing and engine_required():
        raise LabkitError(missing + " (LABKIT_REQUIRE_ENGINE=1 is set, so the serving cells may not skip)")
    if missing:
        print("SKIPPING the serving cells:", missing)
    return missing is None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """llama.cpp's OpenAI-compatible server on 127.0.0.1, as a context manager: started on enter, stopped on exit."""

    def __init__(self, gguf: str | Path, threads: int = 1, n_ctx: int = 2048, n_batch: int = 512,
                 startup_timeout: float = 120.0) -> None:
        self.gguf, self.threads, self.n_ctx, self.n_batch = Path(gguf), threads, n_ctx, n_batch
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = Path(f"/tmp/labkit-llama-server-{self.port}.log")
        self.startup_s = 0.0

    def command(self) -> list[str]:
        """The command line that starts the server (what you would type in a terminal)."""
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--host", "127.0.0.1",
                "--port", str(self.port), "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
                "--n_ctx", str(self.n_ctx), "--n_batch", str(self.n_batch), "--n_ubatch", str(self.n_batch),
                # by default a new request cancels the one in progress; a server must queue them instead
                "--interrupt_requests", "False"]

    def __enter__(self) -> "Server":
        import requests

        if not self.gguf.is_file():
            raise LabkitError(f"{self.gguf}: no such GGUF file. Fix: export it first (labkit.export.cached_gguf)")
        start = time.perf_counter()
        self.process = subprocess.Popen(self.command(), stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        while time.perf_counter() - start < self.startup_timeout:
            if self.process.poll() is not None:
                self.stop()
                raise LabkitError(f"the llama.cpp server exited at start (code {self.process.returncode}); its "
                                  f"output is in {self.log}. Fix: read the last lines there")
            try:
                if requests.get(self.url + "/v1/models", timeout=1).ok:
                    self.startup_s = time.perf_counter() - start
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        self.stop()
        raise LabkitError(f"the llama.cpp server did not answer within {self.startup_timeout:.0f} s; log: {self.log}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate the server process (kill it if it does not stop within 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def rss(self) -> int:
        """Resident memory of the server process in bytes (Linux /proc, else psutil)."""
        try:
            with open(f"/proc/{self.process.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import psutil

            return psutil.Process(self.process.pid).memory_info().rss


@dataclass
class Reply:
    """One served chat completion and its timing."""

    text: str
    tokens: int  # generated tokens (streamed chunks with text, plus the end-of-turn token when it stopped there)
    ttft: float  # seconds from sending the request to the first generated text
    seconds: float  # seconds from sending the request to the last byte

    @property
    def decode_tokens_per_s(self) -> float:
        """Generation speed after the first token (the prompt's processing is in ttft)."""
        return (self.tokens - 1) / max(self.seconds - self.ttft, 1e-9)


def chat(url: str, messages: list[dict], max_tokens: int = 48, timeout: float = 300.0,
         response_format: dict | None = None) -> Reply:
    """One greedy chat completion from an OpenAI-compatible server, streamed so the first token can be timed.

    `response_format` is passed on as the API defines it, e.g. {"type": "json_object", "schema": {...}}: the
    server then decodes only replies the schema allows (llama.cpp compiles it into a grammar).
    """
    import requests

    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "top_k": 1, "stream": True,
            "repeat_penalty": 1.0}  # llama-cpp-python's server defaults to a 1.1 repeat penalty: turn it off (greedy)
    if response_format is not None:
        body["response_format"] = response_format
    start = time.perf_counter()
    ttft, pieces, finish = None, [], None
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=timeout) as response:
        if not response.ok:
            raise LabkitError(f"{url} answered HTTP {response.status_code}: {response.text[:200]}")
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text = choice.get("delta", {}).get("content")
            if text:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                pieces.append(text)
            finish = choice.get("finish_reason") or finish
    seconds = time.perf_counter() - start
    tokens = len(pieces) + (finish == "stop")
    return Reply("".join(pieces).strip(), tokens, ttft if ttft is not None else seconds, seconds)


def chat_many(url: str, conversations: list[list[dict]], max_tokens: int = 48, concurrency: int = 1,
              response_format: dict | None = None) -> tuple[list[Reply], float]:
    """Replies to many chats, `concurrency` requests in flight at a time, and the wall-clock seconds for all."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(lambda c: chat(url, c, max_tokens, response_format=response_format), conversations))
    return replies, time.perf_counter() - start


def summarize(replies: list[Reply], wall_s: float) -> dict[str, float]:
    """Median TTFT, mean per-request decode speed, and aggregate throughput (all generated tokens / wall time)."""
    import statistics

    return {"ttft_s": statistics.median(r.ttft for r in replies),
            "decode_tok_s": statistics.mean(r.decode_tokens_per_s for r in replies),
            "throughput_tok_s": sum(r.tokens for r in replies) / wall_s,
            "requests_per_s": len(replies) / wall_s}


class AdapterEngine:
    """One llama.cpp base model loaded in this process with several LoRA adapter files, chosen per request.

    llama-cpp-python's HTTP server applies one adapter, fixed when it starts (`--lora_path`); llama.cpp's library
    can swap adapters on a loaded model between requests, which is what this class does (the C++ `llama-server`
    exposes the same per request). A context manager: the model and adapters are freed on exit.
    """

    def __init__(self, base: str | Path, adapters: dict[str, str | Path], threads: int = 1, n_ctx: int = 2048,
                 n_batch: int = 512) -> None:
        from llama_cpp import Llama, llama_cpp

        self._lib = llama_cpp
        self.llm = Llama(model_path=str(base), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=n_batch, n_ubatch=n_batch, verbose=False)
        self.adapters = {}
        for name, path in adapters.items():
            log = io.StringIO()  # llama.cpp notes per layer where the adapter's tensors live: kept for an error only
            with contextlib.redirect_stderr(log):
                handle = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(path).encode("utf-8"))
            if not handle:
                self.close()
                raise LabkitError(f"llama.cpp could not load the adapter {name!r} from {path}: "
                                  f"{log.getvalue().strip()[-300:]}. Fix: write it with labkit.export.export_lora_gguf "
                                  "from an adapter trained on this base model")
            self.adapters[name] = handle
        self.active: tuple[str, ...] = ()

    def __enter__(self) -> "AdapterEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def select(self, names: list[str] | tuple[str, ...]) -> float:
        """Activate these adapters (all at scale 1; none = the plain base) and return the seconds the switch took."""
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise LabkitError(f"adapter {unknown[0]!r} is not loaded (loaded: {sorted(self.adapters)})")
        import ctypes

        start = time.perf_counter()
        handles = (self._lib.llama_adapter_lora_p_ctypes * len(names))(*(self.adapters[n] for n in names))
        scales = (ctypes.c_float * len(names))(*[1.0] * len(names))
        if self._lib.llama_set_adapters_lora(self.llm._ctx.ctx, handles, len(names), scales):
            raise LabkitError(f"llama.cpp refused the adapters {list(names)}")
        self.llm.reset()  # the cached prompt was computed with the other adapters: never reuse it
        self.active = tuple(names)
        return time.perf_counter() - start

    def chat(self, messages: list[dict], max_tokens: int = 48) -> str:
        """One greedy chat reply with the active adapters (no repeat penalty, as `chat` asks of the server)."""
        out = self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                              repeat_penalty=1.0)
        return (out["choices"][0]["message"]["content"] or "").strip()

    def close(self) -> None:
        """Free the adapters, then the model."""
        for handle in self.adapters.values():
            self._lib.llama_adapter_lora_free(handle)
        self.adapters = {}
        self.llm.close()

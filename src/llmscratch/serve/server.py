"""Process start-up: `serve()` behind `llmscratch serve`, and `BackgroundServer` for
notebooks, tests and benchmarks."""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from ..decoding.batching import PREFILL_CHUNK
from .app import create_app
from .engine import load_engine

log = logging.getLogger("llmscratch.serve")

API_KEY_ENV = "LLMSCRATCH_API_KEY"
"""Environment variable read for the API key when `--api-key` is not given."""


class BackgroundServer:
    """Run an app with uvicorn in a background thread: for notebooks, tests and benchmarks.

    Example:
        >>> with BackgroundServer(create_app(engine)) as srv:   # a free port on 127.0.0.1
        ...     openai.OpenAI(base_url=srv.url + "/v1", api_key="-").models.list()
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        # Bind here (port 0: the OS picks a free one) so the port is known before starting.
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="llmscratch-serve", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, max_concurrency: int = 4,
          max_tokens_limit: int = 1024, api_key: str | None = None, template: str | None = None,
          model_name: str | None = None, device=None, dtype=None, threads: int | None = None,
          log_level: str = "info", kernels: bool = True, max_batch_size: int = 32,
          max_queue: int = 256, prefill_chunk: int = PREFILL_CHUNK, context_shift: bool = False) -> None:
    """Serve `model` over HTTP until interrupted (Ctrl-C).

    Args:
        model: run folder, Hugging Face GPT-2 folder or preset name.
        host / port: where to listen (127.0.0.1 by default: only this machine).
        max_concurrency: with `max_batch_size=1`, generations at once (one thread each);
            more requests wait in a fair queue.
        max_tokens_limit: largest `max_tokens` a request may ask for.
        api_key: require `Authorization: Bearer <api_key>` (default: $LLMSCRATCH_API_KEY).
        template: chat template override (`alpaca`, `phi3`, `plain`).
        model_name: the id clients use (default: the folder's name).
        device / dtype: where and in which precision to run the model.
        threads: PyTorch CPU threads (default: every core for the one batching thread;
            unbatched, the cores divided among the concurrent generations, at least 1).
        kernels: apply the speed kernels (`llmscratch.kernels`); False serves the reference model.
        max_batch_size: requests decoded together by continuous batching (1: off).
        max_queue: requests that may wait for a slot; one more is answered 429.
        prefill_chunk: with batching, a longer prompt is prefilled this many tokens per
            decode step, so running requests keep streaming while it is read (0: one pass).
        context_shift: past the context window, drop its oldest half once and decode cached
            (faster; changes the tokens past the window; `decoding.engine`).
    """
    import uvicorn

    api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    engine = load_engine(model, device, dtype, template, model_name, max_concurrency, max_tokens_limit,
                         kernels=kernels, max_batch_size=max_batch_size, max_queue=max_queue,
                         prefill_chunk=prefill_chunk, context_shift=context_shift)
    if engine.device.type == "cpu" and not engine.batched:
        # Concurrent generations already keep the cores busy; on top of that, each one's
        # intra-op thread team would oversubscribe them, and a team waiting at a barrier for
        # a descheduled thread is slow: batch-1 decoding of a tiny model measured 3 ms/token
        # with 1 thread and 15-75 ms/token with 2 on a busy 2-core machine.
        torch.set_num_threads(threads or max(1, torch.get_num_threads() // max_concurrency))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use the model", host)
    if engine.device.type == "cpu" and engine.batched and threads:
        torch.set_num_threads(threads)  # batching: one decoding thread, every core by default
    if getattr(engine, "note", None):
        print(f"note: {engine.note}", flush=True)
    print(f"serving {engine.model_id} ({engine.template} chat template) on http://{host}:{port}/ "
          f"- chat page at /, OpenAI API at /v1" + (" (API key required)" if api_key else ""), flush=True)
    # timeout_graceful_shutdown: on Ctrl-C, give open streams a moment, then cut them
    # (otherwise a long generation would hold the shutdown until it finished)
    uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=3)

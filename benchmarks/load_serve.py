"""Load test for `llmscratch serve`: unbatched against continuously batched, 1 to 32 clients.

For each `--max-batch-size` (default: 1, today's one-request-per-thread engine, and 32, the
default batching) the server is started as its own process (so the clients do not share
its interpreter) on a free port of 127.0.0.1, serving a randomly initialised model of the
`--model` preset's shape (default gpt2-124m; a run folder works too). Then, for each
`--clients` count, that many concurrent clients send requests (completions and chat, half
of them streamed; `max(--min-requests, clients x --requests-per-client)` in all) and the
script records completed and failed requests, output tokens/s over the run, p50/p95
latency and p50/p95 time to the first streamed text. One warm-up request precedes each
server's measurements. Everything goes to one JSON (`benchmarks/results/load_serve.json`
through `results.write_result`) and one plot (`benchmarks/load_serve.png`): throughput and
latency against clients, one line per batch size. Exits 1 if any request failed.

    python benchmarks/load_serve.py                                   # the figures (several minutes)
    python benchmarks/load_serve.py --model tiny --clients 1 4 --min-requests 4 \\
        --max-tokens 8 --out /tmp/load.json --plot /tmp/load.png     # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_result  # noqa: E402  (benchmarks/results.py)


@dataclass
class Result:
    ok: bool
    kind: str
    latency_s: float
    first_text_s: float | None = None  # streamed requests only
    completion_tokens: int = 0
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def one_request(http: httpx.AsyncClient, i: int, model: str, max_tokens: int) -> Result:
    """Request i: alternates completion/chat and streamed/whole, with a distinct prompt."""
    chat, stream = (i // 2) % 2 == 1, i % 2 == 1
    kind = ("chat" if chat else "completion") + ("/stream" if stream else "")
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0.8, "top_k": 40, "seed": i}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Tell me fact number {i} about the sea."}]
    else:
        body["prompt"] = f"Fact number {i}: the sea"
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    url = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await http.post(url, json=body)
            if r.status_code != 200:
                return Result(False, kind, time.perf_counter() - t0, error=f"{r.status_code} {r.text[:200]}")
            return Result(True, kind, time.perf_counter() - t0, completion_tokens=r.json()["usage"]["completion_tokens"])
        first = None
        tokens = None
        done = False
        async with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(False, kind, time.perf_counter() - t0, error=f"{r.status_code} {r.text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(False, kind, time.perf_counter() - t0, error=chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk["choices"]:
                    if first is None and (c.get("text") or (c.get("delta") or {}).get("content")):
                        first = time.perf_counter() - t0
        if not done or tokens is None:
            return Result(False, kind, time.perf_counter() - t0, error="stream ended without usage or [DONE]")
        return Result(True, kind, time.perf_counter() - t0, first, tokens)
    except Exception as e:  # a dropped connection or timeout counts as a failure, not a crash
        return Result(False, kind, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")


async def run_load(base_url: str, model: str, clients: int, requests: int, max_tokens: int,
                   api_key: str | None) -> tuple[list[Result], float]:
    """`clients` workers take request numbers from a shared counter until `requests` are done."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    results: list[Result] = []
    counter = iter(range(requests))
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=600) as http:

        async def client() -> None:
            for i in counter:  # shared iterator: each request number is taken once
                results.append(await one_request(http, i, model, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return results, time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch_size: int, args, key: str) -> tuple[subprocess.Popen, str]:
    """`llmscratch serve` in its own process; returns it and its URL once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmscratch", "serve", "--model", model, "--port", str(port),
           "--max-batch-size", str(max_batch_size), "--max-concurrency", str(args.max_concurrency),
           "--device", args.device, "--model-name", "load", "--max-tokens-limit", str(max(args.max_tokens, 1)),
           "--max-queue", "10000"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, LLMSCRATCH_API_KEY=key)  # exercise the auth path too
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()}")
        try:
            if httpx.get(base + "/health", headers={"Authorization": f"Bearer {key}"}).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    lat = [r.latency_s for r in ok]
    ttft = [r.first_text_s for r in ok if r.first_text_s is not None]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok), "wall_s": wall,
        "output_tokens": tokens, "output_tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
        "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for bs in sorted({r["max_batch_size"] for r in rows}):
        mine = sorted((r for r in rows if r["max_batch_size"] == bs), key=lambda r: r["clients"])
        xs = [r["clients"] for r in mine]
        label = "max-batch-size 1 (unbatched)" if bs == 1 else f"max-batch-size {bs}"
        axes[0].plot(xs, [r["output_tokens_per_s"] for r in mine], "o-", label=label)
        axes[1].plot(xs, [r["latency_p95_s"] for r in mine], "o-", label=label)
        axes[2].plot(xs, [r["ttft_p95_s"] for r in mine], "o-", label=label)
    clients = sorted({r["clients"] for r in rows})
    for ax, title in zip(axes, ("output tokens/s", "p95 latency (s)", "p95 time to first token (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-124m",
                   help="preset (random weights of that shape) or run folder (default: gpt2-124m)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="client counts (default: 1 8 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32],
                   help="the server's --max-batch-size values to compare (default: 1 32)")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests per client (default: 2)")
    p.add_argument("--min-requests", type=int, default=8, help="fewest requests per client count (default: 8)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default: 32)")
    p.add_argument("--max-concurrency", type=int, default=4,
                   help="the server's --max-concurrency, used at --max-batch-size 1 (default: 4)")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/load_serve.json)")
    p.add_argument("--plot", default=str(Path(__file__).resolve().parent / "load_serve.png"),
                   help="plot file (default: benchmarks/load_serve.png)")
    args = p.parse_args()

    key = "load-test-key"
    rows = []
    for bs in args.batch_sizes:
        server, base = start_server(args.model, bs, args, key)
        try:
            asyncio.run(run_load(base, "load", 1, 1, args.max_tokens, key))  # warm-up
            for clients in args.clients:
                n = max(args.min_requests, clients * args.requests_per_client)
                results, wall = asyncio.run(run_load(base, "load", clients, n, args.max_tokens, key))
                health = httpx.get(base + "/health", headers={"Authorization": f"Bearer {key}"}).json()
                row = {"max_batch_size": bs, "clients": clients, **summarize(results, wall),
                       "server_alive_after": server.poll() is None,
                       "server_idle_after": health["active"] == 0 and health["queued"] == 0}
                rows.append(row)
                print(f"max-batch-size {bs:3d}  clients {clients:3d}: {row['completed']}/{row['requests']} ok, "
                      f"{row['output_tokens_per_s']:7.1f} tok/s, latency p50 {row['latency_p50_s']:.2f} "
                      f"p95 {row['latency_p95_s']:.2f} s, TTFT p50 {row['ttft_p50_s']:.2f} "
                      f"p95 {row['ttft_p95_s']:.2f} s", flush=True)
                for err in row["errors"]:
                    print(f"  failed: {err}", file=sys.stderr)
        finally:
            server.terminate()
            server.wait(timeout=30)

    base_rows = {r["clients"]: r for r in rows if r["max_batch_size"] == 1}
    for r in rows:  # against the unbatched server at the same client count
        b = base_rows.get(r["clients"])
        if b and r["max_batch_size"] != 1:
            r["throughput_vs_unbatched"] = r["output_tokens_per_s"] / b["output_tokens_per_s"]
            r["ttft_p95_vs_unbatched"] = r["ttft_p95_s"] / b["ttft_p95_s"]
            print(f"max-batch-size {r['max_batch_size']} at {r['clients']} clients: "
                  f"{r['throughput_vs_unbatched']:.2f}x the unbatched output tokens/s, "
                  f"p95 TTFT {r['ttft_p95_vs_unbatched']:.2f}x")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    written = write_result("load_serve", {"settings": settings, "rows": rows}, args.out)
    plot(rows, args.plot)
    print(f"wrote {written} and {args.plot}")
    failed = any(r["failed"] or not r["server_alive_after"] or not r["server_idle_after"] for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

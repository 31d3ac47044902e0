"""Load test for `llmscratch serve`: many concurrent clients, a bounded number of requests.

Starts the server as its own process (so the clients do not share its interpreter) on a
free port of 127.0.0.1, serving a tiny random model unless --model is given, then sends
--requests requests from --clients concurrent clients: completions and chat, half of them
streamed. Prints the success count, latency percentiles (whole request, and time to the
first streamed text), and tokens/s over the run. Exits 1 if any request failed.

    python benchmarks/load_serve.py                                  # 32 clients, 256 requests
    python benchmarks/load_serve.py --clients 64 --requests 512 --max-concurrency 8
    python benchmarks/load_serve.py --model runs/pretrain --max-tokens 64 --json load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx


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
    chat, stream = i % 2 == 1, (i // 2) % 2 == 1
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


def tiny_model(folder: Path) -> Path:
    import torch

    from llmscratch import GPT, GPTConfig, get_tokenizer
    from llmscratch.checkpoint import save_model

    torch.manual_seed(0)
    save_model(GPT(GPTConfig.from_name("tiny")), folder, get_tokenizer("gpt2"))
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model to serve (default: a tiny random GPT)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default: 32)")
    p.add_argument("--requests", type=int, default=256, help="requests in all (default: 256)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default: 32)")
    p.add_argument("--max-concurrency", type=int, default=4, help="the server's --max-concurrency (default: 4)")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "tiny"))
        port = free_port()
        key = "load-test-key"  # exercise the auth path too
        cmd = [sys.executable, "-m", "llmscratch", "serve", "--model", model, "--port", str(port),
               "--max-concurrency", str(args.max_concurrency), "--device", args.device,
               "--model-name", "load", "--max-tokens-limit", str(max(args.max_tokens, 1))]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = dict(os.environ, LLMSCRATCH_API_KEY=key)
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    print(server.stderr.read(), file=sys.stderr)
                    return 1
                try:
                    if httpx.get(base + "/health", headers={"Authorization": f"Bearer {key}"}).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    print("server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            results, wall = asyncio.run(run_load(base, "load", args.clients, args.requests, args.max_tokens, key))
            health = httpx.get(base + "/health", headers={"Authorization": f"Bearer {key}"}).json()
            alive = server.poll() is None
        finally:
            server.terminate()
            server.wait(timeout=30)

    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    lat = [r.latency_s for r in ok]
    ttft = [r.first_text_s for r in ok if r.first_text_s is not None]
    tokens = sum(r.completion_tokens for r in ok)
    summary = {
        "clients": args.clients, "requests": len(results), "succeeded": len(ok), "failed": len(failed),
        "max_concurrency": args.max_concurrency, "max_tokens": args.max_tokens, "wall_s": wall,
        "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
        "latency_max_s": max(lat, default=float("nan")),
        "first_text_p50_s": percentile(ttft, 50), "first_text_p95_s": percentile(ttft, 95),
        "completion_tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
        "server_alive_after": alive, "server_idle_after": health["active"] == 0 and health["queued"] == 0,
    }
    print(f"load: {args.clients} clients, {len(results)} requests (completion/chat, half streamed), "
          f"max_tokens {args.max_tokens}, server max-concurrency {args.max_concurrency}, model {args.model or 'tiny'}")
    print(f"succeeded    {len(ok)}/{len(results)}" + (f"   FAILED {len(failed)}" if failed else ""))
    print(f"latency      p50 {summary['latency_p50_s']:.2f} s   p95 {summary['latency_p95_s']:.2f} s   "
          f"max {summary['latency_max_s']:.2f} s")
    print(f"first text   p50 {summary['first_text_p50_s']:.2f} s   p95 {summary['first_text_p95_s']:.2f} s (streamed)")
    print(f"throughput   {summary['tokens_per_s']:.0f} tokens/s, {summary['requests_per_s']:.1f} requests/s "
          f"({tokens} tokens in {wall:.1f} s)")
    print(f"server       alive afterwards: {alive}; idle afterwards: {summary['server_idle_after']}")
    for r in failed[:5]:
        print(f"  failed {r.kind}: {r.error}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "results": [asdict(r) for r in results]}, f, indent=2)
    return 0 if not failed and alive else 1


if __name__ == "__main__":
    sys.exit(main())

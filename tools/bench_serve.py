"""Serving throughput: `minillama serve` under 1..N concurrent streaming clients.

Starts the server in its own process (as users run it), then for each client count runs that
many clients at once, each sending `--requests` streaming chat requests in a row (different
prompts, `--new-tokens` new tokens each, EOS ignored so every request decodes the same amount).
Reports aggregate tokens/s, its ratio to one client's, time to first token (p50/p95) and request
latency, and the decode roofline: a decode step reads every weight once for all rows, so with B
rows running the memory-bound ceiling is B x bandwidth / weight bytes.

    python tools/bench_serve.py                       # embedded SmolLM2, 1/2/4/8 clients
    python tools/bench_serve.py --clients 1,8,16 --max-batch 16 --json serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import read_bandwidth  # noqa: E402

import minillama  # noqa: E402
from minillama.hub import model_path  # noqa: E402
from minillama.quant import weight_bytes  # noqa: E402

TOPICS = ["the sea", "a mountain", "bread", "trains", "a library", "winter", "bees", "the moon", "a violin",
          "rivers", "chess", "a lighthouse", "coffee", "maps", "clocks", "gardens"]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`minillama serve --port 0` (the server binds a free port and names it); (process, base URL)."""
    cmd = [sys.executable, "-m", "minillama.cli", "serve", "--port", "0", "--max-batch", str(args.max_batch),
           "--max-queue", "1024", "--log-level", "warning"]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    cmd += ["--device", args.device] if args.device else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    startup = []
    while line := proc.stderr.readline():  # the model loads, then the server names its address
        startup.append(line)
        if found := re.search(r" on (http://\S+:[1-9]\d*)/v1 ", line):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            url = found.group(1)
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        return proc, url
                except httpx.HTTPError:
                    time.sleep(0.25)
            proc.kill()
            sys.exit(f"server at {url} did not answer /health in 2 minutes")
    proc.wait()
    sys.exit(f"server exited:\n{''.join(startup)[-3000:]}")


def one_request(http: httpx.Client, url: str, topic: str, new_tokens: int) -> dict[str, float]:
    """Send one streaming chat request; (seconds to first content, seconds in all, tokens)."""
    body = {"messages": [{"role": "user", "content": f"Write a short poem about {topic}."}], "max_tokens": new_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return {"ttft": first if first is not None else total, "latency": total, "tokens": tokens}


def run_clients(url: str, clients: int, requests: int, new_tokens: int) -> dict[str, Any]:
    results: list[dict[str, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as http:
            for j in range(requests):
                try:
                    r = one_request(http, url, TOPICS[(i * requests + j) % len(TOPICS)], new_tokens)
                except Exception as e:  # noqa: BLE001 - reported, not fatal to the other clients
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        sys.exit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_p95_s": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
            "latency_p50_s": statistics.median(r["latency"] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory or Hugging Face id (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default=None, help="the server's --dtype (default: the checkpoint's)")
    p.add_argument("--device", default=None)
    p.add_argument("--clients", default="1,2,4,8", help="client counts to run, comma-separated")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    p.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    directory = model_path(args.model)  # converts the embedded model once, before any timing
    device = torch.device(args.device or "cpu")
    model = minillama.from_pretrained(directory, dtype=args.dtype, prepack=False)
    wbytes, dtype = weight_bytes(model), str(model.embed.weight.dtype).removeprefix("torch.")
    del model
    bandwidth = read_bandwidth(device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    server, url = start_server(args)
    try:
        run_clients(url, 1, 1, 8)  # warm-up: first-call allocations, tokenizer, template
        rows = [run_clients(url, int(c), args.requests, args.new_tokens) for c in args.clients.split(",")]
    finally:
        server.terminate()
        server.wait(60)
    base = next((r["tok_s"] for r in rows if r["clients"] == 1), rows[0]["tok_s"] / rows[0]["clients"])
    print(f"# bench_serve: {args.model or 'SmolLM2-135M-Instruct (embedded)'} ({dtype}, {wbytes / 1e6:.0f} MB of "
          f"weights) on {machine}, torch {torch.__version__}; server --max-batch {args.max_batch}")
    print(f"# each client: {args.requests} streaming chat requests in a row, {args.new_tokens} new tokens each "
          f"(EOS ignored, greedy); read bandwidth {bandwidth:.1f} GB/s\n")
    head = ("| clients | aggregate tok/s | x 1 client | per client tok/s | TTFT p50 ms | TTFT p95 ms "
            "| latency p50 s | roofline tok/s |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        rows_running = min(r["clients"], args.max_batch)
        r.update(vs_one_client=r["tok_s"] / base, roofline_tok_s=rows_running * bandwidth * 1e9 / wbytes)
        print(f"| {r['clients']} | {r['tok_s']:.1f} | {r['vs_one_client']:.2f} | {r['tok_s'] / r['clients']:.1f} "
              f"| {1e3 * r['ttft_p50_s']:.0f} | {1e3 * r['ttft_p95_s']:.0f} | {r['latency_p50_s']:.2f} "
              f"| {r['roofline_tok_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "dtype": dtype, "weight_bytes": wbytes,
                                               "bandwidth_gb_s": bandwidth, "max_batch": args.max_batch,
                                               "new_tokens": args.new_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

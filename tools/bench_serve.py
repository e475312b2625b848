"""Serving throughput: `minillama serve` under 1..N concurrent streaming clients.

Starts the server in its own process (as users run it), then for each client count runs that
many clients at once, each sending `--requests` streaming chat requests in a row (different
prompts, `--new-tokens` new tokens each, EOS ignored so every request decodes the same amount).
Reports aggregate tokens/s, its ratio to one client's, time to first token (p50/p95) and request
latency, and the decode roofline: a decode step reads every weight once for all rows, so with B
rows running the memory-bound ceiling is B x bandwidth / weight bytes.

Two scenarios measure prefix reuse, each run against a server with it and one without
(`--no-prefix-reuse`): `--scenario chat`, one client holding an 8-turn conversation (the whole
history resent every turn, as chat clients do; time to first token per turn), and `--scenario
system`, `--clients` clients at once behind one shared ~1,000-token system prompt (aggregate tok/s).
`--scenario structured` compares decode throughput with a JSON schema (`response_format`) against
free text at each client count; with `--in-process`, the serving engine alone (no HTTP, no client
threads sharing the cores), the same prompts and schema, each client count as that many requests
decoded together.

    python tools/bench_serve.py                       # embedded SmolLM2, 1/2/4/8 clients
    python tools/bench_serve.py --clients 1,8,16 --max-batch 16 --json serve.json
    python tools/bench_serve.py --scenario chat --dtype bfloat16 --turns 8
    python tools/bench_serve.py --scenario system --dtype bfloat16 --clients 8
    python tools/bench_serve.py --scenario structured --dtype bfloat16 --clients 1,8
    python tools/bench_serve.py --scenario structured --dtype bfloat16 --clients 1,8 --in-process
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


def start_server(args: argparse.Namespace, reuse: bool = True) -> tuple[subprocess.Popen, str]:
    """`minillama serve --port 0` (the server binds a free port and names it); (process, base URL)."""
    cmd = [sys.executable, "-m", "minillama.cli", "serve", "--port", "0", "--max-batch", str(args.max_batch),
           "--max-queue", "1024", "--log-level", "warning"]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    cmd += ["--device", args.device] if args.device else []
    cmd += [] if reuse else ["--no-prefix-reuse"]
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


def one_request(http: httpx.Client, url: str, topic: str, new_tokens: int,
                messages: list[dict[str, str]] | None = None, extra: dict | None = None) -> dict[str, Any]:
    """Send one streaming chat request; (seconds to first content, seconds in all, tokens, text)."""
    messages = messages or [{"role": "user", "content": f"Write a short poem about {topic}."}]
    body = {"messages": messages, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    start = time.perf_counter()
    first, tokens, text = None, 0, []
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first if first is not None else time.perf_counter() - start
                text.append(chunk["choices"][0]["delta"]["content"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return {"ttft": first if first is not None else total, "latency": total, "tokens": tokens, "text": "".join(text)}


def passages(n: int, chars: int) -> list[str]:
    """n different stretches of Hamlet (tests/data/hamlet.txt), `chars` characters each."""
    text = (Path(__file__).resolve().parent.parent / "tests/data/hamlet.txt").read_text()
    return [text[5000 + i * chars:5000 + (i + 1) * chars] for i in range(n)]


def chat_turns(url: str, turns: int, new_tokens: int) -> dict[str, Any]:
    """One client, `turns` turns of one conversation (~150 tokens of user text a turn); each turn
    resends the whole history with the model's answers. Time to first token per turn."""
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are a careful reader of plays."}]
    ttfts = []
    with httpx.Client(timeout=600) as http:
        for passage in passages(turns, 600):
            messages.append({"role": "user", "content": f"Summarise this passage:\n{passage}"})
            r = one_request(http, url, "", new_tokens, messages)
            messages.append({"role": "assistant", "content": r["text"]})
            ttfts.append(r["ttft"])
        health = http.get(f"{url}/health").json()
    return {"ttft_s": ttfts, "reused_tokens": health.get("reused_tokens", 0)}


def run_threads(client: Any, clients: int) -> float:
    """Run client(0) .. client(clients - 1) at once, each on its own thread; seconds until all end."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def shared_system(url: str, clients: int, new_tokens: int) -> dict[str, Any]:
    """`clients` requests at once, each one shared ~1,000-token system prompt + its own question."""
    system = "You answer questions about this scene.\n" + passages(1, 4000)[0]
    out: list[dict[str, Any]] = []

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as http:
            messages = [{"role": "system", "content": system},
                        {"role": "user", "content": f"Question {i}: who speaks about {TOPICS[i % len(TOPICS)]}?"}]
            out.append(one_request(http, url, "", new_tokens, messages))

    wall = run_threads(client, clients)
    return {"wall_s": wall, "tok_s": sum(r["tokens"] for r in out) / wall,
            "ttft_p50_s": statistics.median(r["ttft"] for r in out)}


def prefix_scenario(args: argparse.Namespace) -> None:
    """Run the chat or system scenario with and without prefix reuse; print both and the ratio."""
    results = {}
    for reuse in (True, False):
        server, url = start_server(args, reuse)
        try:
            run_clients(url, 1, 1, 8)  # warm-up
            results[reuse] = (chat_turns(url, args.turns, args.new_tokens) if args.scenario == "chat"
                              else shared_system(url, int(args.clients.split(",")[-1]), args.new_tokens))
        finally:
            server.terminate()
            server.wait(60)
    on, off = results[True], results[False]
    if args.scenario == "chat":
        print(f"# {args.turns}-turn chat, {args.new_tokens} new tokens a turn: time to first token per turn (ms)\n")
        print("| turn | with prefix reuse | without | x faster |\n|---|---|---|---|")
        for t, (a, b) in enumerate(zip(on["ttft_s"], off["ttft_s"]), 1):
            print(f"| {t} | {1e3 * a:.0f} | {1e3 * b:.0f} | {b / a:.1f} |")
        print(f"\nreused tokens: {on['reused_tokens']}")
    else:
        print(f"# {int(args.clients.split(',')[-1])} clients, one ~1,000-token system prompt, {args.new_tokens} "
              "new tokens each\n")
        print("| prefix reuse | aggregate tok/s | TTFT p50 ms | wall s |\n|---|---|---|---|")
        for name, r in (("on", on), ("off", off)):
            print(f"| {name} | {r['tok_s']:.1f} | {1e3 * r['ttft_p50_s']:.0f} | {r['wall_s']:.1f} |")
        print(f"\nwith / without: {on['tok_s'] / off['tok_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"scenario": args.scenario, "with": on, "without": off}, indent=2))


# Structured output that cannot end before max_tokens (at least 64 lines), so that free text and JSON
# decode the same number of tokens.
LONG_SCHEMA = {"type": "object", "properties": {"lines": {"type": "array", "items": {"type": "string"},
                                                          "minItems": 64}}, "required": ["lines"]}


def in_process_runner(args: argparse.Namespace) -> Any:
    """run(clients, json: bool) -> {"tok_s"}: `clients` requests decoded together by the serving
    engine in this process (no HTTP), free text or under LONG_SCHEMA."""
    from minillama.engine import Engine, Request
    from minillama.generate import SamplingConfig
    from minillama.structured import Grammar

    directory = model_path(args.model)
    model = minillama.from_pretrained(directory, dtype=args.dtype, device=args.device)
    tok = minillama.load_tokenizer(directory)
    engine = Engine(model, tok, max_batch=args.max_batch, max_seq_len=512)
    grammar = Grammar(LONG_SCHEMA, tok, model.config.vocab_size, sorted(engine.eos))

    def run(clients: int, structured: bool) -> dict[str, float]:
        requests = []
        for i in range(clients):
            messages = [{"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]}."}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
            requests.append(Request(list(ids), args.new_tokens, SamplingConfig(), ignore_eos=True,
                                    grammar=grammar if structured else None))
            engine.submit(requests[-1])
        while any(r._filled < len(r.prompt) for r in requests):
            engine.step()  # admit and prefill every request: decode alone is timed
        start, done = time.perf_counter(), sum(len(r.tokens) for r in requests)
        while any(r.finished is None for r in requests):
            engine.step()
        return {"tok_s": (sum(len(r.tokens) for r in requests) - done) / (time.perf_counter() - start)}

    return run


def structured_scenario(args: argparse.Namespace) -> None:
    """Decode rate with response_format json_schema against free text, on one server (or the engine
    in-process), at each client count."""
    if args.in_process:
        run = in_process_runner(args)
        server = None
    else:
        server, url = start_server(args)
        fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "lines", "schema": LONG_SCHEMA}}}

        def run(clients: int, structured: bool) -> dict[str, Any]:
            return run_clients(url, clients, args.requests, args.new_tokens, fmt if structured else None)
    rows = []
    try:
        run(1, False)  # warm-up
        run(1, True)  # and the tokenizer's grammar view (built once)
        for clients in (int(c) for c in args.clients.split(",")):
            # interleaved, `--repeats` times each: the machine's drift falls on both alike
            runs: dict[str, list] = {"free": [], "json": []}
            for _ in range(args.repeats):
                runs["free"].append(run(clients, False))
                runs["json"].append(run(clients, True))
            rows.append({"clients": clients, **{k: {"tok_s": statistics.median(r["tok_s"] for r in v),
                                                    "tok_s_all": [r["tok_s"] for r in v]} for k, v in runs.items()}})
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    what = ("the serving engine in-process, each client count as that many requests decoded together" if args.in_process
            else f"{args.requests} streaming chat requests per client")
    print(f"# structured output: {what}, {args.new_tokens} new tokens each (greedy, EOS ignored); JSON schema: "
          "an object of >= 64 strings\n")
    print(f"| clients | free text tok/s (median of {args.repeats}; all) | JSON schema tok/s | JSON / free |")
    print("|---|---|---|---|")
    for r in rows:
        spread = {k: ", ".join(f"{x:.1f}" for x in r[k]["tok_s_all"]) for k in ("free", "json")}
        print(f"| {r['clients']} | {r['free']['tok_s']:.1f} ({spread['free']}) | {r['json']['tok_s']:.1f} "
              f"({spread['json']}) | {r['json']['tok_s'] / r['free']['tok_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"scenario": "structured", "rows": rows}, indent=2))


def run_clients(url: str, clients: int, requests: int, new_tokens: int, extra: dict | None = None) -> dict[str, Any]:
    results: list[dict[str, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as http:
            for j in range(requests):
                try:
                    r = one_request(http, url, TOPICS[(i * requests + j) % len(TOPICS)], new_tokens, extra=extra)
                except Exception as e:  # noqa: BLE001 - reported, not fatal to the other clients
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    results.append(r)

    wall = run_threads(client, clients)
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
    p.add_argument("--scenario", choices=("clients", "chat", "system", "structured"), default="clients",
                   help="clients: 1..N clients of independent requests; chat / system: prefix reuse on and off; "
                        "structured: response_format json_schema against free text")
    p.add_argument("--turns", type=int, default=8, help="--scenario chat: turns of the conversation")
    p.add_argument("--repeats", type=int, default=3, help="--scenario structured: interleaved runs of each kind")
    p.add_argument("--in-process", action="store_true",
                   help="--scenario structured: time the serving engine in this process instead of over HTTP")
    args = p.parse_args()
    if args.scenario != "clients":
        model_path(args.model)  # converts the embedded model once, before any timing
        structured_scenario(args) if args.scenario == "structured" else prefix_scenario(args)
        return

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

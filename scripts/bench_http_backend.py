"""Items/s of the HTTP chat backend against the local tiny-model server, at concurrency 1 vs 8.

    python scripts/bench_http_backend.py [--requests 32] [--max-tokens 32] [--model tiny]

Starts `tirl.pipelines.server` in this process on 127.0.0.1 (a free port), sends the same requests at each
concurrency through ``HTTPChatBackend`` and prints a table. The server runs one generation at a time (one model
behind a lock), so concurrency buys overlap of HTTP/JSON work only, not batching — the figure to compare with a
batching server such as vLLM.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from tirl.pipelines.chat_backends import ChatParams, HFChatBackend, HTTPChatBackend
from tirl.pipelines.server import start_server, stop_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    server, thread = start_server(HFChatBackend.from_name(args.model), port=0, model_name=args.model)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    rows = []
    try:
        for concurrency in (1, 8):
            http = HTTPChatBackend(url, args.model, max_concurrency=concurrency, timeout_s=120, max_retries=0)
            params = [ChatParams(max_tokens=args.max_tokens, temperature=1.0, seed=i) for i in range(args.requests)]
            msgs = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(args.requests)]
            http.complete(msgs[0], params[0])  # warm-up
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(http.complete, msgs, params))
            elapsed = time.perf_counter() - start
            rows.append((concurrency, args.requests, elapsed, args.requests / elapsed, dict(http.stats.failures)))
    finally:
        stop_server(server, thread)
    print(f"{'concurrency':>11} {'requests':>8} {'seconds':>8} {'items/s':>8}  failures")
    for c, n, s, r, f in rows:
        print(f"{c:>11} {n:>8} {s:>8.2f} {r:>8.2f}  {f or 0}")


if __name__ == "__main__":
    main()

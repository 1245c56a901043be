"""A small OpenAI-compatible ``/v1/chat/completions`` server for any HF model (the tiny one included).

    python -m tirl.pipelines.server --model tiny --port 8000

Stdlib only (``http.server`` with a thread per connection); requests share one model behind the backend's lock,
so it serves tests and local runs, not production traffic (use vLLM/SGLang there). It honours ``n``, ``stop``,
``seed``, ``max_tokens``, ``temperature``, ``top_p`` and vLLM's ``continue_final_message``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tirl.pipelines.chat_backends import ChatBackend, ChatParams, HFChatBackend


def _handler(backend: ChatBackend, model_name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: tests and benchmarks print their own summaries
            pass

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = body["messages"]
                stop = body.get("stop") or []
                params = ChatParams(max_tokens=int(body.get("max_tokens", 256)),
                                    temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                                    n=int(body.get("n", 1)), stop=[stop] if isinstance(stop, str) else list(stop),
                                    seed=body.get("seed"))
                if messages and messages[-1]["role"] == "assistant" and not body.get("continue_final_message"):
                    messages = messages + [{"role": "user", "content": ""}]  # the OpenAI reading: a fresh turn
            except (ValueError, KeyError, TypeError) as err:
                self._send(400, {"error": {"message": f"bad request: {err}"}})
                return
            try:
                texts = backend.complete(messages, params)
            except Exception as err:  # the server must answer, whatever the model did
                self._send(500, {"error": {"message": f"{type(err).__name__}: {err}"}})
                return
            self._send(200, {
                "id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                            for i, t in enumerate(texts)],
            })

    return Handler


def start_server(backend: ChatBackend, host: str = "127.0.0.1", port: int = 0,
                 model_name: str = "tirl") -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve in a daemon thread; ``port=0`` picks a free one (read it from ``server.server_address``)."""
    server = ThreadingHTTPServer((host, port), _handler(backend, model_name))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def stop_server(server: ThreadingHTTPServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="HF hub id, local path, 'tiny' or 'tiny-warm'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    backend = HFChatBackend.from_name(args.model, dtype=args.dtype)
    server = ThreadingHTTPServer((args.host, args.port), _handler(backend, args.model))
    print(f"serving {args.model} at http://{args.host}:{server.server_address[1]}/v1/chat/completions", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

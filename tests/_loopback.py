"Servers on 127.0.0.1 for the tests: scripted OpenAI-compatible ones (real HTTP, replies chosen by the test) and `transformers serve`."
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def completion(content: str, refusal: str = None) -> bytes:
    msg = {"role": "assistant", "content": content} | ({"refusal": refusal} if refusal else {})
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}).encode()


class Scripted(BaseHTTPRequestHandler):
    "Answers /v1/chat/completions from the server's script: a list of (status, body) used in order, the last one repeated."
    def do_POST(self):
        n = int(self.headers.get("content-length", 0)); body = json.loads(self.rfile.read(n))
        srv = self.server
        with srv.lock:
            srv.requests.append({"body": body, "auth": self.headers.get("authorization")})
            status, payload = srv.script[min(len(srv.requests) - 1, len(srv.script) - 1)]
        self.send_response(status); self.send_header("content-type", "application/json")
        if status == 429: self.send_header("retry-after", "0")
        self.send_header("content-length", str(len(payload))); self.end_headers(); self.wfile.write(payload)
    def log_message(self, *a): pass


def start_scripted(script):
    "A running scripted server and its base URL (`.../v1`)."
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    srv.script, srv.requests, srv.lock = script, [], threading.Lock()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


@contextlib.contextmanager
def transformers_serve(folder, *model):
    """`transformers serve` on a free loopback port, offline, with its log in `folder`; yields the base URL (`.../v1`).
    `model` pins one model; without it the server loads whatever a request names."""
    import httpx
    import pytest
    port, folder = free_port(), Path(folder)
    (folder / "hub").mkdir(parents=True, exist_ok=True)           # an existing HF cache, or /v1/models answers 500
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(folder / "hub"))
    cli = Path(sys.executable).with_name("transformers")
    with open(folder / "serve.log", "w") as log:
        proc = subprocess.Popen([str(cli), "serve", *map(str, model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        for _ in range(240):
            if proc.poll() is not None: pytest.fail(f"transformers serve exited: {(folder / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200: break
            except httpx.TransportError: time.sleep(0.5)
        else: pytest.fail("transformers serve did not come up in 120 s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM); proc.wait(30)

"Scripted OpenAI-compatible servers on 127.0.0.1 for the tests: real HTTP, replies chosen by the test."
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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

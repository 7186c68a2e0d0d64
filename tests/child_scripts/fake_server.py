"""A child process for supervisor tests (a fake, not vLLM): prints log lines, serves /health.

usage: fake_server.py PORT MODE
  ready        serve /health 200 after 0.3 s
  crash        print a traceback-like error and exit 3 at once
  stubborn     like ready, but ignore SIGTERM and start a grandchild that ignores it too
  family       like ready, with a grandchild titled like vLLM's engine core (VLLM::EngineCore) that
               holds the log pipe, as vLLM's does, leaves the process group, and shows no
               PDTUI_TAG (as a process renamed by setproctitle); it leaves files where vLLM
               leaves its ZeroMQ sockets and gloo's file (VLLM_RPC_BASE_PATH, TMPDIR)
  family-sigill  like family, but the grandchild dies of SIGILL after 1 s with faulthandler on
  listener-dies  like ready, but first prints the traceback of vLLM's NIXL handshake-listener
               thread dying on a taken port (the process lives on and answers /health)
  pd           like ready, and answers POST /v1/completions as P and D do for the proxy (HTTP/1.1,
               keep-alive): a P leg (kv_transfer_params.do_remote_decode) gets kv_transfer_params
               back, a D leg streams max_tokens chunks one every $PDTUI_FAKE_ITL_S (default 0.02 s)
"""

import http.server
import os
import signal
import subprocess
import sys
import time

port, mode = int(sys.argv[1]), sys.argv[2]
print("INFO 11-25 04:41:16 [fake.py:1] starting fake server", flush=True)
if mode == "crash":
    print("(EngineCore pid=1) ERROR 11-25 04:41:16 [core.py:1] ValueError: fake engine refuses to start", flush=True)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    print(f"GRANDCHILD {child.pid}", flush=True)
if mode == "family":
    # leaves what vLLM leaves when killed: a ZeroMQ socket file and gloo's rendezvous file
    import tempfile
    open(os.path.join(os.environ.get("VLLM_RPC_BASE_PATH", tempfile.gettempdir()), "fake-ipc-socket"), "w").close()
    open(os.path.join(tempfile.gettempdir(), "vllm_dist_fake"), "w").close()
    # no PDTUI_TAG in its environment: vLLM's renamed processes (setproctitle) do not show theirs
    child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgid(0, 0); time.sleep(600)",
                              "VLLM::EngineCore"], env={"PATH": os.environ.get("PATH", "")})
    print(f"GRANDCHILD {child.pid}", flush=True)
if mode == "family-sigill":
    # the engine-core stand-in crashes on an instruction the CPU refuses, 1 s after start, with
    # faulthandler on (as pdtui starts the engines): its report goes to the shared log pipe
    child = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c",
                              ("import os, signal, time\ndef cpu_attention_with_kv_cache():\n"
                              "    time.sleep(1.0); os.kill(os.getpid(), signal.SIGILL)\n"
                              "cpu_attention_with_kv_cache()"), "VLLM::EngineCore"])
    print(f"GRANDCHILD {child.pid}", flush=True)
if mode == "listener-dies":
    print("Exception in thread nixl_handshake_listener:\nTraceback (most recent call last):\n"
          '  File "zmq/backend/cython/_zmq.py", line 190, in zmq.backend.cython._zmq._check_rc\n'
          "zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:5700')", flush=True)
time.sleep(0.3)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


class PdHandler(Handler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self):
        import json

        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        params = body.get("kv_transfer_params") or {}
        if params.get("do_remote_decode"):  # the P leg: prefill, hand the KV's whereabouts back
            out = json.dumps({"id": "cmpl-p", "choices": [{"index": 0, "text": " w0"}],
                              "usage": {"prompt_tokens": 40, "completion_tokens": 1},
                              "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                                                     "remote_block_ids": [[0]], "remote_engine_id": "fake-p",
                                                     "remote_host": "127.0.0.1", "remote_port": 1}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        self.send_response(200)  # the D leg: stream
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        itl = float(os.environ.get("PDTUI_FAKE_ITL_S", "0.02"))

        def chunk(data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        for i in range(int(body.get("max_tokens") or 16)):
            event = {"id": "cmpl-d", "object": "text_completion",
                     "choices": [{"index": 0, "text": f" w{i}", "logprobs": None, "finish_reason": None}]}
            chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            time.sleep(itl)
        chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


print(f"INFO 11-25 04:41:17 [fake.py:2] serving on {port} pid {os.getpid()}", flush=True)
if mode == "pd":
    # a listen backlog past socketserver's 5: a proxy that opens 10 connections at once would see
    # SYNs dropped and retried after 1 s (a stall that is the fake's, not the proxy's)
    http.server.ThreadingHTTPServer.request_queue_size = 128
    http.server.ThreadingHTTPServer(("127.0.0.1", port), PdHandler).serve_forever()
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()

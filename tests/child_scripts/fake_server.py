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


print(f"INFO 11-25 04:41:17 [fake.py:2] serving on {port} pid {os.getpid()}", flush=True)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()

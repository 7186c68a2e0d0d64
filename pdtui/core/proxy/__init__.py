"""The P/D proxy, as a package: what the rest of pdtui imports is re-exported here.

- ``contract``: the P/D contract (P then D, the fallback policy, the choice of D): ``Proxy``;
- ``settings``: what the proxy is told at its start (``ProxySettings``);
- ``routing``: the choice of D (least-loaded, round-robin, headroom) and of P, each D's headroom;
- ``relay``: D's stream relayed to the client chunk by chunk, inside ``data_received``;
- ``sse``: SSE framing on bytes (event ends, the byte scan that times tokens, the error event);
- ``usage``: the silent-recompute check on D's usage;
- ``trace``: a request's record while it runs (``Trace``), frozen into ``RequestTraced``;
- ``metrics``: the proxy's own /metrics;
- ``firsttoken``: the two TTFT switches, pure functions over bodies and bytes;
- ``migrate``: a stream whose D died continued on another D (the token ids D sent, the new legs);
- ``httpio``: HTTP/1.1 on asyncio protocols and httptools, under everything above;
- ``server``: the proxy on a socket in the caller's loop (``ProxyServer``);
- ``process``: the proxy as a process of its own (``pdtui proxy``) and its handle (``ProxyProcess``).
"""

from pdtui.core.proxy.contract import PREFILL_KV_PARAMS, WARMUP_HEADER, Proxy, Upstream
from pdtui.core.proxy.process import ProxyProcess
from pdtui.core.proxy.routing import DECODE_CHOICES
from pdtui.core.proxy.server import ProxyServer
from pdtui.core.proxy.settings import (
    MIGRATE_POLICIES,
    PREFILL_FAILURE_POLICIES,
    ProxyOptionError,
    ProxySettings,
)
from pdtui.core.proxy.trace import PREFILL_BRANCHES

__all__ = [
    "DECODE_CHOICES",
    "MIGRATE_POLICIES",
    "PREFILL_BRANCHES",
    "PREFILL_FAILURE_POLICIES",
    "PREFILL_KV_PARAMS",
    "WARMUP_HEADER",
    "Proxy",
    "ProxyOptionError",
    "ProxyProcess",
    "ProxyServer",
    "ProxySettings",
    "Upstream",
]

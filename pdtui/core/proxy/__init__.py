"""The P/D proxy, as a package: what the rest of pdtui imports is re-exported here.

- ``contract``: the P/D contract (P then D, the fallback policy, the choice of D), the proxy itself;
- ``firsttoken``: the two TTFT switches, pure functions over bodies and bytes;
- ``httpio``: HTTP/1.1 on asyncio protocols and httptools, the data path;
- ``process``: the proxy as a process of its own (``pdtui proxy``) and its handle (``ProxyProcess``).
"""

from pdtui.core.proxy.contract import (
    DECODE_CHOICES,
    PREFILL_BRANCHES,
    PREFILL_FAILURE_POLICIES,
    PREFILL_KV_PARAMS,
    WARMUP_HEADER,
    Proxy,
    ProxyServer,
    ProxySettings,
    Upstream,
)
from pdtui.core.proxy.process import ProxyOptionError, ProxyProcess

__all__ = [
    "DECODE_CHOICES",
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

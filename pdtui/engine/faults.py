"""Faults injected into an engine on purpose, for drills and tests (``PDTUI_FAULT``).

Runs INSIDE the engine processes, from ``pdtui.engine.vllm_entry`` (as ``pdtui.engine.amx``
does). Set per instance (a profile's ``[[instance]] env``, or ``PDTUI_ENV``), e.g.::

    PDTUI_FAULT=SIGILL@vllm._custom_ops:cpu_attention_with_kv_cache

makes the first call of that function in any process of the instance end the process with
SIGILL, as the AMX attention kernel does on an AMX Xeon that never asked for the tile state
(issue 20; docs/amx.md). The signal is raised by the process itself (``os.kill``), so Python's
faulthandler prints its report and the stack, and the process dies of the signal as a real
crash would: what pdtui then shows (the death named, the start failed within seconds, nothing
left) is what a user sees on such a machine. Unset: nothing is touched.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

ENV = "PDTUI_FAULT"


def install(spec: str | None = None) -> str | None:
    """Wrap the named function so that its first call raises the signal; returns what was done
    (printed to stderr, so the instance's log says it), or None when no fault is asked for."""
    spec = os.environ.get(ENV) if spec is None else spec
    if not spec:
        return None
    try:
        sig_name, _, target = spec.partition("@")
        module_name, _, func_name = target.partition(":")
        sig = signal.Signals[sig_name]
        module = importlib.import_module(module_name)
        real = getattr(module, func_name)
    except (KeyError, ValueError, ImportError, AttributeError) as e:
        print(f"pdtui: {ENV}={spec!r} not installed: {type(e).__name__}: {e}"
              " (expected SIGNAME@module:function)", file=sys.stderr, flush=True)
        return None

    def fault(*args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), sig)  # a crash by signal, as the kernel delivers a real one
        return real(*args, **kwargs)

    setattr(module, func_name, fault)
    done = f"pdtui: fault injected ({ENV}): {sig.name} at the first call of {module_name}.{func_name} (pid {os.getpid()})"
    print(done, file=sys.stderr, flush=True)
    return done

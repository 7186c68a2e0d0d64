"""The UI-free core: config, supervisor, proxy, scrape, logparse, kvmath, events, runtime.

Nothing here imports textual; tests/unit/test_import_hygiene.py keeps it that way.
"""

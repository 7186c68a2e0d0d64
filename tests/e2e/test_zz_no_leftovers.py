"""Runs after test_pair.py's module fixture has closed its Runtime: nothing it started may be left."""

import time
from pathlib import Path

import pytest

from pdtui.core import config as config_mod
from tests.e2e.conftest import PORT_OFFSET, STARTED_GROUPS, TEMP_FILES_BEFORE, _ports_free, engine_temp_files

pytestmark = pytest.mark.e2e


def processes_in_groups(groups: set[int]) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            pgrp = int(stat.rsplit(")", 1)[1].split()[2])
            state = stat.rsplit(")", 1)[1].split()[0]
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
        except (OSError, ValueError, IndexError):
            continue
        if pgrp in groups and state != "Z":
            found.append(f"pid {proc.name} (group {pgrp}): {cmd}")
    return found


def test_no_vllm_process_is_left_running():
    assert STARTED_GROUPS, "the e2e pair recorded no process groups: did test_pair.py run?"
    # A process SIGKILLed a moment ago may still be tearing down (empty cmdline); give the
    # kernel a bounded moment, then insist.
    deadline = time.monotonic() + 10
    while processes_in_groups(STARTED_GROUPS) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_in_groups(STARTED_GROUPS) == []
    # nor any process that carries this pdtui's tag (engine cores and workers that left their
    # group, the proxy): what the reaper would kill if this pytest were killed
    from pdtui.core.supervisor import RUN_TAG, tagged_processes

    deadline = time.monotonic() + 10
    while tagged_processes(RUN_TAG + ":") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tagged_processes(RUN_TAG + ":") == []
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), PORT_OFFSET)
    assert _ports_free(cfg), "a port of the e2e pair is still held"


def test_no_engine_left_a_file_in_the_temp_folder():
    """The e2e tests killed engines with SIGKILL dozens of times: vLLM's sockets and gloo's files
    went to each start's own folder (supervisor.make_scratch), and every such folder is gone."""
    import tempfile

    from pdtui.core.supervisor import RUN_TAG, scratch_prefix

    assert STARTED_GROUPS, "no engine was started: this test would see nothing"
    new = engine_temp_files() - TEMP_FILES_BEFORE
    assert not new, f"{len(new)} engine files left in {tempfile.gettempdir()}: {sorted(new)[:5]}"
    left = list(Path(tempfile.gettempdir()).glob(scratch_prefix(RUN_TAG) + "*"))
    assert not left, f"engine temp folders left: {left[:5]}"

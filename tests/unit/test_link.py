"""The link's spec, plan, commands and state files (pdtui.core.link), with no namespace made: the
commands are read, and a FAKE runner stands for ip and tc where state files are exercised. The
real link (namespaces, veths, tc, throughput) is tests/functional/test_link.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pdtui.core import config, link, topology
from pdtui.core.config import ConfigError
from pdtui.core.link import LinkSpec, LinkSpecError


@pytest.mark.parametrize(("text", "rate", "rtt", "loss", "name"), [
    ("loopback", None, 0.0, 0.0, "loopback"),
    ("", None, 0.0, 0.0, "loopback"),
    ("1gbit", 1e9, 0.0, 0.0, "1gbit"),
    ("10GBIT", 10e9, 0.0, 0.0, "10gbit"),
    ("25gbit", 25e9, 0.0, 0.0, "25gbit"),
    ("100gbit", 100e9, 0.0, 0.0, "100gbit"),
    ("2.5gbit", 2.5e9, 0.0, 0.0, "2.5gbit"),
    ("rate=2.5gbit,rtt=1ms", 2.5e9, 1e-3, 0.0, "rate=2.5gbit,rtt=1ms"),
    ("rate=2.5gbit,rtt=1ms,loss=0.1%", 2.5e9, 1e-3, 0.001, "rate=2.5gbit,rtt=1ms,loss=0.1%"),
    (" loss=1%, rate=800mbit ,rtt=250us", 800e6, 250e-6, 0.01, "rate=800mbit,rtt=250us,loss=1%"),
])
def test_specs_parse(text, rate, rtt, loss, name):
    spec = LinkSpec.parse(text)
    assert (spec.rate_bps, spec.rtt_s, spec.loss, spec.text) == (rate, pytest.approx(rtt), pytest.approx(loss), name)
    assert spec.emulated == (rate is not None)


@pytest.mark.parametrize(("text", "says"), [
    ("fast", "a number and a unit, e.g. 2.5gbit"),
    ("5 furlongs", "unknown unit 'furlongs'; use bit, kbit, mbit, gbit or tbit"),
    ("5qbit", "unknown unit 'qbit'"),
    ("10gbps", "write 10gbit (tc reads 'gbps' as bytes per second"),
    ("rate=1gbit,rtt=1", "a number and a unit (us, ms, s)"),
    ("rate=1gbit,loss=0.1", "a percentage with its %"),
    ("rate=1gbit,loss=100%", "under 100%"),
    ("rtt=1ms", "rate= is required"),
    ("rate=1gbit,jitter=1ms", "unknown key 'jitter'"),
    ("rate=1gbit,rate=2gbit", "rate given twice"),
    ("rate=1gbit,rtt", "is not key=value"),
    ("rate=500tbit", "outside 1 Mbit/s to 400 Gbit/s"),
    ("rate=10kbit", "outside"),
])
def test_bad_specs_say_what_is_wrong(text, says):
    with pytest.raises(LinkSpecError) as e:
        LinkSpec.parse(text)
    assert says in str(e.value)
    assert repr(text) in str(e.value) or text.strip() in str(e.value)


def test_words_and_formula():
    assert LinkSpec.parse("1gbit").describe() == "1 Gbit/s"
    assert LinkSpec.parse("rate=2.5gbit,rtt=1ms,loss=0.1%").describe() == "2.5 Gbit/s, RTT 1 ms, loss 0.1%"
    assert LinkSpec.parse("rate=800mbit,rtt=250us").describe() == "800 Mbit/s, RTT 250 us"
    assert LinkSpec.parse("loopback").describe() == "loopback"
    # 3,145,728 B (24 blocks of the tiny model) at 1 Gbit/s: 25.17 ms; plus an RTT of 1 ms
    assert LinkSpec.parse("1gbit").transfer_s(3_145_728) == pytest.approx(0.025166, abs=1e-6)
    assert LinkSpec.parse("rate=1gbit,rtt=1ms").transfer_s(3_145_728) == pytest.approx(0.026166, abs=1e-6)
    assert LinkSpec.parse("loopback").transfer_s(1000) is None


def test_plan_names_fit_linux_and_addresses_stay_in_the_benchmark_block():
    p = link.plan(LinkSpec.parse("1gbit"), "a1b2c3", 300)
    for s in p.sides:
        for dev in (s.link_dev, s.admin_dev, s.root_dev):
            assert len(dev) <= 15, dev  # IFNAMSIZ - 1
        assert s.netns.startswith("pdtui-a1b2c3-")
    assert (p.prefill.link_addr, p.decode.link_addr) == ("198.19.44.1", "198.19.44.2")
    assert (p.prefill.root_addr, p.prefill.admin_addr) == ("198.19.44.5", "198.19.44.6")
    assert (p.decode.root_addr, p.decode.admin_addr) == ("198.19.44.9", "198.19.44.10")
    assert p.side("prefill").wrap(["python", "-m", "x"]) == ["ip", "netns", "exec", "pdtui-a1b2c3-P", "python", "-m",
                                                             "x"]
    assert link.LinkPlan.from_json(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(ValueError):
        link.plan(LinkSpec.parse("1gbit"), "A-B", 0)
    with pytest.raises(ValueError):
        link.plan(LinkSpec.parse("1gbit"), "abc", 512)


def _cmds(cmds):
    return [" ".join(c) for c in cmds]


def test_up_shapes_both_ends_with_htb_at_the_rate_and_no_netem_without_rtt_or_loss():
    p = link.plan(LinkSpec.parse("1gbit"), "abc", 0)
    cmds = _cmds(link.up_commands(p))
    assert cmds[:2] == ["ip netns add pdtui-abc-P", "ip netns add pdtui-abc-D"]
    assert ("ip link add name pdlabcP netns pdtui-abc-P type veth peer name pdlabcD netns pdtui-abc-D") in cmds
    assert "ip link add pdrabcP type veth peer name pdaabcP netns pdtui-abc-P" in cmds
    assert "ip -n pdtui-abc-P addr add 198.18.0.1/30 dev pdlabcP" in cmds
    for end, ns in (("pdlabcP", "pdtui-abc-P"), ("pdlabcD", "pdtui-abc-D")):
        assert f"tc -n {ns} qdisc add dev {end} root handle 1: htb default 1" in cmds
        assert (f"tc -n {ns} class add dev {end} parent 1: classid 1:1 htb rate 1000000000bit ceil 1000000000bit"
                " burst 125000 cburst 125000 quantum 200000") in cmds
    assert not any("netem" in c for c in cmds)
    # namespaces first, the shaping last (a veth must exist before its qdisc)
    assert max(i for i, c in enumerate(cmds) if c.startswith("ip ")) < min(i for i, c in enumerate(cmds)
                                                                            if c.startswith("tc "))


def test_rtt_is_half_each_way_and_loss_goes_to_netem_under_htb():
    p = link.plan(LinkSpec.parse("rate=2.5gbit,rtt=1ms,loss=0.1%"), "abc", 0)
    netem = [c for c in _cmds(link.shape_commands(p, p.spec)) if "netem" in c]
    assert netem == [f"tc -n pdtui-abc-{x} qdisc add dev pdlabc{x} parent 1:1 handle 10: netem limit 1000"
                     " delay 500us loss 0.1%" for x in "PD"]
    # a queue that holds twice what the delay keeps in flight: 25 Gbit/s x 5 ms / 1500 B
    big = LinkSpec.parse("rate=25gbit,rtt=10ms")
    assert link.netem_limit(big) == int(2 * 25e9 / 8 * 0.005 / 1500) + 1
    assert link.burst_bytes(1e9) == 125000 and link.burst_bytes(10e6) == 65536


def test_loopback_shapes_nothing_and_reshape_removes_the_root_qdisc_first():
    p = link.plan(LinkSpec.parse("1gbit"), "abc", 0)
    assert link.shape_commands(p, LinkSpec.parse("loopback")) == []
    assert _cmds(link.unshape_commands(p)) == ["tc -n pdtui-abc-P qdisc del dev pdlabcP root",
                                               "tc -n pdtui-abc-D qdisc del dev pdlabcD root"]


def test_down_removes_veths_then_namespaces():
    p = link.plan(LinkSpec.parse("1gbit"), "abc", 0)
    assert _cmds(link.down_commands(p)) == ["ip link del pdrabcP", "ip link del pdrabcD",
                                            "ip -n pdtui-abc-P link del pdlabcP",
                                            "ip netns del pdtui-abc-P", "ip netns del pdtui-abc-D"]


class FakeIp:
    """A FAKE ip/tc: records every command; namespaces and links as sets; answers as iproute2 does
    for what this test needs (list, pids, show, add, del, addresses)."""

    def __init__(self, addrs=()):
        self.calls: list[str] = []
        self.netns: set[str] = set()
        self.links: set[str] = set()
        self.addrs = set(addrs)

    def __call__(self, cmd):
        self.calls.append(" ".join(cmd))
        ok = subprocess.CompletedProcess(cmd, 0, "", "")
        args = cmd[1:]
        if cmd[0] == "tc":
            return ok
        if args[:2] == ["netns", "list"]:
            return subprocess.CompletedProcess(cmd, 0, "".join(f"{n}\n" for n in sorted(self.netns)), "")
        if args[:2] == ["netns", "pids"]:
            return ok
        if args[:2] == ["netns", "add"]:
            self.netns.add(args[2])
            return ok
        if args[:2] == ["netns", "del"]:
            if args[2] not in self.netns:
                return subprocess.CompletedProcess(cmd, 1, "", f'Cannot remove namespace file "/run/netns/{args[2]}":'
                                                   " No such file or directory")
            self.netns.discard(args[2])
            return ok
        if args[:4] == ["-4", "-o", "addr", "show"]:
            return subprocess.CompletedProcess(cmd, 0, "".join(f"9: x inet {a}/30 scope global\n" for a in self.addrs),
                                               "")
        if args[:2] == ["link", "show"]:
            return ok if args[2] in self.links else subprocess.CompletedProcess(cmd, 1, "", "Device does not exist")
        if args[:2] == ["link", "add"]:
            if args[2] != "name":  # `link add name X netns NS ...`: made in a namespace, not the root's
                self.links.add(args[2])
            return ok
        if args[:2] == ["link", "del"]:
            if args[2] not in self.links:
                return subprocess.CompletedProcess(cmd, 1, "", 'Cannot find device "x"')
            self.links.discard(args[2])
            return ok
        return ok


def test_reserve_writes_the_state_file_before_anything_is_made(tmp_path):
    ip = FakeIp()
    p = link.reserve(LinkSpec.parse("1gbit"), root=tmp_path, runner=ip, run_id="abc")
    state = json.loads((tmp_path / "links" / "abc.json").read_text())
    assert link.LinkPlan.from_json(state["plan"]) == p
    assert state["owner"]["pid"] == os.getpid() and state["owner"]["start"]
    assert not any(" add " in c for c in ip.calls)  # nothing made yet
    # a second run never takes the same /24, nor one whose addresses the root namespace has
    q = link.reserve(LinkSpec.parse("1gbit"), root=tmp_path, runner=ip, run_id="def")
    assert q.index != p.index


def test_reserve_skips_a_block_whose_addresses_are_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(link.random, "randrange", lambda n: 7)
    taken = link.plan(LinkSpec.parse("1gbit"), "x", 7).prefill.root_addr
    p = link.reserve(LinkSpec.parse("1gbit"), root=tmp_path, runner=FakeIp(addrs=[taken]), run_id="abc")
    assert p.index == 8


def test_a_gone_owner_s_link_is_torn_down_and_a_live_one_left(tmp_path):
    ip = FakeIp()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = link.reserve(LinkSpec.parse("1gbit"), root=tmp_path, runner=ip, run_id="live")
    gone = link.reserve(LinkSpec.parse("1gbit"), root=tmp_path, runner=ip, run_id="gone", owner_pid=dead.pid)
    for p in (gone, live):
        ip.netns.update(p.namespaces)
        ip.links.update(p.root_devs)
    removed = link.clean_stale(root=tmp_path, runner=ip)
    assert removed == [(f"run gone (pid {dead.pid}, gone): namespace pdtui-gone-P, namespace pdtui-gone-D,"
                        " veth pdrgoneP, veth pdrgoneD")]
    assert ip.netns == set(live.namespaces) and ip.links == set(live.root_devs)
    assert sorted(x.name for x in (tmp_path / "links").glob("*.json")) == ["live.json"]
    assert link.clean_stale(root=tmp_path, runner=ip) == []  # again: nothing
    # the reaper names its pdtui as gone before /proc says so
    assert link.clean_stale(root=tmp_path, runner=ip, gone=[os.getpid()])
    assert ip.netns == set()


def test_link_down_is_idempotent_and_releases_the_state_file(tmp_path):
    ip = FakeIp()
    p = link.reserve(LinkSpec.parse("1gbit"), root=tmp_path, runner=ip, run_id="abc")
    k = link.Link(p, root=tmp_path, runner=ip)
    k.up()
    assert ip.netns == set(p.namespaces)
    k.down()
    k.down()
    assert ip.netns == set() and not (tmp_path / "links" / "abc.json").exists()


def test_up_refuses_addresses_another_device_holds(tmp_path):
    p = link.plan(LinkSpec.parse("1gbit"), "abc", 3)
    with pytest.raises(link.LinkError, match="already in use in the root namespace"):
        link.Link(p, root=tmp_path, runner=FakeIp(addrs=[p.decode.root_addr])).up()


def test_a_failed_step_tears_down_what_was_made(tmp_path):
    ip = FakeIp()

    def failing(cmd):
        if cmd[0] == "tc":
            return subprocess.CompletedProcess(cmd, 2, "", "Error: Specified qdisc kind is unknown.")
        return ip(cmd)

    p = link.plan(LinkSpec.parse("1gbit"), "abc", 3)
    with pytest.raises(link.LinkError, match="qdisc kind is unknown"):
        link.Link(p, root=tmp_path, runner=failing).up()
    assert ip.netns == set() and ip.links == set()


# ----- the config --------------------------------------------------------------------------------


def test_the_config_renders_each_engine_in_its_namespace_with_nixl_on_the_shaped_veth(tmp_path):
    cfg = config.load_profile("cpu")
    cfg.link = "10gbit"
    p = link.plan(config.link_spec(cfg), "abc", 0)
    P, D = config.render(cfg, model_root=tmp_path, link=p)
    for spec, side in ((P, p.prefill), (D, p.decode)):
        assert spec.argv[:4] == ["ip", "netns", "exec", side.netns]
        assert spec.argv[spec.argv.index("--host") + 1] == side.admin_addr
        assert spec.url == f"http://{side.admin_addr}:{spec.argv[spec.argv.index('--port') + 1]}"
        assert spec.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == side.link_addr
        assert spec.env["UCX_NET_DEVICES"] == side.link_dev and spec.env["UCX_TLS"] == "tcp"
    with pytest.raises(ConfigError, match="needs the run's link plan"):
        config.render(cfg, model_root=tmp_path)


def test_the_config_refuses_what_a_link_cannot_carry():
    cfg = config.load_profile("1p2d")
    config.apply_overrides(cfg, {"link": "1gbit"}, source=lambda n: "--link")
    with pytest.raises(ConfigError, match=r"joins one P and one D; this profile has 1 P and 2 D"):
        config.validate(cfg)
    cfg = config.load_profile("cpu")
    config.apply_overrides(cfg, {"link": "1gbit", "traces_port": 4318}, source=lambda n: f"--{n}")
    with pytest.raises(ConfigError, match="cannot reach the OTLP receiver"):
        config.validate(cfg)
    cfg = config.load_profile("cpu")
    config.apply_overrides(cfg, {"link": "10gbps"}, source=lambda n: "PDTUI_LINK")
    with pytest.raises(ConfigError, match=r"write 10gbit .* \(link set by PDTUI_LINK\)"):
        config.validate(cfg)


def test_a_profile_s_link_field_and_the_loopback_default(tmp_path):
    prof = tmp_path / "p.toml"
    text = (config.PROFILE_DIR / "cpu.toml").read_text().replace("[pair]\n", "[pair]\nlink = \"25gbit\"\n", 1)
    prof.write_text(text)
    assert config.link_spec(config.load_profile(prof)).rate_bps == 25e9
    assert not config.link_spec(config.load_profile("cpu")).emulated
    topo = topology.pair(config.load_profile("cpu"), model_root=tmp_path)
    assert topo.link is None and topo.members[0].launch.argv[0] != "ip"


def test_the_cli_flag_and_a_bad_link_s_exit(tmp_path):
    env = {**os.environ, "PDTUI_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "pdtui", "config", "--link", "rate=1gbit,rtt=5"], env=env,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2
    assert "rtt '5': a number and a unit (us, ms, s)" in r.stderr and "(link set by --link)" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pdtui", "config", "--json", "--link", "1gbit"], env=env,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    launch = json.loads(r.stdout)["launch"]
    assert [x["argv"][:4] for x in launch] == [["ip", "netns", "exec", "pdtui-run-P"],
                                              ["ip", "netns", "exec", "pdtui-run-D"]]
    assert "an example (each run picks its own)" in r.stderr

"""The link: an emulated fabric between P and D, real packets (issue 26).

On one box P and D share a kernel and NIXL moves the KV over loopback. With a link, each engine
runs in a network namespace of its own (``pdtui-<run>-P``, ``pdtui-<run>-D``), and the two are
joined by a veth pair shaped with ``tc`` on both ends: an htb class at the rate (each direction),
and, when the spec asks for them, netem's delay (RTT/2 each way) and loss under it. NIXL's UCX is
put on that veth (``UCX_TLS=tcp``, ``UCX_NET_DEVICES``, the side channel on its address). The proxy,
in the root namespace, reaches each engine's HTTP port over a second veth per namespace, unshaped:
only the KV (and the NIXL handshake) crosses the shaped link.

    spec = LinkSpec.parse("10gbit")          # or "rate=2.5gbit,rtt=1ms,loss=0.1%", "loopback"
    plan = reserve(spec)                     # names and addresses, written to a state file first
    link = Link(plan)
    link.up()                                # namespaces, veths, addresses, qdiscs
    argv = plan.side("prefill").wrap(argv)   # ip netns exec pdtui-<run>-P ...
    link.down()                              # idempotent: every namespace, veth and qdisc gone

Every run's state file (``state_dir()/links/<run>.json``) names what it will create before any
of it exists and its owner (pid and start time). ``clean_stale()`` tears down the links of owners
that are gone (a pdtui killed with SIGKILL); ``reserve()`` runs it first, so does the reaper once
its pdtui is gone, and so does ``pdtui link clean``.

Addresses come from 198.18.0.0/15 (RFC 2544: set aside for benchmarking network devices), one
/24 per run: in the root namespace only the two /30s of the proxy's paths; the shaped link's
addresses exist only inside the run's namespaces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdtui.core.paths import state_dir

LOOPBACK = "loopback"
PRESETS: dict[str, float] = {"1gbit": 1e9, "10gbit": 10e9, "25gbit": 25e9, "100gbit": 100e9}
"""The named links: a rate each way, no delay or loss added (the veth's own RTT, tens of
microseconds here, is all there is)."""
RATE_UNITS: dict[str, float] = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
TIME_UNITS: dict[str, float] = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
MAX_RATE_BPS = 400e9
MIN_RATE_BPS = 1e6
NS_PREFIX = "pdtui-"
PROBE_PREFIX = "pdtui-probe-"
BLOCK = ipaddress.ip_network("198.18.0.0/15")
"""RFC 2544's benchmarking block: 512 /24s, one per run."""
COMMAND_TIMEOUT_S = 10.0
CLEAN_COMMAND = "pdtui link clean"


class LinkSpecError(ValueError):
    """A link spec that cannot be read; the message says what is wrong and what is accepted."""


class LinkError(RuntimeError):
    """A link that could not be made (or torn down): the command, and what it said."""


SPEC_HELP = ("loopback, 1gbit, 10gbit, 25gbit, 100gbit, or rate=RATE[,rtt=TIME][,loss=PCT%]"
             " (e.g. rate=2.5gbit,rtt=1ms,loss=0.1%; RATE in bit, kbit, mbit, gbit; TIME in us, ms, s)")


@dataclass(frozen=True)
class LinkSpec:
    """What the link between P and D is: its rate each way, its round-trip time and its loss."""

    text: str
    """The spec as written (normalized): its name in the header, the bench and the records."""
    rate_bps: float | None
    """Bits per second each way; None: loopback (no namespaces, today's path)."""
    rtt_s: float = 0.0
    """Round-trip time added (netem delay of half of it each way)."""
    loss: float = 0.0
    """Fraction of packets dropped each way (netem loss)."""

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """``loopback``, a preset (``1gbit`` ... ``100gbit``) or ``rate=...,rtt=...,loss=...%``."""
        raw = text.strip().lower()
        if raw in ("", LOOPBACK, "lo", "none"):
            return cls(LOOPBACK, None)
        if raw in PRESETS:
            return cls(raw, PRESETS[raw])
        if "=" not in raw:
            try:  # a bare rate: "2.5gbit"
                rate = parse_rate(raw)
            except LinkSpecError as e:
                raise LinkSpecError(f"link {text!r}: {e}; expected {SPEC_HELP}") from None
            return cls(raw, rate)
        seen: dict[str, str] = {}
        for part in raw.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise LinkSpecError(f"link {text!r}: {part.strip()!r} is not key=value; expected {SPEC_HELP}")
            if key not in ("rate", "rtt", "loss"):
                raise LinkSpecError(f"link {text!r}: unknown key {key!r} (rate, rtt, loss); expected {SPEC_HELP}")
            if key in seen:
                raise LinkSpecError(f"link {text!r}: {key} given twice")
            seen[key] = value
        if "rate" not in seen:
            raise LinkSpecError(f"link {text!r}: rate= is required (a link has a rate); expected {SPEC_HELP}")
        try:
            rate = parse_rate(seen["rate"])
            rtt = parse_time(seen["rtt"]) if "rtt" in seen else 0.0
            loss = parse_loss(seen["loss"]) if "loss" in seen else 0.0
        except LinkSpecError as e:
            raise LinkSpecError(f"link {text!r}: {e}") from None
        norm = ",".join(f"{k}={seen[k]}" for k in ("rate", "rtt", "loss") if k in seen)
        return cls(norm, rate, rtt, loss)

    @property
    def emulated(self) -> bool:
        """Namespaces and a shaped veth (anything but loopback)."""
        return self.rate_bps is not None

    @property
    def needs_netem(self) -> bool:
        return self.rtt_s > 0 or self.loss > 0

    def describe(self) -> str:
        """``1 Gbit/s``, ``2.5 Gbit/s, RTT 1 ms, loss 0.1%``, ``loopback``."""
        if self.rate_bps is None:
            return LOOPBACK
        out = rate_words(self.rate_bps)
        if self.rtt_s:
            out += f", RTT {time_words(self.rtt_s)}"
        if self.loss:
            out += f", loss {self.loss * 100:g}%"
        return out

    def transfer_s(self, nbytes: int) -> float | None:
        """The formula: bytes / rate + RTT (None on loopback: no rate to divide by)."""
        if self.rate_bps is None:
            return None
        return nbytes * 8 / self.rate_bps + self.rtt_s

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "rate_bps": self.rate_bps, "rtt_s": self.rtt_s, "loss": self.loss}


def parse_rate(value: str) -> float:
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z/]*)", value.strip().lower())
    if not m:
        raise LinkSpecError(f"rate {value!r}: a number and a unit, e.g. 2.5gbit")
    number, unit = float(m.group(1)), m.group(2)
    if unit in ("bps", "kbps", "mbps", "gbps", "tbps", "gbit/s", "mbit/s"):
        hint = unit.replace("bps", "bit").replace("bit/s", "bit")
        raise LinkSpecError(f"rate {value!r}: write {number:g}{hint} (tc reads '{unit}' as bytes per second,"
                            " so pdtui takes bits only: bit, kbit, mbit, gbit, tbit)")
    if unit not in RATE_UNITS:
        raise LinkSpecError(f"rate {value!r}: unknown unit {unit or '(none)'!r}; use bit, kbit, mbit, gbit or tbit")
    bps = number * RATE_UNITS[unit]
    if not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
        raise LinkSpecError(f"rate {value!r}: {rate_words(bps)} is outside {rate_words(MIN_RATE_BPS)} to"
                            f" {rate_words(MAX_RATE_BPS)}")
    return bps


def parse_time(value: str) -> float:
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(us|ms|s)", value.strip().lower())
    if not m:
        raise LinkSpecError(f"rtt {value!r}: a number and a unit (us, ms, s), e.g. 1ms")
    s = float(m.group(1)) * TIME_UNITS[m.group(2)]
    if s > 10.0:
        raise LinkSpecError(f"rtt {value!r}: over 10 s")
    return s


def parse_loss(value: str) -> float:
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%", value.strip())
    if not m:
        raise LinkSpecError(f"loss {value!r}: a percentage with its %, e.g. 0.1%")
    pct = float(m.group(1))
    if pct >= 100:
        raise LinkSpecError(f"loss {value!r}: must be under 100%")
    return pct / 100


def rate_words(bps: float) -> str:
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g} {unit}"
    return f"{bps:g} bit/s"


def time_words(s: float) -> str:
    if s >= 1:
        return f"{s:g} s"
    if s >= 1e-3:
        return f"{s * 1e3:g} ms"
    return f"{s * 1e6:g} us"


# ----- the plan: names and addresses of one run's link -----------------------------------------


@dataclass(frozen=True)
class Side:
    """One end of the link: a namespace, the shaped veth's end in it, and the proxy's path to it."""

    role: str
    """prefill or decode."""
    letter: str
    """P or D."""
    netns: str
    link_dev: str
    """The shaped veth's end in this namespace: NIXL's UCX is put on it (UCX_NET_DEVICES)."""
    link_addr: str
    """Its address: the NIXL side channel's host (VLLM_NIXL_SIDE_CHANNEL_HOST)."""
    admin_dev: str
    """The unshaped veth's end in this namespace."""
    admin_addr: str
    """The engine's HTTP address: the proxy and the scrapers reach it here."""
    root_dev: str
    """The unshaped veth's end in the root namespace."""
    root_addr: str

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The command line run inside this side's namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass(frozen=True)
class LinkPlan:
    """Everything one run's link is made of, named before it exists (written to its state file)."""

    run_id: str
    index: int
    """Which /24 of BLOCK the run's addresses come from."""
    spec: LinkSpec
    prefill: Side
    decode: Side

    @property
    def sides(self) -> tuple[Side, Side]:
        return (self.prefill, self.decode)

    def side(self, role: str) -> Side:
        if role == "prefill":
            return self.prefill
        if role == "decode":
            return self.decode
        raise KeyError(f"a link has a prefill and a decode side, not {role!r}")

    @property
    def namespaces(self) -> tuple[str, str]:
        return (self.prefill.netns, self.decode.netns)

    @property
    def root_devs(self) -> tuple[str, str]:
        return (self.prefill.root_dev, self.decode.root_dev)

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "index": self.index, "spec": self.spec.to_json(),
                "prefill": dataclasses.asdict(self.prefill), "decode": dataclasses.asdict(self.decode)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LinkPlan:
        s = data["spec"]
        return cls(data["run_id"], int(data["index"]), LinkSpec(s["text"], s["rate_bps"], s["rtt_s"], s["loss"]),
                   Side(**data["prefill"]), Side(**data["decode"]))


def plan(spec: LinkSpec, run_id: str, index: int) -> LinkPlan:
    """The names and addresses of run ``run_id``'s link in /24 number ``index`` (pure).

    Device names fit Linux's 15 characters: ``pdl<run>P`` (the shaped veth in P's namespace),
    ``pda<run>P`` (the proxy's path, P's end), ``pdr<run>P`` (its root end)."""
    if not re.fullmatch(r"[0-9a-z]{1,8}", run_id):
        raise ValueError(f"run id {run_id!r}: 1 to 8 lowercase letters or digits")
    if not 0 <= index < BLOCK.num_addresses // 256:
        raise ValueError(f"index {index}: 0 to {BLOCK.num_addresses // 256 - 1}")
    base = int(BLOCK.network_address) + index * 256

    def at(n: int) -> str:
        return str(ipaddress.ip_address(base + n))

    def side(role: str, letter: str, link_n: int, root_n: int) -> Side:
        return Side(role, letter, f"{NS_PREFIX}{run_id}-{letter}", f"pdl{run_id}{letter}", at(link_n),
                    f"pda{run_id}{letter}", at(root_n + 1), f"pdr{run_id}{letter}", at(root_n))

    # x.x.x.0/30: the shaped link (.1 P, .2 D); .4/30: the proxy to P (.5 root, .6 P); .8/30: to D
    return LinkPlan(run_id, index, spec, side("prefill", "P", 1, 5), side("decode", "D", 2, 9))


PREFIX_LEN = 30


# ----- commands (pure: the unit tests read them) -----------------------------------------------


def up_commands(p: LinkPlan) -> list[list[str]]:
    """Create the namespaces, the three veth pairs, their addresses, bring them up, and shape."""
    cmds: list[list[str]] = []
    for s in p.sides:
        cmds.append(["ip", "netns", "add", s.netns])
    for s in p.sides:
        cmds.append(["ip", "-n", s.netns, "link", "set", "lo", "up"])
        cmds.append(["ip", "link", "add", s.root_dev, "type", "veth", "peer", "name", s.admin_dev, "netns", s.netns])
    cmds.append(["ip", "link", "add", "name", p.prefill.link_dev, "netns", p.prefill.netns, "type", "veth",
                 "peer", "name", p.decode.link_dev, "netns", p.decode.netns])
    for s in p.sides:
        cmds += [
            ["ip", "addr", "add", f"{s.root_addr}/{PREFIX_LEN}", "dev", s.root_dev],
            ["ip", "-n", s.netns, "addr", "add", f"{s.admin_addr}/{PREFIX_LEN}", "dev", s.admin_dev],
            ["ip", "-n", s.netns, "addr", "add", f"{s.link_addr}/{PREFIX_LEN}", "dev", s.link_dev],
            ["ip", "link", "set", s.root_dev, "up"],
            ["ip", "-n", s.netns, "link", "set", s.admin_dev, "up"],
            ["ip", "-n", s.netns, "link", "set", s.link_dev, "up"],
        ]
    return cmds + shape_commands(p, p.spec)


def burst_bytes(rate_bps: float) -> int:
    """htb's bucket: 1 ms at the rate, at least 64 KiB (a whole GSO packet). Measured on this box's
    veth (results/2026-12-07-link): htb's default bucket (1375 B at 1gbit) read 2.01 Gbit/s of 2.5,
    1 ms's read 2.40."""
    return max(65536, int(rate_bps / 8 * 1e-3))


def netem_limit(spec: LinkSpec) -> int:
    """netem's queue in packets: twice what the delay holds at the rate in 1500-byte packets, at
    least netem's default of 1000 (a full queue drops: loss nobody asked for)."""
    if spec.rate_bps is None:
        return 1000
    return max(1000, int(2 * spec.rate_bps / 8 * spec.rtt_s / 2 / 1500) + 1)


def shape_commands(p: LinkPlan, spec: LinkSpec) -> list[list[str]]:
    """The qdiscs on both ends of the shaped veth (egress each way): htb at the rate, netem under
    it for the delay (RTT/2 each way) and the loss. Loopback: none (an unshaped veth)."""
    if spec.rate_bps is None:
        return []
    rate = f"{int(spec.rate_bps)}bit"
    burst = str(burst_bytes(spec.rate_bps))
    cmds: list[list[str]] = []
    for s in (p.prefill, p.decode):
        tc = ["tc", "-n", s.netns]
        cmds.append([*tc, "qdisc", "add", "dev", s.link_dev, "root", "handle", "1:", "htb", "default", "1"])
        cmds.append([*tc, "class", "add", "dev", s.link_dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate,
                     "ceil", rate, "burst", burst, "cburst", burst, "quantum", "200000"])
        if spec.needs_netem:
            netem = [*tc, "qdisc", "add", "dev", s.link_dev, "parent", "1:1", "handle", "10:", "netem",
                     "limit", str(netem_limit(spec))]
            if spec.rtt_s:
                netem += ["delay", f"{max(1, round(spec.rtt_s / 2 * 1e6))}us"]
            if spec.loss:
                netem += ["loss", f"{spec.loss * 100:g}%"]
            cmds.append(netem)
    return cmds


def unshape_commands(p: LinkPlan) -> list[list[str]]:
    return [["tc", "-n", s.netns, "qdisc", "del", "dev", s.link_dev, "root"] for s in p.sides]


def down_commands(p: LinkPlan) -> list[list[str]]:
    """Delete the veths (a veth's peer goes with it, a qdisc with its device), then the namespaces.
    Each may find its object gone already: teardown runs on every path, more than once."""
    cmds = [["ip", "link", "del", s.root_dev] for s in p.sides]
    cmds.append(["ip", "-n", p.prefill.netns, "link", "del", p.prefill.link_dev])
    cmds += [["ip", "netns", "del", s.netns] for s in p.sides]
    return cmds


_GONE = ("cannot find device", "no such file or directory", "does not exist", "not found",
         "cannot open network namespace", "invalid handle", "cannot delete qdisc with handle of zero")


def _gone(stderr: str) -> bool:
    low = stderr.lower()
    return any(g in low for g in _GONE)


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def run_command(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run one ip/tc command, bounded; its output captured."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {COMMAND_TIMEOUT_S:.0f} s")
    except FileNotFoundError as e:
        return subprocess.CompletedProcess(cmd, 127, "", f"{e.filename}: not found ({IPROUTE2_HINT})")


IPROUTE2_HINT = "the link needs iproute2's ip and tc: apt-get install iproute2 (make install does it as root)"


# ----- state files ----------------------------------------------------------------------------


def links_dir(root: Path | None = None) -> Path:
    return (root or state_dir()) / "links"


def _stat(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat's fields after the command name (state first), None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2:].split()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): a pid with
    another start time is another process."""
    fields = _stat(pid)
    return fields[19].decode() if fields else None


PF_EXITING = 0x4


def owner_alive(owner: dict[str, Any], gone: Sequence[int] = ()) -> bool:
    """The process that made a link still runs: same pid, same start time, neither a zombie nor on
    its way out (PF_EXITING). ``gone``: pids known to be gone (the reaper's pdtui)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid in gone:
        return False
    fields = _stat(pid)
    if fields is None or fields[19].decode() != owner.get("start"):
        return False
    return fields[0] not in (b"Z", b"X") and not int(fields[6]) & PF_EXITING


@contextlib.contextmanager
def _locked(root: Path | None) -> Any:
    d = links_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _state_files(d: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    out: list[tuple[Path, dict[str, Any] | None]] = []
    for path in sorted(d.glob("*.json")):
        try:
            out.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            out.append((path, None))
    return out


def root_addresses(runner: Runner = run_command) -> set[str]:
    """Every IPv4 address in the root namespace (``ip -4 -o addr``)."""
    r = runner(["ip", "-4", "-o", "addr", "show"])
    return set(re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", r.stdout)) if r.returncode == 0 else set()


def reserve(spec: LinkSpec, *, root: Path | None = None, runner: Runner = run_command,
            run_id: str | None = None, owner_pid: int | None = None) -> LinkPlan:
    """Pick this run's names and /24 and write its state file, before anything is created.
    Links left by a pdtui that is gone are torn down first (``clean_stale``)."""
    clean_stale(root=root, runner=runner)
    pid = owner_pid or os.getpid()
    with _locked(root) as d:
        used = {int(data["plan"]["index"]) for _, data in _state_files(d) if data and "plan" in data}
        taken = root_addresses(runner)
        slots = BLOCK.num_addresses // 256
        start = random.randrange(slots)  # runs of other state folders rarely pick the same block
        for k in range(slots):
            index = (start + k) % slots
            if index in used:
                continue
            rid = run_id or secrets.token_hex(3)
            p = plan(spec, rid, index)
            if any(a in taken for s in p.sides for a in (s.root_addr, s.admin_addr)):
                continue
            state = {"plan": p.to_json(), "owner": {"pid": pid, "start": _start_time(pid)},
                     "created": time.time(), "up": False}
            path = d / f"{rid}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(path)
            return p
        raise LinkError(f"no free address block in {BLOCK}: {len(used)} runs hold one ({d}); `{CLEAN_COMMAND}`"
                        " removes those of runs that are gone")


def release(p: LinkPlan, root: Path | None = None) -> None:
    """Forget a run's state file (its link is down)."""
    with contextlib.suppress(FileNotFoundError):
        (links_dir(root) / f"{p.run_id}.json").unlink()


def netns_pids(netns: str, runner: Runner = run_command) -> list[int]:
    r = runner(["ip", "netns", "pids", netns])
    return [int(x) for x in r.stdout.split() if x.isdigit()] if r.returncode == 0 else []


def teardown(p: LinkPlan, runner: Runner = run_command, kill_timeout_s: float = 5.0) -> list[str]:
    """Remove a link, whatever is left of it: processes still in its namespaces are killed first
    (a namespace lives on, with its veths, while a process holds it), then the veths, then the
    namespaces. Returns the errors other than "already gone"."""
    deadline = time.monotonic() + kill_timeout_s
    for ns in p.namespaces:
        while pids := netns_pids(ns, runner):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    errors = []
    for cmd in down_commands(p):
        r = runner(cmd)
        if r.returncode != 0 and not _gone(r.stderr):
            errors.append(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return errors


def leftovers(p: LinkPlan, runner: Runner = run_command) -> list[str]:
    """What of the link still exists: its namespaces, its root veth ends."""
    out = []
    r = runner(["ip", "netns", "list"])
    names = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    out += [f"namespace {ns}" for ns in p.namespaces if ns in names]
    for dev in p.root_devs:
        if runner(["ip", "link", "show", dev]).returncode == 0:
            out.append(f"veth {dev}")
    return out


def clean_stale(*, root: Path | None = None, runner: Runner = run_command, gone: Sequence[int] = ()) -> list[str]:
    """Tear down every link whose owner is gone (a pdtui killed with SIGKILL, a crash), and remove
    their state files; probe namespaces of preflights that are gone too. Returns what was removed,
    in words. Links of live owners are left alone (``gone``: pids to take as gone whatever /proc
    says: the reaper's pdtui, which may not be reaped yet)."""
    removed: list[str] = []
    with _locked(root) as d:
        for path, data in _state_files(d):
            if data is None:
                path.unlink(missing_ok=True)
                removed.append(f"unreadable state file {path.name}")
                continue
            if owner_alive(data.get("owner", {}), gone):
                continue
            try:
                p = LinkPlan.from_json(data["plan"])
            except (KeyError, TypeError, ValueError):
                path.unlink(missing_ok=True)
                removed.append(f"unreadable state file {path.name}")
                continue
            found = leftovers(p, runner)
            errors = teardown(p, runner)
            if errors:
                raise LinkError(f"could not remove the link of gone run {p.run_id} (pid {data['owner'].get('pid')}):"
                                f" {'; '.join(errors)}")
            path.unlink(missing_ok=True)
            if found:
                removed.append(f"run {p.run_id} (pid {data['owner'].get('pid')}, gone): {', '.join(found)}")
    r = runner(["ip", "netns", "list"])
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(re.escape(PROBE_PREFIX) + r"(\d+)-[0-9a-f]+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            runner(["ip", "netns", "del", name])
            removed.append(f"preflight probe namespace {name}")
    return removed


def orphans(root: Path | None = None, runner: Runner = run_command) -> list[str]:
    """``pdtui-`` namespaces that no state file in this state folder names (another state folder's,
    PDTUI_HOME, or a state file removed by hand): not ours to remove, but worth a word."""
    known: set[str] = set()
    d = links_dir(root)
    if d.exists():
        for _, data in _state_files(d):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                known.update(LinkPlan.from_json(data["plan"]).namespaces if data else ())
    r = runner(["ip", "netns", "list"])
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(NS_PREFIX) and not n.startswith(PROBE_PREFIX) and n not in known]


# ----- the link of a run ------------------------------------------------------------------------


class Link:
    """One run's link: ``up()`` creates it from its plan, ``reshape()`` changes its rate, delay and
    loss in place, ``down()`` removes it (idempotent, and also what ``clean_stale`` does for a run
    that is gone)."""

    def __init__(self, p: LinkPlan, *, root: Path | None = None, runner: Runner = run_command) -> None:
        self.plan = p
        self.spec = p.spec
        self.root = root
        self._run = runner
        self.is_up = False

    def _check(self, cmds: list[list[str]]) -> None:
        for cmd in cmds:
            r = self._run(cmd)
            if r.returncode != 0:
                raise LinkError(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or f'exit {r.returncode}'}"
                                + netem_words(r.stderr, cmd))

    def up(self) -> None:
        """Create everything; on any failure, remove what was made and raise LinkError."""
        taken = root_addresses(self._run)
        clash = [a for s in self.plan.sides for a in (s.root_addr, s.admin_addr) if a in taken]
        if clash:
            raise LinkError(f"address {clash[0]} of link {self.plan.run_id} is already in use in the root namespace"
                            f" (another run's? `ip -4 addr | grep {clash[0]}`)")
        try:
            self._check(up_commands(self.plan))
        except BaseException:
            teardown(self.plan, self._run)
            raise
        self.is_up = True

    def reshape(self, spec: LinkSpec) -> None:
        """Another rate/delay/loss on the same veth (loopback: no qdisc at all), between runs."""
        for cmd in unshape_commands(self.plan):
            r = self._run(cmd)
            if r.returncode != 0 and not _gone(r.stderr):
                raise LinkError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")
        self._check(shape_commands(self.plan, spec))
        self.spec = spec

    def down(self) -> None:
        """Remove the link and its state file; safe to call again, or on a link never brought up."""
        errors = teardown(self.plan, self._run)
        self.is_up = False
        if errors:
            raise LinkError(f"the link {self.plan.run_id} was not removed whole: {'; '.join(errors)}."
                            f" `{CLEAN_COMMAND}` removes it once this pdtui has exited")
        release(self.plan, self.root)

    def qdiscs(self) -> dict[str, str]:
        """``tc qdisc show`` of each end of the shaped veth."""
        out = {}
        for s in self.plan.sides:
            r = self._run(["tc", "-n", s.netns, "qdisc", "show", "dev", s.link_dev])
            out[s.link_dev] = r.stdout.strip()
        return out


def netem_words(stderr: str, cmd: Sequence[str]) -> str:
    if "netem" in cmd and "unknown" in stderr.lower():
        return (". This kernel has no netem (CONFIG_NET_SCH_NETEM is off), so a link's rtt and loss cannot be"
                " emulated here; a rate alone can (e.g. 1gbit)")
    return ""


# ----- preflight --------------------------------------------------------------------------------


def check(spec: LinkSpec, runner: Runner = run_command) -> list[str]:
    """What stops this machine from making the link, in words (empty: nothing). Tries what ``up()``
    does, in a throwaway namespace: ``ip netns add`` (root or CAP_NET_ADMIN), a veth pair, htb on
    it, and netem when the spec has an RTT or loss."""
    if not spec.emulated:
        return []
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return [f"{' and '.join(missing)} not found on PATH: {IPROUTE2_HINT}"]
    probe = f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    r = runner(["ip", "netns", "add", probe])
    if r.returncode != 0:
        return [(f"cannot create a network namespace (`ip netns add {probe}`: {r.stderr.strip()}): the link needs"
                 f" root, with CAP_SYS_ADMIN and CAP_NET_ADMIN (ip mounts the namespace; this is uid {os.getuid()})."
                 " Run as root, or without --link")]
    problems = []
    try:
        steps = [["ip", "-n", probe, "link", "add", "pdprobe0", "type", "veth", "peer", "name", "pdprobe1"],
                 ["tc", "-n", probe, "qdisc", "add", "dev", "pdprobe0", "root", "handle", "1:", "htb", "default",
                  "1"]]
        if spec.needs_netem:
            steps.append(["tc", "-n", probe, "qdisc", "add", "dev", "pdprobe1", "root", "netem", "delay", "1ms"])
        for cmd in steps:
            r = runner(cmd)
            if r.returncode != 0:
                what = {"veth": "veth pairs (CONFIG_VETH)", "htb": "htb shaping (CONFIG_NET_SCH_HTB)",
                        "netem": "netem (CONFIG_NET_SCH_NETEM), which the link's rtt and loss need"}
                needs = next(v for k, v in what.items() if k in cmd)
                problems.append(f"this kernel cannot do {needs}: `{' '.join(cmd)}` said {r.stderr.strip()!r}"
                                + (" (a rate alone works: e.g. --link 1gbit)" if "netem" in cmd else ""))
                break
    finally:
        runner(["ip", "netns", "del", probe])
    return problems


__all__ = ["CLEAN_COMMAND", "LOOPBACK", "PRESETS", "Link", "LinkError", "LinkPlan", "LinkSpec", "LinkSpecError",
           "Side", "check", "clean_stale", "leftovers", "plan", "reserve", "teardown"]

"""A process that holds an emulated link (pdtui.core.link), for the exit-path tests.

  link_holder.py link SPEC               reserve and make a link, print its plan (one JSON line), sleep
  link_holder.py runtime SPEC OFFSET     a Runtime over FAKE engines (tests/child_scripts/fake_vllm.py)
                                         in the link's namespaces, behind pdtui's proxy; print "plan" and
                                         the plan, then "ready" once warmed up; SIGTERM: aclose(), exit 0
  link_holder.py fail SPEC OFFSET        the same with a D that exits at once: start() fails; exit 3

The state folder is PDTUI_HOME's (the test gives each its own).
"""

import asyncio
import json
import signal
import sys
from pathlib import Path

from pdtui.core import config as config_mod
from pdtui.core import connectors
from pdtui.core import link as link_mod
from pdtui.core.config import LaunchSpec
from pdtui.core.runtime import Runtime
from pdtui.core.supervisor import StartupFailed
from pdtui.core.topology import Member, ProxyPlan, Topology, proxy_settings

FAKE = str(Path(__file__).with_name("fake_vllm.py"))


def topology(spec: link_mod.LinkSpec, offset: int, dead_decode: bool) -> Topology:
    cfg = config_mod.shift_ports(config_mod.load_profile("cpu"), offset)
    cfg.link = spec.text
    cfg.ready_timeout_s = 30
    cfg.stop_grace_s = 3
    plan = link_mod.reserve(spec)
    members = []
    for inst in cfg.instances:
        side = plan.side(inst.role)
        argv = [sys.executable, FAKE, "--host", side.admin_addr, "--port", str(inst.port), "--role", inst.role]
        if dead_decode and inst.role == "decode":
            argv = [sys.executable, "-c", "import sys; print('fake D exits at once'); sys.exit(3)"]
        launch = LaunchSpec(inst.name, inst.role, side.wrap(argv), {}, f"http://{side.admin_addr}:{inst.port}")
        members.append(Member(inst.name, inst.role, launch.url, launch, inst.port, inst.side_channel_port))
    proxy = ProxyPlan(cfg.host, cfg.proxy_port, proxy_settings(cfg, None), ("P",), ("D",))
    return Topology("pair", cfg, tuple(members), proxy, connectors.NIXL, None, True, "tiny", link=plan)


async def run_runtime(spec: link_mod.LinkSpec, offset: int, dead_decode: bool) -> int:
    topo = topology(spec, offset, dead_decode)
    print("plan " + json.dumps(topo.link.to_json() if topo.link else None), flush=True)
    rt = Runtime(topo, serve_control=False)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await rt.start()
    except StartupFailed as e:
        print(f"start failed: {str(e).splitlines()[0]}", flush=True)
        return 3
    print("ready", flush=True)
    await stop.wait()
    await rt.aclose(reason="SIGTERM")
    print("closed", flush=True)
    return 0


def main() -> int:
    mode, spec = sys.argv[1], link_mod.LinkSpec.parse(sys.argv[2])
    if mode == "link":
        plan = link_mod.reserve(spec)
        link_mod.Link(plan).up()
        print(json.dumps(plan.to_json()), flush=True)
        signal.pause()
        return 0
    return asyncio.run(run_runtime(spec, int(sys.argv[3]), dead_decode=mode == "fail"))


if __name__ == "__main__":
    sys.exit(main())

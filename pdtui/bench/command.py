"""`pdtui bench`: flags -> BenchOptions, rich progress on stderr, Ctrl-C that keeps the data,
then the table, the JSON file, the PNG plots and the terminal histograms."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pdtui.bench import report, runners
from pdtui.bench.runners import (
    ALL_ARMS,
    ARMS,
    DEFAULT_WORKLOADS,
    LINK_ARM,
    WORKLOADS,
    AttachedEngines,
    BenchOptions,
    BenchResult,
    Reporter,
    attached_refusal,
    link_arm,
    run_bench,
)
from pdtui.bench.workload import BIG_PROMPT_LEN, FillSpec, FollowSpec, InterferenceSpec
from pdtui.core import connectors
from pdtui.core.config import ConfigError, PairConfig

DESCRIPTION = """\
Benchmark the P/D pair against one colocated instance, on the same hardware and the same seeded
prompts, in one invocation. The arms run one after another (default single,single-proxied,pair):

  single          one vLLM instance from the same profile (P's port and core/GPU, same model,
                  dtype, block size, max_model_len), chunked prefill on, no KV connector; the
                  client talks to it straight
  single-proxied  the same instance behind pdtui's proxy (a process of its own, no prefill
                  instance: every request relayed as it is), the path the pair is measured
                  through; single-proxied vs single is the proxy's own cost
  pair            P + D + the proxy, exactly as `pdtui up` runs them
  two-single      (optional, --arms ...,two-single) two colocated instances, on P's and on D's
                  port and core/GPU, behind the proxy with no prefill instance, round-robin
                  (vLLM's own fair baseline): the same hardware as the pair
  two-single-least-loaded  (optional) two-single, the proxy picking the instance with fewest
                  requests in flight (as the pair picks D): a load-aware router without P/D
  pair-tokenize-once, pair-first-token, pair-both
                  (optional) the pair with the proxy's TTFT switches on (tokenize_once,
                  first_token_from_p, both): a table gives the toll per arm, the follow TTFT split
                  into steps that add up to it, and the second-token gap, where first-token-from-P
                  moves the hop and D's leg (docs/proxy.md, the TTFT toll)
  pair-least-loaded, pair-round-robin, pair-headroom
                  (optional) the pair under each of the proxy's choices of D (docs/proxy.md,
                  "Choosing D"): with several D (--profile 1p2d-small) and --workloads fill, the
                  report counts per arm the failed requests, D's preemptions and where they went

and each arm gets the same workloads, measured the same way by a streaming client (a process of
its own; the proxy never shares an event loop with the bench's own work):

  follow        one big prompt at a time (default 2031 tokens, unique so prefix caching can't
                help): TTFT, and for the pair the toll split (P prefill, proxy hop, KV transfer +
                D's first step, from the proxy's trace), and ITL
  interference  N steady decode streams (ignore_eos, long max_tokens) while big prompts arrive at
                a fixed rate: the streams' ITL p50/p90/p99/max and the big prompts' TTFT
  fill          (optional, --workloads fill) long streams started one after another and held to
                their end, whose KV fills a decode pool (1p2d-small's first D): per arm the
                failures, D's preemptions (vllm:num_preemptions) and the requests each D took

On CPU every vLLM instance computes on one core (VLLM_CPU_OMP_THREADS_BIND): the single instance
on P's, like each member of the pair. Warm-up is excluded, and it reaches every instance before
anything is measured: each colocated instance first serves one big prompt straight at its own URL
(the pair: its warm-up through the proxy), then the client sends one warm-up request per instance
behind the round-robin through the arm's path. The verdict is stated plainly, also when the pair loses, and names the arms
it compares: the pair is measured through the proxy, so "single" below is single-proxied when
that arm ran (the same path); with only single the report says the comparison crosses paths:
  toll     = pair TTFT p50 / single TTFT p50       (the price of the extra hop and the transfer)
  purchase = single ITL p99 / pair ITL p99         (what the pair buys: decode without prefill stalls)
and with single and single-proxied, the proxy's own cost: their TTFT p50 and ITL p50/p99 deltas.
The samples are checked first: where chunks came in bunches (ITL p50 under 0.5 ms), a p99 has too
few gaps, the max lies far beyond the p99, or a colocated arm's TTFT is 5x the other's on the same
prompts (starved), the report says "cannot tell" and why instead of a ratio (docs/bench.md).

Written to --out: bench.json.gz (gzip JSON: every raw sample, the environment, the flags, the
profile, and the pair's KV bytes checked against D's vllm:nixl_bytes_transferred; `zcat` or
pdtui.bench.report.read_json reads it), itl_hist.png, ttft.png, toll.png, and with --cross-check
vllm bench serve's detailed results (vllm-bench-serve-*.json.gz). The method, the tolerances and
how to read the numbers: docs/bench.md.
Ctrl-C stops the engines and still writes what was measured.

Engines you started yourself (`vllm serve`, here or on other boxes): --prefill URL --decode URL
makes the pair arms that pair behind pdtui's proxy, built and checked as `pdtui attach` does
(refused before anything is sent, naming the field, exit 2); --single URL (a colocated vLLM with
no KV connector, the same model and settings) is the engine of single and single-proxied. Only
the arms those engines can run are allowed (two-single needs engines pdtui starts). pdtui starts,
pins and stops none of them: the report says so, with their URLs and the vLLM they report. The
engines keep their prefix caches from arm to arm, so each arm's prompts carry its name and a nonce
of the run; the rest (the warm-ups, the traces, the KV bytes against D's /metrics) is as above.
"""

EPILOG = """\
examples:
  pdtui bench --quick                          CPU-friendly: small counts, 2 to 3 minutes on 2 cores
  pdtui bench --port-offset 20000 --quick      beside another pair (ports 28000, 28100, 28200, ...)
  pdtui bench --quick --arms single,single-proxied,pair,two-single
  pdtui bench --arms pair --workloads follow --requests 20
  pdtui bench --quick --links loopback,100gbit,25gbit,10gbit,1gbit    the pair re-priced per link (root)
  pdtui bench --profile one-gpu --model Qwen/Qwen2.5-0.5B-Instruct --out runs/l4
  pdtui bench --profile 1p2d-small --workloads fill --arms pair-round-robin,pair-least-loaded,pair-headroom
  pdtui bench --quick --arms single-proxied,pair@nixl,pair@nixl-push,pair@storage,pair@multi   the transports
  pdtui bench --quick --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 \
      --single http://127.0.0.1:8300           engines you started: single, single-proxied, pair
"""

QUICK = {"requests": 3, "streams": 2, "duration": 10.0, "rate": 0.3, "stream_max_tokens": 512, "max_tokens": 32}
_F, _I = FollowSpec(), InterferenceSpec()
FULL = {"requests": _F.requests, "streams": _I.streams, "duration": _I.duration_s, "rate": _I.rate,
        "stream_max_tokens": _I.stream_max_tokens, "max_tokens": _F.max_tokens}
"""The defaults without --quick: the workload specs' own."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to run")
    g.add_argument("--arms", default=None,
                   help=f"comma-separated, in order, of {', '.join(ALL_ARMS)} (default {','.join(ARMS)};"
                   " over engines given by URL, those of them that can run), and pair@KEY: the pair over connector"
                   f" KEY ({', '.join(connectors.CONNECTORS)}; docs/connectors.md): one transport table")
    g.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                   help=f"comma-separated, of {', '.join(WORKLOADS)} (default {','.join(DEFAULT_WORKLOADS)})")
    g.add_argument("--quick", action="store_true",
                   help="small CPU-friendly defaults: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    g.add_argument("--cross-check", action="store_true",
                   help="after each arm's workloads, run `vllm bench serve` against it in each workload's"
                   " shape (follow: random prompts one at a time; interference: the streams' run and a timed"
                   " trace of the big prompts, at once) and mark each statistic agree/disagree within the"
                   " stated tolerances (docs/bench.md); adds ~1 min per arm on CPU")
    g.add_argument("--seed", type=int, default=0, help="prompt seed; the same seed gives the same prompts (default 0)")
    g.add_argument("--links", default=None, metavar="LINK[,LINK...]",
                   help="re-price the pair per link: the pair arm runs once over each (pair~LINK: loopback, 1gbit,"
                   " 10gbit, 25gbit, 100gbit, rate=RATE[;rtt=TIME]...; P and D in namespaces joined by a veth shaped"
                   " with tc, root needed; docs/link.md), beside the single arms; the report's link table gives"
                   " the KV read against bytes / rate + RTT, toll and purchase per link, the break-even rate, and"
                   " the 8B shape's transfer at each rate (computed)")
    g = p.add_argument_group("follow")
    g.add_argument("--requests", type=int, default=None, help=f"measured requests (default {FULL['requests']})")
    g.add_argument("--prompt-len", type=int, default=BIG_PROMPT_LEN,
                   help=f"tokens per big prompt, follow and interference (default {BIG_PROMPT_LEN})")
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens per follow request (default {FULL['max_tokens']})")
    g = p.add_argument_group("interference")
    g.add_argument("--streams", type=int, default=None, help=f"steady decode streams (default {FULL['streams']})")
    g.add_argument("--duration", type=float, default=None,
                   help=f"seconds of big-prompt arrivals (default {FULL['duration']:.0f})")
    g.add_argument("--rate", type=float, default=None, help=f"big prompts per second (default {FULL['rate']})")
    g.add_argument("--stream-max-tokens", type=int, default=None,
                   help=f"max_tokens of a steady stream; it restarts when done (default {FULL['stream_max_tokens']})")
    g.add_argument("--big-max-tokens", type=int, default=16, help="max_tokens of a big prompt (default 16)")
    g.add_argument("--warmup-s", type=float, default=2.0,
                   help="streams run this long before the window opens (default 2)")
    g = p.add_argument_group("fill (the routing arms' load)")
    _fill = FillSpec()
    g.add_argument("--fill-requests", type=int, default=_fill.requests,
                   help=f"long streams, each held to its end (default {_fill.requests})")
    g.add_argument("--fill-prompt-len", type=int, default=_fill.prompt_len,
                   help=f"tokens per fill prompt (default {_fill.prompt_len})")
    g.add_argument("--fill-max-tokens", type=int, default=_fill.max_tokens,
                   help=f"tokens each fill stream makes (default {_fill.max_tokens})")
    g.add_argument("--fill-interval", type=float, default=_fill.interval_s,
                   help=f"seconds between two fill streams' starts (default {_fill.interval_s:g})")
    g = p.add_argument_group("engines you started (pdtui launches nothing; checked as by `pdtui attach`)")
    g.add_argument("--prefill", action="append", default=[], metavar="URL[,URL...]",
                   help="the pair's prefill engines (named P, or P1, P2, ...); with --decode: the pair arms")
    g.add_argument("--decode", action="append", default=[], metavar="URL[,URL...]",
                   help="the pair's decode engines (named D, or D1, D2, ...)")
    g.add_argument("--single", default=None, metavar="URL",
                   help="a colocated vLLM with no KV connector, the same model and settings: the single arms'")
    g.add_argument("--model-name", default=None,
                   help="the model name to send (default: the one every engine serves, /v1/models)")
    g.add_argument("--block-size", type=int, default=None,
                   help="KV block size, when the engines do not report it (vllm:cache_config_info)")
    g.add_argument("--decode-reports-cached", action="store_true",
                   help="D runs with --enable-prompt-tokens-details: check every paired request for a silent"
                   " recompute (as pdtui attach's flag)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None,
                   help="directory for bench.json.gz and the PNGs (default bench-runs/<time>)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG and terminal plots")


def chosen_arms(args: argparse.Namespace, over: tuple[bool, bool] | None = None) -> tuple[str, ...]:
    """--arms, each a known arm, or the default. ``over``: engines given by URL, (a pair, a single):
    the default is then the default arms they can run, and an arm they cannot run is refused with
    the reason (ConfigError: exit 2, before anything is sent to them)."""
    if args.arms is None:
        arms = ARMS if over is None else tuple(a for a in ARMS if attached_refusal(a, pair=over[0], single=over[1]) is None)
    else:
        arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    links = parse_links(getattr(args, "links", None))
    if links:
        if over is not None:
            raise ConfigError("--links: the link is made by pdtui around engines it starts, not engines given by URL")
        # the pair arm, once per link, where it stood (or last)
        at = arms.index("pair") if "pair" in arms else len(arms)
        arms = (*arms[:at], *(link_arm(x) for x in links), *arms[at + 1:])
    bad = [why for x in arms if (why := runners.arm_problem(x))]
    if bad or not arms:
        raise ConfigError(f"--arms {','.join(arms)}: {'; '.join(bad) or 'none given'}; each must be one of"
                          f" {', '.join(ALL_ARMS)}, or a pair arm over a connector: pair@KEY (KEY one of"
                          f" {', '.join(connectors.CONNECTORS)}; docs/connectors.md), or over a link: {LINK_ARM}LINK"
                          " (which --links makes)")
    refused = [why for a in arms if over is not None and (why := attached_refusal(a, pair=over[0], single=over[1]))]
    if refused:
        raise ConfigError(f"--arms {','.join(arms)}: " + "; ".join(refused))
    return arms


def parse_links(text: str | None) -> tuple[str, ...]:
    """--links: each a link pdtui can read (pdtui.core.link.LinkSpec), as normalized; a bad one is a
    ConfigError (exit 2) before anything starts. A custom link's commas are written as semicolons
    in the list (rate=2.5gbit;rtt=1ms)."""
    if not text:
        return ()
    from pdtui.core import link

    out = []
    for part in text.split(","):
        part = part.strip().replace(";", ",")
        if not part:
            continue
        try:
            out.append(link.LinkSpec.parse(part).text)
        except link.LinkSpecError as e:
            raise ConfigError(f"--links: {e}") from None
    if len(set(out)) != len(out):
        raise ConfigError(f"--links {text}: a link given twice")
    return tuple(out)


def check_links(cfg: PairConfig, links: tuple[str, ...]) -> None:
    """Every emulated link of --links can be made here and carries this profile's pair (one P and one
    D, no traces_port): refused before anything starts, with the reason."""
    import dataclasses

    from pdtui.core import config as config_mod
    from pdtui.core import link

    for text in links:
        spec = link.LinkSpec.parse(text)
        if not spec.emulated:
            continue
        config_mod.validate(dataclasses.replace(cfg, link=text, sources={**cfg.sources, "link": "--links"}))
        problems = link.check(spec)
        if problems:
            raise ConfigError(f"--links {text}: " + "; ".join(problems))


def options_from_args(args: argparse.Namespace, engines: AttachedEngines | None = None) -> BenchOptions:
    """The options of a run; ``engines``: engines given by URL, every arm over them (an arm they
    cannot run is refused with the reason, and without --arms the default arms they can run)."""
    base = QUICK if args.quick else FULL

    def pick(name: str) -> Any:
        v = getattr(args, name)
        return base[name] if v is None else v

    over = None if engines is None else (bool(engines.prefills and engines.decodes), engines.single is not None)
    arms = chosen_arms(args, over)
    workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    bad = [x for x in workloads if x not in WORKLOADS]
    if bad or not workloads:
        raise ConfigError(f"--workloads {','.join(workloads)}: each must be one of {', '.join(WORKLOADS)}")
    return BenchOptions(
        arms=arms,
        workloads=workloads,
        follow=FollowSpec(requests=pick("requests"), prompt_len=args.prompt_len, max_tokens=pick("max_tokens")),
        interference=InterferenceSpec(streams=pick("streams"), duration_s=pick("duration"), rate=pick("rate"),
                                      prompt_len=args.prompt_len, big_max_tokens=args.big_max_tokens,
                                      stream_max_tokens=pick("stream_max_tokens"), warmup_s=args.warmup_s),
        fill=FillSpec(requests=args.fill_requests, prompt_len=args.fill_prompt_len, max_tokens=args.fill_max_tokens,
                      interval_s=args.fill_interval),
        seed=args.seed,
        cross_check=args.cross_check,
        engines=engines,
    )


class RichReporter(Reporter):
    """A spinner line per phase and a bar per workload, on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.prog = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                             TaskProgressColumn(), TimeElapsedColumn(),
                             console=self.console, transient=False)
        self.prog.start()
        self.tasks: dict[tuple[str, str], Any] = {}
        self.phase_task: dict[str, Any] = {}

    def phase(self, arm: str, text: str) -> None:
        if arm not in self.phase_task:
            self.phase_task[arm] = self.prog.add_task(f"[bold]{arm}[/]: {text}", total=None)
        self.prog.update(self.phase_task[arm], description=f"[bold]{arm}[/]: {text}")
        if text == "stopping" or text.startswith("pair ready") or " ready " in f" {text} ":
            self.console.log(f"{arm}: {text}")

    def progress(self, arm: str, what: str, done: float, total: float) -> None:
        key = (arm, what)
        if key not in self.tasks:
            self.tasks[key] = self.prog.add_task(f"{arm} {what}", total=total)
        self.prog.update(self.tasks[key], completed=done, total=total)

    def done(self) -> None:
        self.prog.stop()


def run(cfg: PairConfig, args: argparse.Namespace, engines: AttachedEngines | None = None) -> int:
    """The bench of ``cfg``'s arms, or of the arms over ``engines`` given by URL (``cfg``: theirs)."""
    opts = options_from_args(args, engines)
    if engines is None:
        check_links(cfg, parse_links(getattr(args, "links", None)))
    out = args.out or Path("bench-runs") / time.strftime("%Y%m%d-%H%M%S")
    opts.out_dir = out
    result = BenchResult(flags={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    code = asyncio.run(_main(cfg, opts, result))
    data = report.to_json(result)
    path = report.write_json(data, out / "bench.json.gz")
    summaries = {a: d["summary"] for a, d in data["arms"].items()}
    print(report.table(summaries))
    if data.get("placement"):
        print("\n" + data["placement"])
    for name, arm in data["arms"].items():
        if arm.get("kv_bytes"):
            kb = arm["kv_bytes"]
            counted = {"nixl-push": "P's nixl_bytes_transferred", "storage": "D's external_kv_transfer tokens x bytes"
                       }.get(arm.get("connector") or "", "D's nixl_bytes_transferred")
            print(f"\n{name}: KV bytes of {kb['requests']} requests: traces {kb['trace_kv_bytes']:,} B,"
                  f" {counted} +{(kb['d_metric_delta'] or 0):,.0f} B:"
                  f" {'match' if kb['match'] else 'MISMATCH'}; formula {'ok' if kb['formula_ok'] else 'NOT ok'}")
        for note in arm.get("notices") or []:
            if note.startswith(("warning", "error")):
                print(f"{name}: {note}")
        routed = arm["summary"].get("routing") or {}
        if routed.get("requests") and (name in report.ROUTING_ARMS or arm["summary"].get("fill")):
            print(f"\n{name}: {report.routing_line(routed)}")
        rc = arm["summary"].get("recompute") or {}
        if rc.get("checked"):
            print(f"\n{name}: silent recompute: {rc['recomputed']} of {rc['checked']} paired requests had D compute"
                  f" more than one block of the prompt ({rc['d_computed_tokens']:,} prompt tokens computed on D)"
                  + (f": {', '.join(rc['request_ids'][:5])}" if rc["recomputed"] else ""))
        if arm.get("error"):
            print(f"\n{name}: ERROR {arm['error']}")
    if not args.no_plots and data["arms"]:
        try:
            print("\n" + report.terminal_histograms(data, color=sys.stdout.isatty()))
            pngs = report.plots(data, out)
            print("\nplots: " + ", ".join(str(p) for p in pngs))
        except Exception as e:  # noqa: BLE001 - plots are a bonus: never lose the JSON for them
            print(f"plots failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"raw samples: {path} (gzip JSON: zcat {path} | head -c 2000)"
          + ("  (interrupted: partial)" if result.interrupted else ""))
    return code


async def _main(cfg: PairConfig, opts: BenchOptions, result: BenchResult) -> int:
    from pdtui.core.supervisor import PortInUse, StartupFailed

    reporter = RichReporter()
    task = asyncio.create_task(run_bench(cfg, opts, result, reporter))
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        result.interrupted = True
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, interrupt)
    try:
        await task
        return 0
    except asyncio.CancelledError:
        stopped = "engines stopped" if opts.engines is None else "pdtui's proxy stopped, your engines run on"
        print(f"pdtui bench: interrupted; {stopped}, writing what was measured", file=sys.stderr)
        return 130
    except (StartupFailed, PortInUse) as e:
        result.error = str(e)
        print(f"pdtui bench: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - any failure is kept in bench.json.gz with what was measured
        result.error = f"{type(e).__name__}: {e}"
        print(f"pdtui bench: {result.error}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)

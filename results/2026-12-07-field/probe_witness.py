"""Can a known answer tell D's KV was wrong, on the tiny model with dummy weights? The fail-open
probe found D's tokens equal to the known answer with another prompt's KV (reuse) or the wrong
blocks (shift): the random 2-layer model's argmax hardly depends on the context. Here the same
cases with each token's logprob: how far the clean pair's logprobs are from P's own, and how far
the tampered ones are.

    timeout 2700 flock -w 2400 /tmp/pdtui-engines.lock timeout 600 .venv/bin/python results/2026-12-07-field/probe_witness.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from engines import Engine, d_leg, ids, p_leg, running  # noqa: E402

N, MT = 300, 16


def answer(r: httpx.Response) -> tuple[list[int], list[float]]:
    c = r.json()["choices"][0]
    lp = c.get("logprobs") or {}
    return c["token_ids"], [float(x) for x in (lp.get("token_logprobs") or [])]


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="pdtui-field-"))
    p = Engine("P", "prefill", 26100, 26101, 0, folder)
    d = Engine("D", "decode", 26200, 26201, 1, folder)
    extra = {"logprobs": 1, "return_token_ids": True}
    with running(p, d):
        def known(prompt):
            r = httpx.post(f"{p.url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": MT,
                                                            "temperature": 0, "ignore_eos": True, **extra}, timeout=60)
            return answer(r)

        def through(prompt, rid, tamper=None):
            got = p_leg(p, prompt, rid + "-p").json()["kv_transfer_params"]
            r = d_leg(d, prompt, rid, tamper(got) if tamper else got, max_tokens=MT, **extra)
            if tamper:
                httpx.post(f"{d.url}/v1/completions", json={"model": "pdtui-release-kv", "prompt": "x",
                                                            "max_tokens": 1, "kv_transfer_params": got}, timeout=30)
            return r

        a = ids(N, 501)
        params_a = p_leg(p, a, "w-a-p").json()["kv_transfer_params"]
        d_leg(d, a, "w-a", params_a, max_tokens=MT)
        cases = {"clean": None, "clean2": None, "reuse": lambda got: params_a,
                 "shift": lambda got: {**got, "remote_block_ids": [[x + 1 for x in g] for g in got["remote_block_ids"]]},
                 "shift+40": lambda got: {**got, "remote_block_ids": [[x + 40 for x in g] for g in got["remote_block_ids"]]}}
        for i, (name, tamper) in enumerate(cases.items()):
            b = ids(N, 600 + i)
            ref_ids, ref_lp = known(b)
            r = through(b, f"w-{i}", tamper)
            if r.status_code != 200:
                print(f"{name}: {r.status_code} {r.text[:200]}")
                continue
            got_ids, got_lp = answer(r)
            diffs = [abs(x - y) for x, y in zip(got_lp, ref_lp)]
            print(f"{name:9} ids equal {got_ids == ref_ids}; logprob |diff| max {max(diffs):.3g} mean"
                  f" {sum(diffs) / len(diffs):.3g}; first logprobs P {[round(x, 4) for x in ref_lp[:4]]}"
                  f" pair {[round(x, 4) for x in got_lp[:4]]}", flush=True)
            time.sleep(0.5)
        # how much does the context matter at all? the same last 20 tokens after another prefix, P alone
        b = ids(N, 700)
        c = ids(N - 20, 701) + b[-20:]
        (ib, lb), (ic, lc) = known(b), known(c)
        print(f"P alone, same last 20 tokens, other prefix: ids equal {ib == ic}; logprob |diff| max"
              f" {max(abs(x - y) for x, y in zip(lb, lc)):.3g}")
    print(f"[probe] logs in {folder}")


if __name__ == "__main__":
    main()

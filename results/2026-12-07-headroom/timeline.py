"""D1's timeline from a headroom drill's recording (`pdtui drill ... --record FILE`): each stream
sent to D1 (when, and the proxy's reason), when it ended, each scrape of D1 (blocks used, running,
waiting, preemptions) and each headroom report (free, promised, requests, the scrape's age).

    python timeline.py fast1.jsonl.gz
"""
import gzip, json, sys

path = sys.argv[1]
ev = [json.loads(line) for line in (gzip.open if path.endswith(".gz") else open)(path, "rt")]
t0 = ev[0]["t"]
rows = []
for e in ev:
    k = e["event"]
    if k == "request" and e.get("decode") == "D1" and not e.get("warmup"):
        start = e["t"] - e["total_ms"] / 1000
        rows.append((start - t0, f"START {e['request_id'][-8:]} | {e.get('decode_reason')[:80]}"))
        rows.append((e["t"] - t0, f"END   {e['request_id'][-8:]} ttft {e.get('decode_ttft_ms'):.0f} ms, {e['chunks']} chunks"))
    elif k == "metrics" and e.get("instance") == "D1":
        v = e["values"]
        rows.append((e["t"] - t0, f"D1 scrape: used {v.get('vllm:kv_cache_usage_perc', 0) * 63:.1f} blocks, running"
                     f" {v.get('vllm:num_requests_running')}, waiting {v.get('vllm:num_requests_waiting')},"
                     f" preemptions {v.get('vllm:num_preemptions')}"))
    elif k == "headroom" and e.get("instance") == "D1":
        rows.append((e["t"] - t0, f"D1 headroom: free {e['free_blocks']} promised {e['promised_blocks']}"
                     f" ({e['requests']} requests), scrape {e['t'] - e['scrape_t']:.2f} s old"))
for t, s in sorted(rows):
    print(f"{t:7.2f} {s}")

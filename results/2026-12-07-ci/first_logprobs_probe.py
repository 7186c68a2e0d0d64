import subprocess, sys, time, httpx, os, tempfile, signal
sys.path.insert(0, "/work/main")
from pdtui.core import config as config_mod
from tests.e2e.handset import hand_started
cfg = config_mod.load_profile("cpu")
model = config_mod.model_path(cfg)
folder = __import__("pathlib").Path(tempfile.mkdtemp(prefix="fr-"))
e = hand_started("P", "prefill", 28100, 28600, 0, model, folder)
if os.environ.get("TCD"): e.env["TORCH_COMPILE_DISABLE"] = "1"
t0 = time.monotonic(); sid = e.start()
url = e.url
while True:
    try:
        if httpx.get(url + "/health", timeout=1).status_code == 200: break
    except Exception: pass
    time.sleep(0.2)
t1 = time.monotonic(); print(f"health after {t1-t0:.1f} s")
for i in range(3):
    t = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hello world " * 50 + str(i), "max_tokens": 4, **({"logprobs": 1} if i else {})}, timeout=120)
    print(f"request {i}: {r.status_code} in {time.monotonic()-t:.2f} s")
os.killpg(sid, signal.SIGKILL)

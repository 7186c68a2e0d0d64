"""The open dashboard sends nothing to the proxy (issue 22 item 2): its figures come from the run's
events, never from polling the proxy's data path. A recorder (a fake HTTP server that answers 200
and writes down every request) stands where the proxy is; the dashboard runs over a scripted run
through every tab, with requests traced and metrics sampled, for a few seconds; the recorder must
have seen nothing. Only the load keys (1-4) talk to the proxy: that is what they are for. The
test ends by checking that the recorder hears a client at that URL."""

from __future__ import annotations

import dataclasses
import http.server
import threading
from collections.abc import Iterator

import httpx
import pytest

from pdtui.app.app import make_app
from pdtui.core.events import MetricsSampled
from pdtui.core.source import RunInfo
from tests.functional.fake_runtime import T0, FakeRuntime, request, started, state


class Recorder(http.server.ThreadingHTTPServer):
    """A fake proxy: 200 to everything, each request line kept."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.seen.append(f"{self.command} {self.path}")
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.anyio
async def test_the_open_dashboard_asks_the_proxy_for_nothing(recorder: Recorder) -> None:
    url = f"http://127.0.0.1:{recorder.server_address[1]}"
    fake = FakeRuntime(run=RunInfo("cpu", "tiny", url, 128))
    app = make_app(fake)
    async with app.run_test(size=(160, 48)) as pilot:
        fake.emit(dataclasses.replace(started(), proxy_url=url), state("P", "ready", T0), state("D", "ready", T0))
        for i in range(30):  # traces and metrics as a live run brings them, through every tab
            fake.emit(request(f"q-{i}", T0 + i * 0.1),
                      MetricsSampled(instance="D", values={"vllm:num_requests_running": float(i % 4)}, t=T0 + i * 0.1))
            if i % 10 == 0:
                await pilot.press("thg"[i // 10 % 3])
            await pilot.pause(0.02)
        await pilot.press("l")
        await pilot.pause(0.5)
        assert recorder.seen == [], f"the dashboard asked the proxy for {recorder.seen}"
    # the control: the recorder hears a client at the dashboard's proxy URL (so the silence above is the dashboard's)
    async with httpx.AsyncClient() as client:
        await client.get(f"{url}/health", timeout=5)
    assert recorder.seen == ["GET /health"]

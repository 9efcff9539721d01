"""The job dashboard (``GET /dashboard``) in a real browser.

A real API server process (``python -m farm.api``) on a real Redis holds jobs submitted
over HTTP, progress and failures recorded through the ledger and a worker inventory
published the way a worker publishes it; headless chromium, driven over the DevTools
protocol (tornado's websocket client, already installed with flower), loads the page and
the tests read what it shows and click its controls. User and worker text is hostile
markup, which must show as literal text and add no element.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from tornado.websocket import WebSocketClientConnection, websocket_connect

from farm.jobs import STATES, Ledger
from farm.models import ModelEntry, ModelRegistry
from farm.spec import JobSpec
from farm.workers_registry import WorkerRegistry
from tests.servers import RedisServer, api_process, free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking")
HOSTILE_PROMPT = "<img src=x onerror=alert(1)>"
HOSTILE_TAG = "<b>vip</b>"
HOSTILE_ERROR = "RuntimeError: <script>alert(2)</script> at step 3"
HOSTILE_WORKER = "gpu-node-1/cuda:0<i>x</i>"
GIB = 1024**3
OLD_COUNT_CAP = 500  # the page counted a state by listing at most this many of its jobs


def chromium() -> str:
    """The browser: ``$CHROMIUM`` or ``chromium`` on PATH (``make test`` installs it)."""
    found = os.environ.get("CHROMIUM") or next(
        (p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None
    )
    if not found:
        pytest.fail("the dashboard tests need chromium: make browser installs it")
    return found


@dataclass
class Api:
    url: str
    namespace: str


@pytest.fixture(scope="module")
def api(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """``python -m farm.api`` on a free port, its own namespace, a file:// store."""
    tmp = tmp_path_factory.mktemp("dashboard")
    port, ns = free_port(), "d" + uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))}
    env.update(FARM_REDIS_URL=redis_server.url, FARM_API_PORT=str(port), FARM_NAMESPACE=ns,
               FARM_DATA_DIR=str(tmp), FARM_STORAGE_URL=f"file://{tmp / 'store'}",
               PYTHONPATH=str(ROOT))  # fmt: skip
    with api_process(env, port) as url:
        yield Api(url, ns)


@pytest.fixture(scope="module")
def devtools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Headless chromium; the DevTools websocket URL of its one tab."""
    profile = tmp_path_factory.mktemp("chromium")
    args = [chromium(), *CHROMIUM_FLAGS, "--no-first-run", "--no-default-browser-check",
            f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0", "about:blank"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"  # chromium writes its port there
        deadline = time.monotonic() + 30
        while not (active.exists() and active.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.05)
        port = active.read_text().split()[0]
        while True:
            tabs = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            pages = [t["webSocketDebuggerUrl"] for t in tabs if t.get("type") == "page"]
            if pages:
                break
            assert time.monotonic() < deadline, "chromium opened no tab"
            time.sleep(0.05)
        yield pages[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Tab:
    """A browser tab over the DevTools protocol: commands, and the events it sent."""

    def __init__(self, ws: WebSocketClientConnection) -> None:
        self.ws = ws
        self.last_id = 0
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        await self.ws.write_message(json.dumps({"id": self.last_id, "method": method,
                                                "params": params}))  # fmt: skip
        while True:
            raw = await asyncio.wait_for(self.ws.read_message(), 15)
            assert raw is not None, "the DevTools connection closed"
            msg = json.loads(raw)
            if msg.get("id") == self.last_id:
                assert "error" not in msg, msg["error"]
                return dict(msg["result"])
            if "method" in msg:
                self.events.append(msg)

    async def js(self, expression: str) -> Any:
        """The value of a JS expression evaluated in the page."""
        got = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                              awaitPromise=True)  # fmt: skip
        assert "exceptionDetails" not in got, got["exceptionDetails"]
        return got["result"].get("value")

    async def until(self, expression: str, timeout: float = 10) -> None:
        """Wait until the expression is truthy in the page."""
        deadline = time.monotonic() + timeout
        while not await self.js(f"Boolean({expression})"):
            assert time.monotonic() < deadline, f"the page never showed {expression}"
            await asyncio.sleep(0.05)

    async def open(self, url: str) -> None:
        """Load the page and wait for its first refresh to have rendered."""
        await self.send("Page.navigate", url=url)
        await self.until("document.body && Number(document.body.dataset.polls) >= 1")

    def api_requests(self) -> list[tuple[str, dict[str, list[str]]]]:
        """Path and query of each request the page sent to the API (``Network.enable``
        first); the events come in with the answers to commands, so send one before."""
        out = []
        for e in self.events:
            if e["method"] == "Network.requestWillBeSent":
                url = urlsplit(e["params"]["request"]["url"])
                if url.path.startswith("/v1/"):
                    out.append((url.path, parse_qs(url.query)))
        return out

    def problems(self) -> list[Any]:
        """Script exceptions, dialogs and console errors (CSP violations among them),
        leaving out the network's own lines for the API's 4xx answers to refused controls."""
        out: list[Any] = []
        for e in self.events:
            m, p = e["method"], e["params"]
            if m in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening"):
                out.append(p)
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                if p["entry"].get("source") != "network":
                    out.append(p["entry"])
            elif m == "Runtime.consoleAPICalled" and p["type"] == "error":
                out.append(p)
        return out


def in_browser(ws_url: str, scenario: Callable[[Tab], Any]) -> None:
    """Run ``scenario(tab)`` against the tab, checking that the page had no problem."""

    async def main() -> None:
        ws = await websocket_connect(ws_url)
        try:
            tab = Tab(ws)
            for domain in ("Page", "Runtime", "Log"):
                await tab.send(f"{domain}.enable")
            await scenario(tab)
            await tab.js("1")  # collect the events sent meanwhile
            assert tab.problems() == []
        finally:
            ws.close()

    asyncio.run(main())


def submit(api: Api, **fields: Any) -> str:
    body = {"model": "synthetic", "prompt": "a red fox", **fields}
    r = httpx.post(f"{api.url}/v1/jobs", json=body, timeout=10)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def row(job: str, selector: str = "") -> str:
    """JS for an element of a job's row (its text, trimmed)."""
    return f"document.querySelector('tr[data-job=\"{job}\"] {selector}')"


def js(value: Any) -> str:
    """A Python value as a JS literal."""
    return json.dumps(value)


def text(selector_js: str) -> str:
    return f"({selector_js})?.textContent.trim()"


def eta_seconds(shown: str) -> float:
    m = re.fullmatch(r"(?:(\d+) min )?(\d+) s", shown)
    assert m, shown
    return 60 * int(m[1] or 0) + int(m[2])


def test_the_page_shows_jobs_progress_failures_and_workers(
    api: Api, devtools: str, redis_client: redis.Redis
) -> None:
    led = Ledger(redis_client, api.namespace)
    for _ in range(OLD_COUNT_CAP + 1):  # older than the jobs below: not on the table's page
        led.create(JobSpec(model="synthetic", prompt="a backlog", count=1))
    ModelRegistry(redis_client, api.namespace).add(
        ModelEntry(name="sd15-test", engine="sd1", sha256="ab" * 32, size=2 * GIB, key="m/ab")
    )
    a = submit(api, prompt=["a red fox", HOSTILE_PROMPT], count=4, batch_size=2,
               tags=[HOSTILE_TAG, "night"], priority=70)  # fmt: skip
    b = submit(api, prompt="a blue jay", count=1, sweep={"model": ["synthetic", "sd15-test"]})
    assert httpx.post(f"{api.url}/v1/jobs/{b}/pause").status_code == 200
    # a worker's work on job a: two tasks claimed, three images stored, one failed
    assert led.release(a, 2) == [0, 1]
    assert [led.claim(a, t, HOSTILE_WORKER) for t in (0, 1)] == ["ok", "ok"]
    led.mark(a, [0, 1, 2])
    where = {"stage": "render", "worker": HOSTILE_WORKER, "model": "synthetic"}
    assert led.record_error(a, 1, [2, 3], error=HOSTILE_ERROR, images_failed=True, **where)
    led.mark(a, [3], ok=False)
    inventory = {
        "instance": "ab12cd", "device": "cuda:0 (NVIDIA H100 80GB HBM3)", "node": "gpu-node-1",
        "pid": 4242, "vram_total": 80 * GIB, "vram_free": 30 * GIB, "model": "synthetic",
        "assigned": "synthetic",
        "models": {"vram": ["synthetic"], "ram": ["sd15-test"], "disk": ["sd15-test", "sdxl"]},
        "current_task": f"{a}/1", "loads": 2, "tasks": 7, "images": 13,
    }  # fmt: skip
    WorkerRegistry(redis_client, api.namespace).publish(HOSTILE_WORKER, inventory, ttl=60)
    started = led.get(a).started_at
    assert started is not None
    images = httpx.get(f"{api.url}/v1/jobs/{a}/images").json()["images"]
    assert [i["index"] for i in images] == [0, 1, 2]
    keys = [i["key"] for i in images]

    async def scenario(tab: Tab) -> None:
        await tab.send("Network.enable")
        t0 = time.time()
        await tab.open(f"{api.url}/dashboard")
        await tab.until(f"{row(a)} && {row(b)}")
        # the jobs table: state, priority, models, progress, rate, ETA, errors, controls
        assert await tab.js(text(row(a, ".state"))) == "running"
        assert await tab.js(text(row(b, ".state"))) == "paused"
        assert await tab.js(text(row(a, ".priority"))) == "70"
        assert await tab.js(text(row(a, ".ptext"))) == "3 done · 1 failed / 8"
        assert await tab.js(text(row(b, ".ptext"))) == "0 done · 0 failed / 2"
        assert await tab.js(text(row(a, ".errors"))) == "1"
        assert await tab.js(text(row(b, ".errors"))) == "0"
        await tab.until(f"{text(row(b, '.models'))} === 'synthetic, sd15-test'")
        assert await tab.js(text(row(a, ".models"))) == "synthetic"
        tags = f"[...{row(a)}.querySelectorAll('.tag')].map(t => t.textContent)"
        assert await tab.js(tags) == [HOSTILE_TAG, "night"]
        width = f"{row(a, '.pbar .d')}.style.width"
        assert float((await tab.js(width)).rstrip("%")) == pytest.approx(100 * 3 / 8)
        enabled = "[...{}.querySelectorAll('button[data-action]:not(:disabled)')]" \
                  ".map(b => b.dataset.action)"  # fmt: skip
        assert await tab.js(enabled.format(row(a))) == ["pause", "cancel", "retry", "priority"]
        assert await tab.js(enabled.format(row(b))) == ["resume", "cancel", "priority"]
        rate = float(await tab.js(text(row(a, ".rate"))))
        total_rate = float(await tab.js(text("document.getElementById('rate')")))
        eta = eta_seconds(await tab.js(text(row(a, ".eta"))))
        t1 = time.time()
        # images/s = 3 done / time since the first task started, at some moment in [t0, t1]
        assert 3 / (t1 - started) - 0.01 <= rate <= 3 / (t0 - started) + 0.01
        assert 3 / (t1 - started) - 0.01 <= total_rate <= 3 / (t0 - started) + 0.01
        assert 4 / 3 * (t0 - started) - 1 <= eta <= 4 / 3 * (t1 - started) + 1  # 4 images left
        # farm totals: jobs by state, exact (more queued than the page once counted),
        # as /v1/stats has them and the API lists them; the live and busy workers
        stats = httpx.get(f"{api.url}/v1/stats").json()
        assert stats["jobs"] == {"queued": OLD_COUNT_CAP + 1, "running": 1, "paused": 1,
                                 "done": 0, "failed": 0, "cancelled": 0}  # fmt: skip
        for state in STATES:
            listed = httpx.get(f"{api.url}/v1/jobs", params={"state": state, "limit": 1000})
            shown = await tab.js(text(f"document.getElementById('count-{state}')"))
            assert shown == str(stats["jobs"][state]) == str(len(listed.json())), state
        assert await tab.js(text("document.getElementById('live')")) == "1"
        assert await tab.js(text("document.getElementById('busy')")) == "1"

        # the workers table
        w = "document.querySelector('#workers tbody tr')"
        assert await tab.js(f"{w}.dataset.worker") == HOSTILE_WORKER
        cells = await tab.js(f"[...{w}.cells].map(c => c.textContent.trim())")
        assert cells[:4] == [HOSTILE_WORKER, "gpu-node-1", inventory["device"],
                             "50.0 GiB / 80.0 GiB"]  # fmt: skip
        resident = await tab.js(f"[...{w}.cells[4].children].map(c => c.textContent)")
        assert resident == ["VRAM: synthetic", "RAM: sd15-test", "disk: sd15-test, sdxl"]
        assert cells[5:10] == ["synthetic", "synthetic", f"{a}/1", "7", "13"]
        # the models table
        model = "document.querySelector('#models tr[data-model=\"sd15-test\"]')"
        got = await tab.js(f"[...{model}.cells].map(c => c.textContent)")
        assert got[:4] == ["sd15-test", "sd1", "2.0 GiB", "abababababab"]

        # a job's detail: spec, failures, the latest images (keys: a file:// store)
        await tab.js(f"{row(a, '.jobid')}.click()")
        await tab.until("!document.getElementById('detail').hidden && "
                        "document.querySelectorAll('#thumbs figure').length === 3")  # fmt: skip
        assert await tab.js(text("document.getElementById('detail-id')")) == a
        prompts = "[...document.querySelectorAll('#detail-spec .prompt')].map(p => p.textContent)"
        assert await tab.js(prompts) == ["a red fox", HOSTILE_PROMPT]
        spec = await tab.js(text("document.getElementById('detail-spec')"))
        assert "3 done · 1 failed / 8 images; 0 of 4 tasks finished" in spec
        assert f"seed{led.get(a).spec.seed}" in spec and "512 × 512" in spec
        failure = "document.querySelector('#detail-errors tbody tr')"
        cells = await tab.js(f"[...{failure}.cells].map(c => c.textContent)")
        assert cells[1:] == ["render", "1", "2, 3 (failed)", HOSTILE_WORKER, "synthetic",
                             HOSTILE_ERROR]  # fmt: skip
        figs = "[...document.querySelectorAll('#thumbs figure')]"
        assert await tab.js(f"{figs}.map(f => f.dataset.key)") == keys[::-1]  # newest first
        shown_keys = await tab.js(f"{figs}.map(f => f.querySelector('.nokey').textContent)")
        assert shown_keys == keys[::-1]
        captions = await tab.js(f"{figs}.map(f => f.querySelector('.prompt').textContent)")
        assert captions == [i["prompt"] for i in images[::-1]]

        # the hostile text is text everywhere: no element of it, only the page's script
        assert await tab.js("document.body.textContent.includes('<img src=x onerror')")
        assert await tab.js("document.querySelectorAll('img, b, i').length") == 0
        assert await tab.js("document.scripts.length") == 1

        # the cards come from /v1/stats, at each poll; jobs are listed for the table only,
        # which shows all states here (no state filter)
        await tab.until("Number(document.body.dataset.polls) >= 2")
        await tab.js("1")
        sent = tab.api_requests()
        polls = await tab.js("Number(document.body.dataset.polls)")
        assert [p for p, _ in sent].count("/v1/stats") >= polls >= 2
        listings = [q for p, q in sent if p == "/v1/jobs"]
        assert len(listings) >= polls and all("state" not in q for q in listings), listings

    in_browser(devtools, scenario)


def test_the_controls_act_and_a_refusal_shows_the_apis_message(
    api: Api, devtools: str, redis_client: redis.Redis
) -> None:
    led = Ledger(redis_client, api.namespace)
    c = submit(api, prompt="a green frog", count=2)
    d = submit(api, prompt="a grey owl", count=2, priority=10)
    notice = text("document.getElementById('notice-text')")
    refused = httpx.post(f"{api.url}/v1/jobs/{d}/priority", json={"priority": 101})
    assert refused.status_code == 422
    field_msg = "; ".join(f"{p['field']}: {p['msg']}" for p in refused.json()["detail"])

    async def scenario(tab: Tab) -> None:
        await tab.send("Network.enable")
        await tab.open(f"{api.url}/dashboard")
        await tab.until(f"{row(c)} && {row(d)}")
        # pause: the ledger has the job paused, the page says so and offers resume
        await tab.js(f"{row(c, 'button[data-action=pause]')}.click()")
        await tab.until(f"{notice} === {js(f'pause {c}: done')}")
        assert led.get(c).state == "paused"
        await tab.until(f"{text(row(c, '.state'))} === 'paused'")
        assert await tab.js(f"{row(c, 'button[data-action=resume]')}.disabled") is False

        # the job is cancelled behind the page's back: its resume is refused (409) and the
        # page shows the API's own message
        await tab.js("document.getElementById('auto').click()")  # stop polling
        await tab.until("document.body.dataset.busy === ''")
        assert led.cancel(c) == "ok"
        await tab.js(f"{row(c, 'button[data-action=resume]')}.click()")
        detail = httpx.post(f"{api.url}/v1/jobs/{c}/resume").json()["detail"]
        assert "cancelled" in detail
        await tab.until(f"{notice} === {js(f'resume {c} refused (HTTP 409): {detail}')}")
        assert await tab.js("document.getElementById('notice').className") == "bad"
        assert led.get(c).state == "cancelled"
        await tab.until(f"{text(row(c, '.state'))} === 'cancelled'")  # refreshed after it

        # priority: out of range is refused with the field's message; in range is applied
        prio = row(d, "input[data-role=priority]")
        set_prio = row(d, "button[data-action=priority]")
        await tab.js(f"{prio}.value = '101'; {set_prio}.click()")
        await tab.until(f"{notice} === {js(f'priority {d} refused (HTTP 422): {field_msg}')}")
        assert led.get(d).priority == 10
        await tab.js(f"{prio}.value = '80'; {set_prio}.click()")
        await tab.until(f"{notice} === {js(f'priority {d}: done')}")
        assert led.get(d).priority == 80
        await tab.until(f"{text(row(d, '.priority'))} === '80'")

        # the state filter lists only the jobs in that state
        await tab.js("const f = document.getElementById('state-filter'); f.value = 'cancelled';"
                     "f.dispatchEvent(new Event('change'))")  # fmt: skip
        await tab.until(f"!{row(d)}")
        shown = await tab.js("[...document.querySelectorAll('#jobs tbody tr')]"
                             ".map(r => r.dataset.job)")  # fmt: skip
        listed = httpx.get(f"{api.url}/v1/jobs", params={"state": "cancelled"}).json()
        assert shown == [j["id"] for j in listed] and c in shown
        await tab.js("1")
        filtered = {s for p, q in tab.api_requests() if p == "/v1/jobs" for s in q.get("state", [])}
        assert filtered == {"cancelled"}  # the one state the table shows

    in_browser(devtools, scenario)


def test_the_page_is_self_contained_and_locked_down(client: TestClient) -> None:
    r = client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = dict(p.strip().split(" ", 1) for p in r.headers["content-security-policy"].split(";"))
    nonce = re.fullmatch(r"'nonce-([A-Za-z0-9_-]{16,})'", csp["script-src"])
    assert nonce and csp["style-src"] == csp["script-src"]
    assert [csp["default-src"], csp["connect-src"], csp["frame-ancestors"]] == [
        "'none'", "'self'", "'none'"
    ]  # fmt: skip
    assert "unsafe" not in r.headers["content-security-policy"]
    html = r.text
    assert html.count(f'<script nonce="{nonce[1]}">') == 1 and html.count("<script") == 1
    assert html.count(f'<style nonce="{nonce[1]}">') == 1
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing external
    assert "{{" not in html and "/v1/jobs" in html
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    other = client.get("/dashboard").headers["content-security-policy"]
    assert other != r.headers["content-security-policy"]  # a fresh nonce per response
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/dashboard"
    paths = client.get("/openapi.json").json()["paths"]
    assert "/dashboard" not in paths and "/" not in paths and "/v1/jobs" in paths

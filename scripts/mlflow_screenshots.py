"""Screenshots of the MLflow UI for the docs (docs/img/): a training run, its lineage (data set,
logged model, registered version), and a sweep's parent run with its trials.

By default it starts its own ``mlflow server`` on 127.0.0.1 (SQLite store and artifacts in a
temporary folder), trains a short detection run on 2 Ray Train workers and a 3-trial sweep
against it, photographs the pages with headless Chromium and stops the server. With
``--tracking-uri http://127.0.0.1:PORT`` it photographs runs already on that server instead
(the newest run of experiment ``--run-experiment`` and the newest sweep of ``--sweep-experiment``).

    python scripts/mlflow_screenshots.py [--out docs/img] [--tracking-uri URL] [--chromium PATH]

Chromium is driven over its DevTools protocol (aiohttp, which Ray already depends on): the UI's
preferences (model-training navigation, no assistant panel) are set in localStorage before the
app loads, then each page is loaded, waited for and captured. Needs ``apt-get install chromium``.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# MLflow UI preferences (localStorage) so the pages show what a model-training user sees.
UI_PREFS = {"mlflow.workflowType_v1": json.dumps("machine_learning"),
            "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
            "mlflow.assistant.panelOpen_v1": "false"}
SWEEP_YAML = {
    "base": {"model": "cls-n.yaml", "data": "digits", "epochs": 4, "imgsz": 16, "fraction": 0.3,
             "optimizer": "SGD", "verbose": False, "project": "digits-sweep"},
    "space": {"lr0": {"grid": [0.003, 0.01, 0.03]}, "momentum": {"uniform": [0.8, 0.95]}},
    "name": "lr-sweep", "search": "random", "num_samples": 1, "max_concurrent": 2, "scheduler": "fifo"}
REGISTERED = "shapes-detector"


# ------------------------------------------------------------------------------ servers and runs
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f}s")


def start_mlflow(folder: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` with a SQLite store (schema created first, so workers never race it)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    backend = f"sqlite:///{folder / 'mlflow.db'}"
    SqlAlchemyStore(backend, str(folder / "artifacts")).engine.dispose()
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(folder / "mlflow.log", "ab") as log:
        proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", "--backend-store-uri", backend,
                                 "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", 120, proc)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run(cmd: list[str], cwd: Path, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "ab") as out:
        code = subprocess.call(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed with exit code {code}; see {log}")


def populate(tracking_uri: str, folder: Path) -> None:
    """The README's main job (det-n on shapes8, 25 epochs on 2 Ray Train workers: curves that rise)
    and a 3-trial classification sweep."""
    orchestrator = str(BIN / "orchestrator")
    print("training the README's main job (det-n on shapes8, 2 workers) ...", flush=True)
    run([orchestrator, "train", f"cfg={ROOT / 'examples' / 'det-shapes8.yaml'}", "project=shapes8",
         "name=det-n-shapes8", "verbose=false", f"register={REGISTERED}", f"tracking_uri={tracking_uri}"],
        folder, folder / "train.log")
    print("sweeping lr0 and momentum (3 trials) ...", flush=True)
    sweep = folder / "sweep.yaml"
    sweep.write_text(json.dumps(SWEEP_YAML))
    run([orchestrator, "sweep", str(sweep), f"tracking_uri={tracking_uri}"], folder, folder / "sweep.log")


def find_runs(tracking_uri: str, run_experiment: str, sweep_experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)

    def experiment(name: str) -> str:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise SystemExit(f"no experiment named {name!r} at {tracking_uri}")
        return exp.experiment_id

    run_exp, sweep_exp = experiment(run_experiment), experiment(sweep_experiment)
    runs = client.search_runs([run_exp], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    parents = client.search_runs([sweep_exp], filter_string="tags.`sweep.role` = 'parent'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or not parents:
        raise SystemExit(f"need a finished run in {run_experiment!r} and a sweep in {sweep_experiment!r}")
    children = client.search_runs([sweep_exp], filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    outputs = runs[0].outputs.model_outputs if runs[0].outputs else []
    versions = client.search_model_versions(f"run_id = '{runs[0].info.run_id}'")
    return {"run_exp": run_exp, "run": runs[0].info.run_id, "run_name": runs[0].info.run_name,
            "model": outputs[0].model_id if outputs else None,
            "version": (versions[0].name, versions[0].version) if versions else None,
            "sweep_exp": sweep_exp, "parent": parents[0].info.run_id, "parent_name": parents[0].info.run_name,
            "children": [c.info.run_id for c in children]}


# ------------------------------------------------------------------------------ Chromium
class Browser:
    """One headless Chromium page driven over the DevTools protocol."""

    def __init__(self, chromium: str, width: int, height: int):
        self.chromium, self.width, self.height = chromium, width, height
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")  # a new, empty profile
        self.proc = None
        self._id = 0

    async def __aenter__(self):
        import aiohttp

        self.proc = subprocess.Popen([self.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                      "--remote-debugging-port=0", f"--window-size={self.width},{self.height}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        else:
            raise SystemExit("Chromium did not open its DevTools port")
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        targets = await (await self.http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                        deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()
        await self.http.close()
        stop(self.proc)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def call(self, method: str, **params):
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    async def open(self, url: str, wait_for: str, timeout: float = 60.0) -> None:
        """Load ``url`` fresh (the app reads its preferences at start) and wait for ``wait_for``."""
        await self.call("Page.navigate", url=url)
        await asyncio.sleep(1.0)
        await self.call("Page.reload", ignoreCache=True)
        end = time.monotonic() + timeout
        probe = f"document.readyState === 'complete' && document.body.innerText.includes({json.dumps(wait_for)})"
        while not await self.js(probe):
            if time.monotonic() > end:
                raise SystemExit(f"{url}: {wait_for!r} did not appear within {timeout:.0f}s")
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.5)  # charts and images draw after the data arrived

    async def scroll_to(self, text: str) -> None:
        """Scroll the innermost element whose whole text is ``text`` (a section title) to the top."""
        found = await self.js(
            "(() => { const el = [...document.querySelectorAll('*')].filter(e => e.children.length === 0"
            f" && (e.textContent || '').trim() === {json.dumps(text)})[0];"
            " if (el) el.scrollIntoView({block: 'start'}); return !!el; })()")
        if not found:
            print(f"note: section {text!r} not found; page left at the top", flush=True)
        await asyncio.sleep(2.0)

    async def click(self, element_js: str, what: str) -> bool:
        """A real mouse click (press and release) at the centre of the element ``element_js`` finds."""
        rect = await self.js(f"(() => {{ const el = {element_js}; if (!el) return null; el.scrollIntoView({{block: 'center'}});"
                             " const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not rect:
            print(f"note: {what} not found; not clicked", flush=True)
            return False
        x, y = rect
        await self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        await asyncio.sleep(1.5)
        return True

    async def set_prefs(self, origin: str, prefs: dict) -> None:
        await self.call("Page.navigate", url=origin + "/#/")
        await asyncio.sleep(2.0)
        await self.js(";".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)})" for k, v in prefs.items()))

    async def shoot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"wrote {path}", flush=True)


async def photograph(ids: dict, origin: str, out: Path, chromium: str) -> None:
    run = f"{origin}/#/experiments/{ids['run_exp']}/runs/{ids['run']}"
    parent = f"{origin}/#/experiments/{ids['sweep_exp']}/runs/{ids['parent']}"
    compare = (f"{origin}/#/compare-runs?runs={json.dumps(ids['children'])}"
               f"&experiments={json.dumps([ids['sweep_exp']])}")
    prefs = {**UI_PREFS, f"MLflowLocalStorage-1.1-ExperimentView-{ids['sweep_exp']}-expandRows": "true"}
    async with Browser(chromium, 1440, 1100) as page:
        await page.set_prefs(origin, prefs)
        await page.open(run, "Description")
        await page.shoot(out / "run-overview.png")
        await page.open(run + "/model-metrics", "fitness")
        await page.scroll_to("metrics")  # the per-epoch validation metrics, past final/ and lr/
        await page.shoot(out / "run-metrics.png")
        await page.open(run + "/artifactPath/results.png", "results.png")
        await page.shoot(out / "run-artifacts.png")
        await photograph_lineage(page, ids, origin, out)
        await page.open(f"{origin}/#/experiments/{ids['sweep_exp']}/runs", ids["parent_name"])
        await page.click(f"[...document.querySelectorAll('[role=row]')].find(r => r.innerText.includes("
                         f"{json.dumps(ids['parent_name'])}))?.querySelector('button[data-component-id*=runnamecell]')",
                         "the sweep's expand button")
        await page.shoot(out / "sweep-runs.png")
        await page.open(parent + "/artifactPath/parallel_coordinates.png", "parallel_coordinates.png")
        await page.shoot(out / "sweep-parent.png")
        await page.open(compare, "Parallel Coordinates Plot")
        await choose_axes(page, drop=("name", "step/train/loss"), metric="fitness")
        await page.shoot(out / "sweep-compare.png")


async def photograph_lineage(page: Browser, ids: dict, origin: str, out: Path) -> None:
    """docs/from-data-to-model.md: the run's data set and logged model, the model, its version."""
    await page.open(f"{origin}/#/experiments/{ids['run_exp']}/runs/{ids['run']}", "Datasets")
    await page.scroll_to("Datasets")
    await page.shoot(out / "lineage-run.png")
    if ids["model"]:
        await page.open(f"{origin}/#/experiments/{ids['run_exp']}/models/{ids['model']}", "final/fitness")
        await page.shoot(out / "lineage-model.png")
    if ids["version"]:
        name, version = ids["version"]
        await page.open(f"{origin}/#/models/{name}/versions/{version}", "Source")
        await page.shoot(out / "lineage-version.png")


async def choose_axes(page: Browser, drop: tuple[str, ...], metric: str) -> None:
    """In MLflow's parallel coordinates plot: remove the ``drop`` axes, add ``metric``."""
    for label in drop:
        await page.click("[...document.querySelectorAll('.du-bois-light-select-selection-item')]"
                         f".find(e => e.innerText.trim() === {json.dumps(label)})"
                         "?.querySelector('.du-bois-light-select-selection-item-remove')", f"axis {label!r}")
    selects = "document.querySelectorAll('.du-bois-light-select-selector')"
    if await page.click(f"{selects}[{selects}.length - 1]", "the metrics selector"):
        await page.call("Input.insertText", text=metric)  # filters the options; Enter picks the first
        await asyncio.sleep(1.0)
        for kind in ("keyDown", "keyUp"):
            await page.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
        for kind in ("keyDown", "keyUp"):
            await page.call("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape", windowsVirtualKeyCode=27)
        await asyncio.sleep(2.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--tracking-uri", help="an MLflow server with runs (default: start one and fill it)")
    parser.add_argument("--run-experiment", default="shapes8")
    parser.add_argument("--sweep-experiment", default="digits-sweep")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and run folders")
    args = parser.parse_args()
    if not args.chromium:
        raise SystemExit("Chromium not found: apt-get install chromium, or pass --chromium PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    server = folder = None
    try:
        uri = args.tracking_uri
        if uri is None:
            folder = Path(tempfile.mkdtemp(prefix="mlflow-screenshots-"))
            server, uri = start_mlflow(folder)
            print(f"mlflow server at {uri} (store in {folder})", flush=True)
            populate(uri, folder)
        ids = find_runs(uri, args.run_experiment, args.sweep_experiment)
        asyncio.run(photograph(ids, uri.rstrip("/"), args.out, args.chromium))
    finally:
        if server is not None:
            stop(server)
        if folder is not None and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

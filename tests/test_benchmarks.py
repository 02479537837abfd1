"""Every script in benchmarks/ runs end to end in its ``--tiny`` mode and prints its result lines.

Each script runs in a subprocess as a user would start it (``python benchmarks/x.py --tiny``),
with one intra-op thread, its working directory and temporary files in the test's tmp dir. Tiny
mode's figures are not measurements: these tests check that the lines are there and that the
figures parse as finite numbers, never their values against the targets.

The scripts that start no Ray run two at a time (``without_ray``), each on a core of its own.
A script that uses Ray joins this session's Ray (tests/conftest.py; ``benchmarks/cluster.py``),
which saves it a Ray start and stop; the others get ``RAY_ADDRESS=local``, so that none joins a
cluster some other test started with ``ray start``.
"""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.tiny import NOTE as TINY_NOTE
from callbacks.forwarder import FLUSH_INTERVAL

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NUMBER = r"(-?[\d,]*\.?\d+(?:e[-+]?\d+)?|nan|inf)"
TIMEOUT = 420  # seconds per script: a tiny run takes 12-160 s on 2 idle cores, more on busy ones


def run_tiny(script: str, tmp_path: Path, ray_session=None) -> str:
    """Run ``benchmarks/<script> --tiny`` (on ``ray_session``'s Ray if given); return its stdout,
    failing with the output's tail."""
    joined = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"} \
        if ray_session else {"RAY_ADDRESS": "local"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", **joined,
           # the scripts' mkdtemp() folders land in tmp_path; Ray keeps its own temp dir (short
           # socket paths), the one it would use in this process
           "RAY_TMPDIR": os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp",
           "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           # Ray Train notices a finished worker group sooner (as in tests/conftest.py's session)
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")}
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        out = subprocess.run([sys.executable, str(BENCH / script), "--tiny"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script} --tiny did not finish in {TIMEOUT} s:\n{_tail(exc.stdout, exc.stderr)}")
    finally:
        end_leftovers(env["TMPDIR"])
    assert out.returncode == 0, f"{script} --tiny exited {out.returncode}:\n{_tail(out.stdout, out.stderr)}"
    assert TINY_NOTE in out.stdout, f"{script} --tiny does not say its figures are not measurements"
    return out.stdout


def end_leftovers(marker_tmpdir: str, grace: float = 5.0) -> None:
    """End the processes the script left behind, known by the TMPDIR this test gave it (its Ray's
    workers inherit it). A Ray Train controller whose actor was killed sometimes hangs in its
    interpreter's exit after its raylet is gone; nothing else here should outlive the script."""
    needle = f"TMPDIR={marker_tmpdir}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(entry.name) != os.getpid() and needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            time.sleep(0.1)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _tail(stdout, stderr, lines: int = 40) -> str:
    text = lambda s: s.decode(errors="replace") if isinstance(s, bytes) else (s or "")  # noqa: E731
    return "\n".join(("--- stdout", *text(stdout).splitlines()[-lines:],
                      "--- stderr", *text(stderr).splitlines()[-lines:]))


def figures(output: str, pattern: str) -> tuple[float, ...]:
    """The numbers the ``pattern`` line holds (``{n}`` marks each); fails if no line matches."""
    regex = NUMBER.join(r"\s+".join(map(re.escape, part.split(" "))) for part in pattern.split("{n}"))
    found = re.search(regex, output)
    assert found, f"no line matching {pattern!r} in:\n{output}"
    return tuple(float(g.replace(",", "")) for g in found.groups())


def finite(*values: float, positive: bool = False) -> None:
    for value in values:
        assert math.isfinite(value) and (value > 0 if positive else value >= 0), values


IN_PROCESS = ("actor_sink_cost.py", "digits_quality.py", "detect_quality.py", "mlflow_sink.py", "peer_ultralytics.py")


@pytest.fixture(scope="module")
def without_ray(tmp_path_factory):
    """The scripts that start no Ray, two at a time from the first test that asks (each keeps one
    core busy; the tests that follow wait for their own): script -> a future of its stdout."""
    with ThreadPoolExecutor(2) as pool:
        yield {script: pool.submit(run_tiny, script, tmp_path_factory.mktemp(script.split(".")[0]))
               for script in IN_PROCESS}


def test_actor_sink_cost_tiny(without_ray):
    out = without_ray["actor_sink_cost.py"].result()
    for kind in ("none", "eventlog", "mlflow", "all"):
        finite(*figures(out, f"{kind}: {{n}} us of driver CPU per record"))
    finite(*figures(out, "driver CPU / wall time with all sinks at 800 steps/s (4,000 records/s): {n}"))


def test_digits_quality_tiny(without_ray):
    out = without_ray["digits_quality.py"].result()
    top1, mean, seconds, ratio = figures(
        out, "digits held-out top-1 after 1 epochs, seeds 0-0: {n}; mean {n} in {n} s per run (target 0.95: ratio {n})")
    assert 0 <= top1 <= 1 and mean == top1
    finite(seconds, ratio)


def test_detect_quality_tiny(without_ray):
    out = without_ray["detect_quality.py"].result()
    map50, map5095 = figures(out, "shapes8 val mAP50 {n} (mAP50-95 {n}) after 1 epochs")
    assert 0 <= map5095 <= map50 <= 1
    finite(*figures(out, "(target 0.8: ratio {n}; time budget 600 s: ratio {n})"))


def test_mlflow_sink_tiny(without_ray):
    out = without_ray["mlflow_sink.py"].result()
    finite(*figures(out, "mlflow raw log_batch loop : {n} points/s"), positive=True)
    finite(*figures(out, "mlflow through MLflowSink : {n} points/s"), positive=True)
    finite(*figures(out, "ratio sink/raw : {n} (target >= 0.9)"), positive=True)
    finite(*figures(out, "event log -> local dir : {n} rows/s"), positive=True)
    finite(*figures(out, "event log -> moto S3 : {n} rows/s"), positive=True)


def test_peer_ultralytics_tiny(without_ray):
    out = without_ray["peer_ultralytics.py"].result()
    (map50,) = figures(out, "ours (det-n.yaml, defaults): final mAP50 {n} after 1 epochs")
    assert 0 <= map50 <= 1
    if "ultralytics: skipped: " not in out:  # its venv exists on this machine: the peer ran too
        (peer,) = figures(out, "ultralytics 8.4.190 (yolov8n.yaml, defaults): final mAP50 {n} after 1 epochs")
        assert 0 <= peer <= 1
        finite(*figures(out, "ratios ours/ultralytics: final mAP50 {n}, wall time {n}"))


def test_actor_ingest_tiny(ray_session, tmp_path):
    out = run_tiny("actor_ingest.py", tmp_path, ray_session)
    for rank in (0, 1):
        events, rate, per_event = figures(out, f"sender {rank}: {{n}} events, emit {{n}} ev/s ({{n}} us/event)")
        finite(events, rate, per_event, positive=True)
    events, seconds, rate = figures(out, "actor ingest: {n} events from 2 senders in {n} s = {n} events/s")
    assert events == 2 * 5_001  # 5,000 step events and the teardown per sender
    finite(seconds, rate, positive=True)
    (ratio,) = figures(out, "ratio to target 100,000 events/s: {n}")
    finite(ratio, positive=True)


def test_ray_overhead_tiny(ray_session, tmp_path):
    out = run_tiny("ray_overhead.py", tmp_path, ray_session)
    finite(*figures(out, "steps/s (medians): forwarded {n}, not forwarded {n}, in-process {n}"), positive=True)
    finite(*figures(out, "(a) forwarding on / off: {n} (target >= 0.97); paired with the epochs either side: {n}"),
           positive=True)
    cpu_on, cpu_off = figures(out, "the training thread's CPU per step is {n} us forwarded, {n} us not")
    finite(cpu_on, cpu_off, positive=True)
    finite(*figures(out, "(c) Ray 1 worker / in-process (both forwarding): {n} (target >= 0.95)"), positive=True)
    for name in ("in a process that ran before", "each in a new process", "(a CLI call vs a script)"):
        ours, fit, ratio = figures(out, f"{name}: medians {{n}} s / {{n}} s = {{n}} (target <= 1.2)")
        finite(ours, fit, ratio, positive=True)
    finite(*figures(out, "a TorchTrainer whose loop does nothing: {n} s to its start"), positive=True)


def test_sweep_asha_tiny(ray_session, tmp_path):
    out = run_tiny("sweep_asha.py", tmp_path, ray_session)
    for scheduler in ("FIFO", "ASHA"):
        objective, epochs, minutes, rate = figures(
            out, f"{scheduler}: best objective {{n}}, {{n}} epochs, {{n}} min, {{n}} trials/min")
        assert 0 <= objective <= 1 and epochs == 1  # 1 trial x 1 epoch
        finite(minutes, rate, positive=True)
    for what in ("objective", "epochs", "time"):
        finite(*figures(out, f"ASHA/FIFO {what} ratio {{n}}"), positive=True)
    assert re.search(r"^(targets met|TARGETS MISSED)$", out, re.M), out


def test_journal_tiny(ray_session, tmp_path):
    out = run_tiny("journal.py", tmp_path, ray_session)
    figures(out, "journal throughput: {n} rows per round in batches of 500, split among K concurrent callers")
    for k in (1, 2, 8, 16):
        on, off, ratio, per_call, calls = figures(
            out, f"K={k} concurrent callers: fsync on {{n}} records/s, off {{n}} records/s, ratio on/off {{n}}; "
                 f"{{n}} fsyncs per call ({{n}} calls)")
        finite(on, off, ratio, positive=True)
        assert 0 < per_call <= 1 and calls > 0  # calls share fsyncs: never more than one each
    p50, p99, most, entries = figures(out, "append to durable at K=8: p50 {n} ms, p99 {n} ms, max {n} ms ({n} entries)")
    assert 0 < p50 <= p99 <= most and entries == 16  # 8 callers x 625 rows, in batches of 500 and 125: each entry timed once
    goal = r"^goal at K=8 \(a 2-worker run .*\): ratio \S+ \(goal >= 0\.8\): (met|MISSED)$"
    assert re.search(goal, out, re.M), out
    count, rate, p50, p99 = figures(out, "emit to durable: {n} records at {n}/s, p50 {n} ms, p99 {n} ms "
                                         f"(forwarder flush interval {FLUSH_INTERVAL} s)")
    assert count == 2_000 and p99 >= p50  # 1 s at 2,000 rows/s, each journaled once


def test_scale_tiny(ray_session, tmp_path):
    out = run_tiny("scale.py", tmp_path, ray_session)
    for n in (2, 4):
        offered, delivered, records, seconds, lag = figures(
            out, f"N={n} ranks at 100 events/s each (forwarders flush every {FLUSH_INTERVAL:g} s): "
                 f"{{n}} records/s offered, {{n}} records/s delivered ({{n}} records in {{n}} s; senders at most {{n}} ms behind schedule)")
        assert offered == 100 * n
        finite(delivered, records, seconds, positive=True)
        finite(*figures(out, "emit to durable: p50 {n} ms, p99 {n} ms, max {n} ms (from the batch's send: "
                             "p50 {n} ms, p99 {n} ms)"))
        finite(*figures(out, "actor CPU {n} of a core ({n} s), RSS {n} MB (peak {n} MB)"), positive=True)
        calls, syncs, _ = figures(out, "MB); {n} ingest calls, {n} fsyncs ({n} s)")
        assert 0 < syncs <= calls  # each call is made durable by an fsync; calls may share one
        rows, emitted, lost, twice = figures(out, "raw event-log rows {n} of {n} emitted: lost {n}, stored twice {n}")
        assert rows == emitted > 0 and lost == twice == 0  # correctness, in tiny mode too
    assert re.search(r"^goal at N=4 \(target N=256\): p99 .*: (met|MISSED)$", out, re.M), out

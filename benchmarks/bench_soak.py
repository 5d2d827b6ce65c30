"""Soak test of the service on loopback: N clients post real bundles to ``/encode`` for a bounded time.

Starts ``bentoml serve`` (the repository's service, tests/serving.py) on a free 127.0.0.1 port, runs
``--clients`` closed-loop clients (asyncio, one connection each, started ``--ramp`` s apart so that
the connections spread over the workers) that post the real subject01 bundles (pre-encoded
multipart bodies, in a seeded order) until ``--duration`` seconds have passed, then stops by itself
and stops the server. Reports:

* requests, status counts (errors: anything but 200, client-side exceptions by type), req/s, p50/p99
  latency of the 200 answers (and of the 503 answers when there are any);
* RSS of every process of the server tree over time (``/proc/<pid>/status``: VmRSS, RssAnon,
  RssFile, threads) and its CPU seconds (``/proc/<pid>/stat``), sampled every ``--sample-every`` s,
  labelled arbiter / worker:N; per process: RSS before the load, after the warm-up, max,
  at the end, the CPU seconds it spent during the load (which also shows how the clients' connections
  fell on the workers) and the workers' CPU milliseconds per answered request;
* the RSS verdict (soak mode): every worker's RSS stays within ``--rss-bound`` (default 1.25) times
  its level at the end of the warm-up, from then to the end of the load: ``max after warm-up <= 1.25 x
  level`` (so the end, too). The warm-up is the first ``--warmup`` seconds of load (default: a quarter
  of the duration, at most 60 s); the level is the highest RSS sampled in its last ``--window``
  seconds (default 30: t = 30..60 s), not one sample, because the allocator and the heap trim
  (`vqdiff.memory.trim_heap`) swing a worker's RSS by up to 2x within seconds (the torch
  engine) and one sample would be a coin toss. The end level (the peak of the last ``--window``
  seconds) and the single samples are reported too. The exit status is 1 when a worker exceeds it;
* load average before and after, CPU model and SIMD flags, the server's environment overrides.

    python benchmarks/bench_soak.py                              # 16 clients, 300 s, models/default
    python benchmarks/bench_soak.py --duration 120 --clients 8 --server-env MALLOC_ARENA_MAX=
    python benchmarks/bench_soak.py --overload                   # 503 latency: 64 clients, 4 in flight

``--overload`` measures how fast the overload refusal comes: 64 clients against a service allowed
``--max-concurrency`` (default 4 with --overload) requests in flight, so most answers are the guard's
503 + Retry-After; the 503 p50/p99 are the figure. Loopback only; client and server share the CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the serve-process helper of the tests

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from _common import LoadWatch, add_served_model_args, cpu_summary  # noqa: E402
from serving import ServeProcess, make_dev_model  # noqa: E402

BOUNDARY = "vqdiffsoak"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_served_model_args(p)
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 16; 64 with --overload)")
    p.add_argument("--duration", type=float, default=None, help="seconds of load (default 300; 20 with --overload)")
    p.add_argument("--warmup", type=float, default=None, help="seconds counted as warm-up for the RSS growth "
                   "(default: a quarter of the duration, at most 60)")
    p.add_argument("--window", type=float, default=30.0, help="seconds at the end of the warm-up (and of the "
                   "load) whose highest RSS sample is the worker's level then (default 30)")
    p.add_argument("--rss-bound", type=float, default=1.25, help="the verdict: every worker's RSS after the "
                   "warm-up at most this times its level at the end of the warm-up (default 1.25)")
    p.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling period, seconds")
    p.add_argument("--workers", type=int, help="VQDIFF_WORKERS of the server (default: its own, auto)")
    p.add_argument("--threads", type=int, help="VQDIFF_THREADS of the server (default: its own, auto)")
    p.add_argument("--max-concurrency", type=int, default=None, help="VQDIFF_MAX_CONCURRENCY of the server")
    p.add_argument("--overload", action="store_true", help="measure the 503 latency (64 clients, 4 in flight)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the server only (repeatable; KEY= sets it empty)")
    p.add_argument("--backoff", choices=["retry-after", "none"], default=None,
                   help="after a 503: wait Retry-After (at most 1 s; the soak default) or retry at once (the "
                   "--overload default: the refusal path at its busiest)")
    p.add_argument("--ramp", type=float, default=None, help="seconds between two clients' starts (default "
                   "0.1; 0 with --overload): asyncio accepts every waiting connection at once, so clients "
                   "connecting together would all be served by one worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results (time series included) as JSON here")
    p.add_argument("--log", help="write the server's log here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    args.clients = args.clients or (64 if args.overload else 16)
    args.duration = args.duration or (20.0 if args.overload else 300.0)
    if args.max_concurrency is None and args.overload:
        args.max_concurrency = 4
    args.backoff = args.backoff or ("none" if args.overload else "retry-after")
    if args.ramp is None:
        args.ramp = 0.0 if args.overload else 0.1
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 4)
    args.window = max(args.sample_every, min(args.window, args.warmup, args.duration - args.warmup))
    return args


# ---------------------------------------------------------------------------------------------- machine
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _status(pid: int) -> dict:
    """VmRSS / RssAnon / RssFile (MB) and Threads of one process, from /proc/<pid>/status, and its CPU
    seconds (user + system) from /proc/<pid>/stat."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out[key] = int(value)
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()  # after the command name
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return out


def _worker_pids(root: int) -> list[int]:
    """The server's worker processes: the Python processes under ``bentoml serve`` (the arbiter), oldest
    first; helper processes that are no Python (e.g. a resource tracker's shell) are left out."""
    import psutil

    kids = []
    for child in psutil.Process(root).children(recursive=True):
        try:
            if "python" in child.name().lower() and child.ppid() == root:
                kids.append((child.create_time(), child.pid))
        except psutil.Error:
            continue
    return [pid for _, pid in sorted(kids)]


class RssSampler(threading.Thread):
    """Samples the RSS of the server's process tree every ``every`` seconds until stopped."""

    def __init__(self, root_pid: int, every: float):
        super().__init__(daemon=True)
        self.root, self.every = root_pid, every
        self.samples: list[dict] = []  # {"t": s since start, "procs": {label: status}}
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def tree(self) -> dict[str, int]:
        import psutil

        procs = {"arbiter": self.root}
        try:
            procs.update({f"worker:{i + 1}": pid for i, pid in enumerate(_worker_pids(self.root))})
        except psutil.Error:
            pass
        return procs

    def sample(self) -> dict:
        procs = {}
        for label, pid in self.tree().items():
            try:
                procs[label] = {"pid": pid, **_status(pid)}
            except (OSError, ValueError):
                continue
        s = {"t": round(time.monotonic() - self.t0, 1), "procs": procs}
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self._halt.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# ---------------------------------------------------------------------------------------------- load
def multipart(name: str, data: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


async def _client(k: int, url: str, bodies: list, stop_at: float, seed: int, records: list, timeout: float,
                  backoff: bool, ramp: float = 0.0) -> None:
    order = list(range(len(bodies)))
    random.Random(seed * 1000 + k).shuffle(order)
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    i = 0
    await asyncio.sleep(k * ramp)  # opened all at once, the connections all land on the first worker
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=1)) as c:
        while time.monotonic() < stop_at:
            body = bodies[order[i % len(order)]]
            i += 1
            t = time.monotonic()
            try:
                r = await c.post("/encode", content=body, headers=headers)
                status = r.status_code
                if status == 503 and backoff:  # as a client should: wait what the server asks (bounded)
                    records.append((t, time.monotonic() - t, status))
                    await asyncio.sleep(min(float(r.headers.get("retry-after", "1") or 1), 1.0))
                    continue
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            records.append((t, time.monotonic() - t, status))


async def load(url: str, bodies: list, clients: int, seconds: float, seed: int, timeout: float,
               backoff: bool = True, ramp: float = 0.0) -> tuple[list, float]:
    records: list = []
    t0 = time.monotonic()
    await asyncio.gather(*(_client(k, url, bodies, t0 + seconds, seed, records, timeout, backoff, ramp)
                           for k in range(clients)))
    return records, time.monotonic() - t0


def _pct(values, q) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 1) if len(values) else None


def summarise(records: list, wall: float) -> dict:
    statuses = Counter(str(s) for _, _, s in records)
    ok = [d for _, d, s in records if s == 200]
    busy = [d for _, d, s in records if s == 503]
    return {"requests": len(records), "ok": len(ok), "errors": len(records) - len(ok), "status": dict(statuses),
            "seconds": round(wall, 1), "ok_per_s": round(len(ok) / wall, 2),
            "p50_ms": _pct(ok, 50), "p99_ms": _pct(ok, 99), "max_ms": _pct(ok, 100),
            "p50_503_ms": _pct(busy, 50), "p99_503_ms": _pct(busy, 99), "max_503_ms": _pct(busy, 100)}


def rss_summary(samples: list[dict], load_t0: float, duration: float, warmup_s: float, window_s: float,
                bound: float) -> dict:
    """Per process: RSS before the load, after the warm-up, max after it, at the end; the levels (window
    peaks) at the end of the warm-up and of the load, the growths and the verdict; CPU s during the load."""
    out = {}
    labels = sorted({k for s in samples for k in s["procs"]})
    warm_t, end_t = load_t0 + warmup_s, load_t0 + duration - window_s
    for label in labels:
        series = [(s["t"], s["procs"][label]) for s in samples if label in s["procs"]]
        before = [p for t, p in series if t <= load_t0] or [series[0][1]]
        warming = [p for t, p in series if warm_t - window_s <= t <= warm_t] or [series[0][1]]
        after_warm = [p for t, p in series if t >= warm_t] or [series[-1][1]]
        last = [p for t, p in series if t >= end_t] or [series[-1][1]]
        start, after, end = before[-1], after_warm[0], series[-1][1]
        level = max(p["VmRSS"] for p in warming)
        level_end = max(p["VmRSS"] for p in last)
        peak = max(p["VmRSS"] for p in after_warm)
        out[label] = {"pid": end["pid"], "before_mb": round(start["VmRSS"]), "after_warmup_mb": round(after["VmRSS"]),
                      "max_mb": round(max(p["VmRSS"] for _, p in series)), "max_after_warmup_mb": round(peak),
                      "end_mb": round(end["VmRSS"]),
                      "end_anon_mb": round(end.get("RssAnon", 0)), "end_file_mb": round(end.get("RssFile", 0)),
                      "threads": end.get("Threads"), "growth_after_warmup": round(end["VmRSS"] / after["VmRSS"], 3),
                      "level_warmup_mb": round(level), "level_end_mb": round(level_end),
                      "end_growth": round(level_end / level, 3), "max_growth": round(peak / level, 3),
                      "within_bound": peak <= bound * level,
                      "cpu_s": round(end.get("cpu_s", 0.0) - start.get("cpu_s", 0.0), 1)}
    return out


def rss_verdict(rss: dict, bound: float) -> dict:
    workers = {k: v for k, v in rss.items() if k != "arbiter"}
    over = sorted(k for k, v in workers.items() if not v["within_bound"])
    return {"bound": bound, "ok": not over, "over": over,
            "worst": max((v["max_growth"] for v in workers.values()), default=None)}


def main(argv=None) -> int:
    args = _args(argv)
    from vqdiff.io import load_bundle

    files = sorted(Path(args.data).glob("*.trk"))
    if not files:
        print(f"no .trk bundles in {args.data}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="vqdiff-soak-"))
    if args.dev_model:
        model_dir = make_dev_model(tmp / "model", args.data)
    else:
        from vqdiff.codec import default_model_dir

        model_dir = Path(args.model or os.environ.get("VQDIFF_MODEL") or default_model_dir())
    bodies = [multipart(f.name, f.read_bytes()) for f in files]
    streamlines = sum(len(load_bundle(f)) for f in files)
    overrides = dict(kv.split("=", 1) for kv in args.server_env)
    env = {"VQDIFF_MODEL": str(model_dir), "VQDIFF_MODEL_TAG": "", "VQDIFF_API_TOKEN": "",
           "BENTOML_HOME": str(tmp / "bentoml"), **overrides}
    if args.workers:
        env["VQDIFF_WORKERS"] = str(args.workers)
    if args.threads:
        env["VQDIFF_THREADS"] = str(args.threads)
    if args.max_concurrency:
        env["VQDIFF_MAX_CONCURRENCY"] = str(args.max_concurrency)
    result = {"mode": "overload" if args.overload else "soak", "clients": args.clients, "duration_s": args.duration,
              "backoff": args.backoff, "ramp_s": args.ramp,
              "bundles": len(files), "streamlines_per_round": streamlines, "model": str(model_dir),
              "cpu": cpu_summary(), "server_env": {k: v for k, v in env.items() if not k.startswith("BENTOML_HOME")}}
    watch = LoadWatch(quiet=True)
    result["loadavg_before"] = watch.before
    print(f"load average before: {watch.before}; CPU {result['cpu']['model']} x{result['cpu']['cores']}, "
          f"ISA {' '.join(result['cpu']['isa'])}", file=sys.stderr)
    with ServeProcess(env, log_path=args.log or tmp / "serve.log") as server:
        with httpx.Client(base_url=server.url) as c:
            card = c.get("/model").json()
        sampler = RssSampler(server.proc.pid, args.sample_every)
        sampler.sample()
        sampler.start()
        load_t0 = time.monotonic() - sampler.t0
        records, wall = asyncio.run(load(server.url, bodies, args.clients, args.duration, args.seed,
                                         timeout=max(60.0, 2 * float(env.get("VQDIFF_TIMEOUT_S", 120))),
                                         backoff=args.backoff == "retry-after", ramp=args.ramp))
        sampler.stop()
        sampler.sample()
    result["machine_load"] = watch.finish(quiet=True)
    result["loadavg_after"] = result["machine_load"]["load_avg_after"]
    result["server"] = f"{card.get('backend')}/{card.get('provider')} model {card.get('model', {}).get('id')}"
    result["load"] = summarise(records, wall)
    result["warmup_s"], result["window_s"] = args.warmup, args.window
    result["rss"] = rss_summary(sampler.samples, load_t0, wall, args.warmup, args.window, args.rss_bound)
    result["rss_verdict"] = rss_verdict(result["rss"], args.rss_bound)
    worker_cpu = sum(v["cpu_s"] for k, v in result["rss"].items() if k.startswith("worker"))
    ok = result["load"]["ok"]
    result["worker_cpu_ms_per_ok"] = round(1e3 * worker_cpu / ok, 1) if ok else None
    result["rss_series"] = sampler.samples
    print(report(result, load_t0))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)  # kept (server log included) when the run fails
    return 0 if args.overload or result["rss_verdict"]["ok"] else 1


def report(r: dict, load_t0: float) -> str:
    ld = r["load"]
    lines = [f"{r['mode']}: {r['clients']} clients x {ld['seconds']} s on {r['server']}; {r['bundles']} real bundles "
             f"({r['streamlines_per_round']} streamlines per round); server env "
             f"{ {k: v for k, v in r['server_env'].items() if not k.startswith('VQDIFF_MODEL')} }",
             f"requests {ld['requests']}  ok {ld['ok']} ({ld['ok_per_s']}/s)  errors {ld['errors']}  status {ld['status']}",
             f"latency of 200s: p50 {ld['p50_ms']} ms  p99 {ld['p99_ms']} ms  max {ld['max_ms']} ms"]
    if ld["p50_503_ms"] is not None:
        lines.append(f"latency of 503s: p50 {ld['p50_503_ms']} ms  p99 {ld['p99_503_ms']} ms  max {ld['max_503_ms']} ms")
    lines.append(f"load average before {tuple(round(x, 2) for x in r['loadavg_before'])}  after "
                 f"{tuple(round(x, 2) for x in r['loadavg_after'])}; CPU {r['cpu']['model']} x{r['cpu']['cores']} "
                 f"[{' '.join(r['cpu']['isa'])}]")
    w, ww = r["warmup_s"], r["window_s"]
    lines.append(f"RSS per process (MB), samples: before load / after warm-up / max after warm-up / end (anon+file, "
                 f"threads), end/after;  levels (peaks of {ww:g} s): end of warm-up (t = {w - ww:g}..{w:g} s) -> "
                 f"end of load, ratio; max after warm-up / level;  CPU s during the load")
    for label, s in r["rss"].items():
        verdict = "" if label == "arbiter" else ("  ok" if s["within_bound"] else "  OVER")
        lines.append(f"  {label:10s} pid {s['pid']:>7}: {s['before_mb']:>6} / {s['after_warmup_mb']:>6} / "
                     f"{s['max_after_warmup_mb']:>6} / {s['end_mb']:>6} ({s['end_anon_mb']}+{s['end_file_mb']}, "
                     f"{s['threads']} thr) x{s['growth_after_warmup']};  levels {s['level_warmup_mb']:>6} -> "
                     f"{s['level_end_mb']:>6} x{s['end_growth']}; max x{s['max_growth']}{verdict};  cpu {s['cpu_s']} s")
    if r.get("worker_cpu_ms_per_ok") is not None:
        lines.append(f"worker CPU per answered request: {r['worker_cpu_ms_per_ok']} ms")
    v = r["rss_verdict"]
    lines.append(f"RSS verdict: {'PASS' if v['ok'] else 'FAIL'}: after the warm-up ({w:g} s) every worker's RSS stays "
                 f"within x{v['bound']} of its level at the end of the warm-up (peak of t = {w - ww:g}..{w:g} s); "
                 f"worst x{v['worst']}" + (f"; over: {', '.join(v['over'])}" if v["over"] else ""))
    labels = list(r["rss"])
    lines.append("RSS over time (MB), t = s since the load started: " + "  ".join(labels))
    series = r["rss_series"]
    step = max(1, len(series) // 24)
    for s in series[::step] + ([series[-1]] if (len(series) - 1) % step else []):
        row = "  ".join(f"{round(s['procs'][k]['VmRSS']) if k in s['procs'] else '-':>7}" for k in labels)
        lines.append(f"  t={s['t'] - load_t0:7.1f}  {row}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

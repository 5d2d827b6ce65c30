"""Soak test of the service on loopback: N clients post real bundles to ``/encode`` for a bounded time.

Starts ``bentoml serve`` (the repository's service, tests/serving.py) on a free 127.0.0.1 port, runs
``--clients`` closed-loop clients (asyncio, one connection each) that post the real subject01 bundles
(pre-encoded multipart bodies, in a seeded order) until ``--duration`` seconds have passed, then
stops by itself and stops the server. Reports:

* requests, status counts (errors: anything but 200, client-side exceptions by type), req/s, p50/p99
  latency of the 200 answers (and of the 503 answers when there are any);
* RSS of every process of the server tree over time (``/proc/<pid>/status``: VmRSS, RssAnon,
  RssFile, threads), sampled every ``--sample-every`` s, labelled arbiter / gateway:N / model:N, and
  per worker: RSS before the load, after the warm-up (``--warmup`` s), at the end, and the growth
  end / after-warm-up;
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
from _common import LoadWatch, cpu_summary  # noqa: E402
from serving import ServeProcess, make_dev_model  # noqa: E402

BOUNDARY = "vqdiffsoak"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint or export directory (default: $VQDIFF_MODEL or models/default)")
    p.add_argument("--dev-model", action="store_true", help="serve a random-weight model")
    p.add_argument("--data", default=os.environ.get("VQDIFF_SHARED_DATA", str(REPO.parent / "shared" / "data")) +
                   "/subject01", help="folder of .trk bundles")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 16; 64 with --overload)")
    p.add_argument("--duration", type=float, default=None, help="seconds of load (default 300; 20 with --overload)")
    p.add_argument("--warmup", type=float, default=None, help="seconds counted as warm-up for the RSS growth "
                   "(default: a quarter of the duration, at most 60)")
    p.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling period, seconds")
    p.add_argument("--workers", type=int, default=2, help="gateway workers")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="model engine threads")
    p.add_argument("--max-concurrency", type=int, default=None, help="VQDIFF_MAX_CONCURRENCY of the server")
    p.add_argument("--overload", action="store_true", help="measure the 503 latency (64 clients, 4 in flight)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the server only (repeatable; KEY= sets it empty)")
    p.add_argument("--backoff", choices=["retry-after", "none"], default=None,
                   help="after a 503: wait Retry-After (at most 1 s; the soak default) or retry at once (the "
                   "--overload default: the refusal path at its busiest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results (time series included) as JSON here")
    p.add_argument("--log", help="write the server's log here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    args.clients = args.clients or (64 if args.overload else 16)
    args.duration = args.duration or (20.0 if args.overload else 300.0)
    if args.max_concurrency is None and args.overload:
        args.max_concurrency = 4
    args.backoff = args.backoff or ("none" if args.overload else "retry-after")
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 4)
    return args


# ---------------------------------------------------------------------------------------------- machine
def _status(pid: int) -> dict:
    """VmRSS / RssAnon / RssFile (MB) and Threads of one process, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def _label(cmdline: list[str], gateway: str) -> str | None:
    from vqdiff.service.lifecycle import _WORKER_MODULE, _service_of

    if _WORKER_MODULE not in cmdline:
        return None
    name = _service_of(cmdline) or "?"
    wid = cmdline[cmdline.index("--worker-id") + 1] if "--worker-id" in cmdline else "?"
    return f"{'gateway' if name == gateway else 'model'}:{wid}"


class RssSampler(threading.Thread):
    """Samples the RSS of the server's process tree every ``every`` seconds until stopped."""

    def __init__(self, root_pid: int, every: float, gateway: str = "vqdiff"):
        super().__init__(daemon=True)
        self.root, self.every, self.gateway = root_pid, every, gateway
        self.samples: list[dict] = []  # {"t": s since start, "procs": {label: status}}
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def tree(self) -> dict[str, int]:
        import psutil

        procs = {"arbiter": self.root}
        try:
            for child in psutil.Process(self.root).children(recursive=True):
                try:
                    label = _label(child.cmdline(), self.gateway)
                except psutil.Error:
                    continue
                if label:
                    procs[label] = child.pid
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
                  backoff: bool) -> None:
    order = list(range(len(bodies)))
    random.Random(seed * 1000 + k).shuffle(order)
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    i = 0
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
               backoff: bool = True) -> tuple[list, float]:
    records: list = []
    t0 = time.monotonic()
    await asyncio.gather(*(_client(k, url, bodies, t0 + seconds, seed, records, timeout, backoff)
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


def rss_summary(samples: list[dict], load_t0: float, warmup_s: float) -> dict:
    """Per worker: RSS before the load, after the warm-up, max, at the end; growth end / after-warm-up."""
    out = {}
    labels = sorted({k for s in samples for k in s["procs"]})
    for label in labels:
        series = [(s["t"], s["procs"][label]) for s in samples if label in s["procs"]]
        before = [p for t, p in series if t <= load_t0] or [series[0][1]]
        warm = [p for t, p in series if t >= load_t0 + warmup_s] or [series[-1][1]]
        start, after, end = before[-1], warm[0], series[-1][1]
        out[label] = {"pid": end["pid"], "before_mb": round(start["VmRSS"]), "after_warmup_mb": round(after["VmRSS"]),
                      "max_mb": round(max(p["VmRSS"] for _, p in series)), "end_mb": round(end["VmRSS"]),
                      "end_anon_mb": round(end.get("RssAnon", 0)), "end_file_mb": round(end.get("RssFile", 0)),
                      "threads": end.get("Threads"), "growth_after_warmup": round(end["VmRSS"] / after["VmRSS"], 3)}
    return out


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
           "VQDIFF_THREADS": str(args.threads), "VQDIFF_GATEWAY_WORKERS": str(args.workers),
           "BENTOML_HOME": str(tmp / "bentoml"), **overrides}
    if args.max_concurrency:
        env["VQDIFF_MAX_CONCURRENCY"] = str(args.max_concurrency)
    result = {"mode": "overload" if args.overload else "soak", "clients": args.clients, "duration_s": args.duration,
              "backoff": args.backoff,
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
                                         backoff=args.backoff == "retry-after"))
        sampler.stop()
        sampler.sample()
    result["machine_load"] = watch.finish(quiet=True)
    result["loadavg_after"] = result["machine_load"]["load_avg_after"]
    result["server"] = f"{card.get('backend')}/{card.get('provider')} model {card.get('model', {}).get('id')}"
    result["load"] = summarise(records, wall)
    result["rss"] = rss_summary(sampler.samples, load_t0, args.warmup)
    result["rss_series"] = sampler.samples
    print(report(result, load_t0))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)  # kept (server log included) when the run fails
    return 0


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
    lines.append("RSS per process (MB): before load / after warm-up / max / end (anon+file, threads), growth end/warm")
    for label, s in r["rss"].items():
        lines.append(f"  {label:10s} pid {s['pid']:>7}: {s['before_mb']:>6} / {s['after_warmup_mb']:>6} / "
                     f"{s['max_mb']:>6} / {s['end_mb']:>6} ({s['end_anon_mb']}+{s['end_file_mb']}, {s['threads']} thr)"
                     f"  x{s['growth_after_warmup']}")
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

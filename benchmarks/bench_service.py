"""Service throughput and latency beside the offline pipeline, in one run.

Starts ``bentoml serve`` (the repository's service) on a free port, sends ``POST /encode`` (or
``/decode``) requests of real bundles from 1, 4 and 16 concurrent clients (closed loop, fixed
duration per level) and reports requests/s, streamlines/s, p50/p99 latency and the micro-batching
(requests per engine call, from ``vqdiff_batch_requests`` on /metrics); the offline figures come from
the same engine selection in this process doing the same work as the service, one bundle at a time, the
engine on every core: /encode = `Codec.encode_file` of the file (read, sha256, segment=auto's multi-bundle
check, register, canonicalise, encode, the fidelity decode) + serialise; /decode = read the latents, decode,
write TRK bytes; and the engine alone. Measured before the service starts and again after each level,
each level compared with the mean of the offline windows just before and after it, so that background
load drifting on a shared machine is shared (the windows are ``--seconds`` long and adjacent to the level). The server runs its defaults
(``VQDIFF_WORKERS`` / ``VQDIFF_THREADS`` auto) unless ``--workers`` / ``--server-threads`` say otherwise.

    python benchmarks/bench_service.py                       # models/default (or $VQDIFF_MODEL)
    python benchmarks/bench_service.py --dev-model --seconds 20 --out runs/bench_service.json

The machine (and anything else running on it) serves, canonicalises and sends the requests: on a
small CPU box the client's own work is part of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the serve-process helper of the tests

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from _common import LoadWatch, add_served_model_args, cpu_summary  # noqa: E402
from serving import ServeProcess, make_dev_model  # noqa: E402


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_served_model_args(p)
    p.add_argument("--endpoint", choices=["encode", "decode"], default="encode")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels")
    p.add_argument("--seconds", type=float, default=20.0, help="duration of each level")
    p.add_argument("--engine", default=os.environ.get("VQDIFF_ENGINE", "auto"), help="VQDIFF_ENGINE of both sides")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="offline engine threads")
    p.add_argument("--workers", type=int, help="VQDIFF_WORKERS of the server (default: its own, auto)")
    p.add_argument("--server-threads", type=int, help="VQDIFF_THREADS of the server (default: its own, auto)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", help="more server settings")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def _percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def offline(codec, payloads, files, endpoint: str, seconds: float) -> dict:
    """The service's work in this process (the module doc), one bundle after the other, for ``seconds``."""
    from vqdiff.io import bundle_to_bytes
    from vqdiff.subject import load_latents

    engine = codec.engine
    if endpoint == "encode":  # warm-up (kernels, allocations), untimed
        codec.encode_file(files[0])
    else:
        codec.decode(load_latents(payloads[0][1]))
    n_req = n_sl = n_groups = 0
    engine_s = 0.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        name, data, count = payloads[n_req % len(payloads)]
        if endpoint == "encode":  # as the service: segment=auto, register=auto, fidelity, input sha256
            lat = codec.encode_file(files[n_req % len(files)])
            lat.to_bytes()
            n_groups += lat.n_groups
            te = time.perf_counter()
            codec.encode_groups(np.zeros((lat.n_groups, 3, 64, 64), np.float32))
            engine_s += time.perf_counter() - te
        else:
            lat = load_latents(data)
            bundle_to_bytes(codec.decode(lat), format="trk")
            n_groups += lat.n_groups
        n_req += 1
        n_sl += count
    wall = time.perf_counter() - t0 - engine_s
    return {"requests": n_req, "seconds": wall, "req_per_s": n_req / wall, "streamlines_per_s": n_sl / wall,
            "engine_groups_per_s": (n_groups / engine_s) if engine_s else None, "backend": engine.backend,
            "provider": engine.provider, "variant": getattr(engine, "variant_name", None)}


def _batch_hist(client, op):
    """(engine calls, requests they carried) of ``op``, summed over the workers."""
    count = total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if f'op="{op}"' in line:
            if line.startswith("vqdiff_batch_requests_count"):
                count += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vqdiff_batch_requests_sum"):
                total += float(line.rsplit(" ", 1)[1])
    return count, total


def load_level(url: str, payloads, endpoint: str, clients: int, seconds: float) -> dict:
    """Closed loop: ``clients`` threads send requests back to back for ``seconds``."""
    lat, errors, done = [], [], [0, 0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    suffix = ".trk" if endpoint == "encode" else ".vqlat"

    def worker(k):
        i = k
        with httpx.Client(base_url=url, timeout=300.0) as c:
            while time.perf_counter() < stop:
                name, data, count = payloads[i % len(payloads)]
                i += clients
                t = time.perf_counter()
                r = c.post(f"/{endpoint}", files={"file": (name + suffix, data, "application/octet-stream")})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                        done[0] += 1
                        done[1] += count
                    else:
                        errors.append(r.status_code)

    method = endpoint
    with httpx.Client(base_url=url) as c:
        b0 = _batch_hist(c, method)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(worker, range(clients)))
        wall = time.perf_counter() - t0
        b1 = _batch_hist(c, method)
    batches = b1[0] - b0[0]
    return {"clients": clients, "requests": done[0], "errors": len(errors), "seconds": wall,
            "req_per_s": done[0] / wall, "streamlines_per_s": done[1] / wall,
            "p50_ms": 1e3 * _percentile(lat, 50), "p99_ms": 1e3 * _percentile(lat, 99),
            "batches": batches, "requests_per_batch": ((b1[1] - b0[1]) / batches) if batches else None}


def main(argv=None) -> int:
    args = _args(argv)
    os.environ["VQDIFF_ENGINE"] = args.engine  # the offline side's selection (vqdiff.export.select)
    from vqdiff.io import load_bundle

    data_dir = Path(args.data)
    files = sorted(data_dir.glob("*.trk"))
    if not files:
        print(f"no .trk bundles in {data_dir}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="vqdiff-bench-"))
    if args.dev_model:
        model_dir = make_dev_model(tmp / "model", data_dir)
    else:
        from vqdiff.codec import default_model_dir

        model_dir = Path(args.model) if args.model else default_model_dir()
    payloads = [(f.stem, f.read_bytes(), len(load_bundle(f))) for f in files]
    if args.endpoint == "decode":  # latents of every bundle, made offline with the same model
        from vqdiff.export.runtime import make_codec

        codec = make_codec(model_dir, threads=args.threads)
        payloads = [(n, codec.encode(load_bundle(f)).to_bytes(), c) for (n, _, c), f in zip(payloads, files, strict=True)]
    levels = [int(c) for c in args.clients.split(",")]
    results = {"model": str(model_dir), "endpoint": args.endpoint, "bundles": len(payloads),
               "streamlines_per_round": sum(p[2] for p in payloads), "cpus": os.cpu_count(), "levels": []}

    watch = LoadWatch(os.cpu_count())  # server, workers and clients share the machine
    results["cpu"] = cpu_summary()
    print(f"CPU: {results['cpu']}", flush=True)
    from vqdiff.blas import limit_blas_threads
    from vqdiff.export.runtime import make_codec

    limit_blas_threads()  # as in the service
    codec = make_codec(model_dir, threads=args.threads)  # the VQDIFF_ENGINE selection, the model's templates, as served
    off = [offline(codec, payloads, files, args.endpoint, args.seconds)]
    env = {"VQDIFF_MODEL": str(model_dir), "VQDIFF_MODEL_TAG": "", "VQDIFF_API_TOKEN": "", "VQDIFF_ENGINE": args.engine,
           "BENTOML_HOME": str(tmp / "bentoml"), **dict(kv.split("=", 1) for kv in args.server_env)}
    if args.workers:
        env["VQDIFF_WORKERS"] = str(args.workers)
    if args.server_threads:
        env["VQDIFF_THREADS"] = str(args.server_threads)
    with ServeProcess(env, log_path=tmp / "serve.log") as server:
        with httpx.Client(base_url=server.url) as c:
            card = c.get("/model").json()
        load_level(server.url, payloads, args.endpoint, max(levels), min(5.0, args.seconds))  # warm-up
        for n in levels:  # each level between two offline windows (the server idles during them)
            level = load_level(server.url, payloads, args.endpoint, n, args.seconds)
            off.append(offline(codec, payloads, files, args.endpoint, args.seconds))
            level["offline_streamlines_per_s"] = (off[-2]["streamlines_per_s"] + off[-1]["streamlines_per_s"]) / 2
            results["levels"].append(level)
            print(json.dumps(level), file=sys.stderr)
    results["offline_runs"] = off
    sl = statistics.mean(o["streamlines_per_s"] for o in off)
    rq = statistics.mean(o["req_per_s"] for o in off)
    eng = [o["engine_groups_per_s"] for o in off if o["engine_groups_per_s"]]
    results["offline"] = {"req_per_s": rq, "streamlines_per_s": sl, "engine_groups_per_s": statistics.mean(eng) if eng
                          else None, "backend": off[0]["backend"], "provider": off[0]["provider"],
                          "variant": off[0]["variant"]}
    results["offline_threads"] = args.threads
    results["server_backend"] = f"{card.get('backend')}/{card.get('provider')}"
    results["server_engine"] = {"variant": card.get("engine_variant"), "selection": (card.get("selection") or {}).get("reason"),
                                "workers": card["service"]["workers"], "threads": card["service"]["threads"]}
    results.update(watch.finish())
    print(_table(results))
    print(f"load average before / after: {results.get('load_avg_before')} / {results.get('load_avg_after')}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)  # kept (server log included) when the run fails
    return 0


def _table(r: dict) -> str:
    off = r["offline"]
    rows = [f"/{r['endpoint']} of {r['bundles']} real bundles ({r['streamlines_per_round']} streamlines per round), "
            f"{r['cpus']} CPUs; server {r['server_backend']} {r['server_engine']}, offline "
            f"{off['backend']}/{off['provider']} {off['variant']} x{r['offline_threads']} threads",
            "",
            "| mode | clients | requests | req/s | streamlines/s | p50 ms | p99 ms | requests/batch | % of offline (windows around it) |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| offline pipeline (in-process) | 1 | {sum(o['requests'] for o in r['offline_runs'])} | "
            f"{off['req_per_s']:.2f} | {off['streamlines_per_s']:.0f} | | | | 100% |"]
    for lv in r["levels"]:
        rpb = f"{lv['requests_per_batch']:.2f}" if lv["requests_per_batch"] else "-"
        rows.append(f"| service | {lv['clients']} | {lv['requests']} ({lv['errors']} errors) | {lv['req_per_s']:.2f} | "
                    f"{lv['streamlines_per_s']:.0f} | {lv['p50_ms']:.0f} | {lv['p99_ms']:.0f} | {rpb} | "
                    f"{100 * lv['streamlines_per_s'] / lv['offline_streamlines_per_s']:.0f}% "
                    f"(of {lv['offline_streamlines_per_s']:.0f}) |")
    if off.get("engine_groups_per_s"):
        rows.append("")
        rows.append(f"offline engine alone: {off['engine_groups_per_s']:.0f} groups/s "
                    f"({64 * off['engine_groups_per_s']:.0f} streamlines/s)")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())

"""The BentoML service end to end: a real ``bentoml serve`` subprocess on a free port (started once
for this module with a random-weight model, always terminated), driven over HTTP."""

from __future__ import annotations

import json
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bentoml")
httpx = pytest.importorskip("httpx")

from conftest import SUBJECT  # noqa: E402
from serving import ServeProcess, make_dev_model  # noqa: E402

from vqdiff.bundle import Bundle, SpatialHeader  # noqa: E402
from vqdiff.fileio import file_sha256  # noqa: E402
from vqdiff.io import bundle_to_bytes, load_bundle, load_bundle_bytes  # noqa: E402
from vqdiff.latents import Latents  # noqa: E402

LATENTS_TYPE = "application/vnd.vqdiff.latents"
MAX_UPLOAD_MB = 4
MAX_STREAMLINES = 20_000
MAX_BUNDLES = 4


def _norms(model, path):
    """Norms for tract PYT_R (synthetic: 8 reference profiles, subject01's PYT_R encoded by the dev model plus
    noise; enough to exercise /score, not a cohort)."""
    from vqdiff.analysis import embedding, profile
    from vqdiff.analysis.norms import fit
    from vqdiff.api import Codec

    lat = Codec.from_checkpoint(model).encode_file(SUBJECT / "PYT_R.trk")
    emb, n_nodes = embedding(lat), profile(lat).shape[0]
    ref = emb + np.random.default_rng(0).normal(0, 0.1 * emb.std(), (8, emb.size))
    return fit({"PYT_R": ref}, n_nodes=n_nodes, model_sha256=lat.model["sha256"]).save(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = make_dev_model(root / "model", SUBJECT if SUBJECT.is_dir() else None)
    norms = _norms(model, root / "norms.vqnorm")
    tmp = root / "tmp"
    tmp.mkdir()
    env = {
        "VQDIFF_MODEL": str(model), "VQDIFF_MODEL_TAG": "", "VQDIFF_API_TOKEN": "",
        "VQDIFF_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB), "VQDIFF_MAX_STREAMLINES": str(MAX_STREAMLINES),
        "VQDIFF_WORKERS": "2", "VQDIFF_THREADS": "2", "VQDIFF_MAX_BUNDLES": str(MAX_BUNDLES), "VQDIFF_NORMS": str(norms),
        "BENTOML_HOME": str(root / "bentoml"), "TMPDIR": str(tmp),
    }
    with ServeProcess(env, log_path=root / "serve.log") as proc:
        proc.tmp, proc.model_dir = tmp, model
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120.0) as c:
        yield c


@pytest.fixture(scope="module")
def offline(server):
    from vqdiff.api import Codec

    return Codec.from_checkpoint(server.model_dir)


def _post(client, route, content: bytes, name="bundle.trk", **fields):
    files = {"file": (name, content, "application/octet-stream")}
    files.update({k: (None, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in fields.items()})
    return client.post(route, files=files)


def _synthetic(n=70, points=30, shift=0.0, seed=0) -> Bundle:
    rng = np.random.default_rng(seed)
    lines = np.cumsum(rng.normal(0, 1, (n, points, 3)), axis=1).astype(np.float32) + np.float32(shift)
    return Bundle(streamlines=list(lines), header=SpatialHeader.identity(), source_format="memory", name="synth")


def _raw_trk(records: list[np.ndarray], n_count: int | None = None) -> bytes:
    """A TRK file written record by record (so that it can lie or hold 0/1-point streamlines)."""
    header = bytearray(bundle_to_bytes(_synthetic(1), format="trk")[:1000])
    struct.pack_into("<i", header, 988, len(records) if n_count is None else n_count)
    body = b"".join(struct.pack("<i", len(r)) + np.asarray(r, "<f4").tobytes() for r in records)
    return bytes(header) + body


def _batch_hist(client, op: str) -> tuple[float, float]:
    """(engine calls, engine calls carrying one request's groups) of ``op`` from the micro-batcher's
    histogram (summed over the workers)."""
    text = client.get("/metrics").text
    count = ones = 0.0
    for line in text.splitlines():
        if f'op="{op}"' not in line:
            continue
        if line.startswith("vqdiff_batch_requests_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vqdiff_batch_requests_bucket") and 'le="1.0"' in line:
            ones += float(line.rsplit(" ", 1)[1])
    return count, ones


# ---------------------------------------------------------------------------------------------- probes
def test_probes_and_model_card(client, server, offline):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert "bentoml_service_request_total" in client.get("/metrics").text
    card = client.get("/model").json()
    assert card["model"]["sha256"] == offline.model_hash and card["model"]["kind"] == "vq_diff"
    assert card["backend"] and card["provider"] and card["latent_shape"] == [64, 16, 16]
    assert card["versions"]["bentoml"].startswith("1.4")
    assert card["service"]["max_upload_bytes"] == MAX_UPLOAD_MB << 20
    assert card["service"]["auth"] == "none" and card["normalisation"]["kind"] == "minmax_isotropic"


# ---------------------------------------------------------------------------------------------- round trips
def test_encode_decode_round_trip(client, offline, subject_dir):
    src = subject_dir / "CC_Fr_1.trk"
    bundle = load_bundle(src)
    r = _post(client, "/encode", src.read_bytes(), src.name)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == LATENTS_TYPE and "CC_Fr_1.vqlat" in r.headers["content-disposition"]
    summary = json.loads(r.headers["x-vqdiff-summary"])
    assert summary["streamlines"] == len(bundle) == 960 and summary["groups"] == 15
    lat, ref = Latents.from_bytes(r.content), offline.encode(bundle)
    # the fidelity is measured at encode, as the API's (the dev model of this test reconstructs poorly: flagged)
    assert lat.fidelity["mean_mdf_mm"] == pytest.approx(ref.fidelity["mean_mdf_mm"], abs=1e-3)
    assert [w["code"] for w in summary["warnings"]] == (["poor_reconstruction"] if ref.fidelity["poor"] else [])
    np.testing.assert_array_equal(lat.order, ref.order)
    np.testing.assert_array_equal(lat.flipped, ref.flipped)
    np.testing.assert_allclose(lat.latents, ref.latents, atol=1e-4)
    assert lat.model == offline.model_info
    assert lat.source == {"format": "trk", "name": "CC_Fr_1", "input_sha256": file_sha256(src)}

    r = _post(client, "/decode", r.content, "CC_Fr_1.vqlat")
    assert r.status_code == 200, r.text
    out = load_bundle_bytes(r.content, format="trk")
    expected = offline.decode(ref)
    assert len(out) == len(bundle)  # every streamline back, in the input's order and space
    np.testing.assert_allclose(out.header.affine, bundle.header.affine, atol=1e-5)
    assert out.header.dimensions == bundle.header.dimensions
    np.testing.assert_allclose(np.stack(out.streamlines), np.stack(expected.streamlines), atol=2e-3)
    # the reconstruction error is the model's: the same per-streamline distance as offline
    from vqdiff.metrics import mdf

    orig = np.stack(bundle.streamlines)[None]
    np.testing.assert_allclose(mdf(orig, np.stack(out.streamlines)[None]), mdf(orig, np.stack(expected.streamlines)[None]),
                               atol=2e-3)


def test_service_batch_and_api_write_the_same_bytes(client, server, subject_dir, tmp_path):
    """One codec core: POST /encode, batch encoding and `Codec.encode_file` write identical .vqlat bytes
    (PYT_R: 320 streamlines, 5 groups, one engine call of 5 groups on every path)."""
    from vqdiff.batch.job import run_batch
    from vqdiff.codec import Codec

    src = subject_dir / "PYT_R.trk"
    api = Codec.from_checkpoint(server.model_dir).encode_file(src).to_bytes()
    r = _post(client, "/encode", src.read_bytes(), src.name)
    assert r.status_code == 200, r.text
    (tmp_path / "in" / "sub-01").mkdir(parents=True)
    (tmp_path / "in" / "sub-01" / src.name).symlink_to(src)
    summary = run_batch("encode", tmp_path / "in", tmp_path / "out", model=server.model_dir, backend="torch",
                        batch_size=5, progress=False)
    assert summary["done"] == 1, summary
    batch = (tmp_path / "out" / "sub-01" / "PYT_R.vqlat").read_bytes()
    assert Latents.from_bytes(api).n_groups == 5
    assert r.content == api, "service and API latents differ"
    assert batch == api, "batch and API latents differ"


def test_decode_formats_and_restore_points(client, subject_dir):
    src = subject_dir / "POPT_R.trk"
    bundle = load_bundle(src)
    lat = _post(client, "/encode", src.read_bytes(), src.name).content
    r = _post(client, "/decode", lat, "x.vqlat", format="tck", restore_points=True)
    assert r.status_code == 200 and r.headers["content-disposition"].endswith('.tck"')
    tck = load_bundle_bytes(r.content, format="tck", reference=src)
    assert len(tck) == len(bundle) and [len(s) for s in tck.streamlines] == [len(s) for s in bundle.streamlines]
    r = _post(client, "/decode", lat, "x.vqlat", format="trx", summary=True)
    assert r.json()["streamlines"] == len(bundle) and r.json()["format"] == "trx"
    assert _post(client, "/decode", lat, "x.vqlat", format="obj").status_code == 400


def test_tck_with_reference_and_trx_match_trk(client, subject_dir):
    src = subject_dir / "PYT_R.trk"
    bundle = load_bundle(src)
    from_trk = Latents.from_bytes(_post(client, "/encode", src.read_bytes(), src.name).content)
    files = {"file": ("b.tck", bundle_to_bytes(bundle, format="tck")), "reference": ("ref.trk", src.read_bytes())}
    r = client.post("/encode", files=files)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(Latents.from_bytes(r.content).latents, from_trk.latents, atol=1e-3)
    r = _post(client, "/reconstruct", bundle_to_bytes(bundle, format="trx"), "b.trx")
    assert r.status_code == 200, r.text
    assert len(load_bundle_bytes(r.content, format="trx")) == len(bundle)


def test_reconstruct_reports_quality(client, offline, subject_dir):
    src = subject_dir / "ILF_R.trk"
    r = _post(client, "/reconstruct", src.read_bytes(), src.name)
    assert r.status_code == 200, r.text
    buan, mdf_mm = float(r.headers["x-vqdiff-buan"]), float(r.headers["x-vqdiff-mean-mdf-mm"])
    from vqdiff.quality import streamline_mdf

    bundle = load_bundle(src)
    recon = offline.decode(offline.encode(bundle), restore_points=True)
    assert mdf_mm == pytest.approx(streamline_mdf(bundle, recon).mean(), abs=1e-3)
    assert 0.0 <= buan <= 1.0
    figures = _post(client, "/reconstruct", src.read_bytes(), src.name, summary=True).json()
    assert figures["quality"]["buan_t5"] == buan and figures["quality"]["mean_mdf_mm"] == mdf_mm


def test_out_of_range_coordinates_are_flagged(client):
    near = _post(client, "/encode", bundle_to_bytes(_synthetic(), format="trk"), summary=True).json()
    # (the dev model of this test reconstructs a synthetic bundle poorly: the measured fidelity flags it too)
    assert [w for w in near["warnings"] if w["code"] != "poor_reconstruction"] == []
    r = _post(client, "/encode", bundle_to_bytes(_synthetic(shift=900.0), format="trk"))
    assert r.status_code == 200 and r.headers["x-vqdiff-warning"].split(",")[0] == "out_of_training_range"
    (warning,) = [w for w in json.loads(r.headers["x-vqdiff-summary"])["warnings"] if w["code"] != "poor_reconstruction"]
    assert warning["fraction_points_outside"] == 1.0 and warning["input_min"][0] > 800
    assert warning["training_max"][0] < 800 and "training range" in warning["message"]


# ---------------------------------------------------------------------------------------------- batching
def test_concurrent_clients_share_batches(client, server, subject_dir):
    names = ["CC_Fr_1.trk", "FPT_R.trk", "FPT_L.trk", "ILF_L.trk"]  # model-bound sizes (9-17 groups)
    payloads = [(n, (subject_dir / n).read_bytes()) for n in names]
    before = _batch_hist(client, "encode")

    def one(i):
        name, data = payloads[i % len(payloads)]
        with httpx.Client(base_url=server.url, timeout=120.0) as c:
            return _post(c, "/encode", data, name).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(32)))
    assert codes == [200] * 32
    after = _batch_hist(client, "encode")
    batches, single = after[0] - before[0], after[1] - before[1]
    assert batches > 0 and batches - single > 0, f"no batch held more than one request ({batches} batches)"


# ---------------------------------------------------------------------------------------------- hostile input
def _hostile_cases():
    good = bundle_to_bytes(_synthetic(), format="trk")
    nan = bytearray(good)
    struct.pack_into("<f", nan, 1004, float("nan"))
    line = np.zeros((5, 3), np.float32) + np.arange(5, dtype=np.float32)[:, None]
    return {
        "truncated": ("/encode", {"file": ("t.trk", good[: len(good) - 100])}, 400, "truncated"),
        "wrong_magic": ("/encode", {"file": ("w.trk", b"TRACX" + good[5:])}, 415, "wrong_magic"),
        "nan_coordinates": ("/encode", {"file": ("n.trk", bytes(nan))}, 422, "non_finite"),
        "empty_file": ("/encode", {"file": ("e.trk", b"")}, 400, "empty"),
        "zero_point_streamline": ("/encode", {"file": ("z.trk", _raw_trk([line, line[:0]]))}, 422, "too_few_points"),
        "one_point_streamline": ("/encode", {"file": ("o.trk", _raw_trk([line, line[:1]]))}, 422, "too_few_points"),
        "zero_length_streamline": ("/encode", {"file": ("z.trk", _raw_trk([line, np.full((4, 3), 7.0)]))}, 422,
                                   "zero_length"),
        "bad_reference": ("/encode", {"file": ("a.tck", bundle_to_bytes(_synthetic(), format="tck")),
                                      "reference": ("ref.nii", b"\x00" * 400)}, 422, "bad_reference"),
        "header_count_lies": ("/encode", {"file": ("c.trk", _raw_trk([line, line], n_count=5))}, 400,
                              "count_mismatch"),
        "random_bytes": ("/encode", {"file": ("r.trk", np.random.default_rng(1).bytes(4096))}, 415, "wrong_magic"),
        "oversized_upload": ("/encode", {"file": ("big.trk", b"TRACK" + bytes((MAX_UPLOAD_MB << 20) + 10))}, 413,
                             "upload_too_large"),
        "too_many_streamlines": ("/encode", {"file": ("m.trk", _raw_trk([line[:2]] * (MAX_STREAMLINES + 1)))}, 413,
                                 "too_many_streamlines"),
        "url_instead_of_file": ("/encode", {"file": (None, "http://169.254.169.254/latest/meta-data/")}, 400,
                                "url_not_allowed"),
        "url_as_json_body": ("/encode", {"json": {"file": "https://example.com/IFOF_R.trk"}}, 415,
                             "unsupported_media_type"),
        "pickle_body": ("/encode", {"content": b"\x80\x04\x95", "ctype": "application/vnd.bentoml+pickle"}, 415,
                        "unsupported_media_type"),
        "tck_without_reference": ("/encode", {"file": ("a.tck", bundle_to_bytes(_synthetic(), format="tck"))}, 400,
                                  "missing_reference"),
        "text_part_type": ("/reconstruct", {"file": ("a.trk", good, "text/plain")}, 415, "unsupported_part_type"),
        "unknown_field": ("/encode", {"file": ("a.trk", good), "callback": (None, "http://x")}, 400, "unknown_field"),
        "garbage_latents": ("/decode", {"file": ("x.vqlat", good)}, 400, "bad_latents"),
        "truncated_latents": ("/decode", {"latents": lambda b: b[: len(b) // 2]}, 400, "bad_latents"),
        "latents_of_another_model": ("/decode", {"latents": _foreign}, 409, "model_mismatch"),
        "latents_point_bomb": ("/decode", {"latents": _point_bomb}, 413, "too_many_points"),
        "latents_of_one_point_lines": ("/decode", {"latents": _one_point}, 400, "bad_latents"),
    }


def _edit_latents(data: bytes, **changes) -> bytes:
    """The latents file with ``changes``, written without the writer's checks (as a hostile client would)."""
    from safetensors.numpy import save

    lat = Latents.from_bytes(data)
    for key, value in changes.items():
        setattr(lat, key, value(lat) if callable(value) else value)
    return save(lat._tensors(), metadata=lat._metadata())


def _foreign(data):
    return _edit_latents(data, model=lambda lat: {**lat.model, "id": "other", "sha256": "0" * 64})


def _point_bomb(data):
    return _edit_latents(data, n_points=lambda lat: np.full_like(lat.n_points, 10**6))  # each allowed, the sum not


def _one_point(data):
    return _edit_latents(data, n_points=lambda lat: np.ones_like(lat.n_points))


HOSTILE = _hostile_cases()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_is_a_4xx_json(client, case):
    route, spec, status, reason = HOSTILE[case]
    if "json" in spec:
        r = client.post(route, json=spec["json"])
    elif "content" in spec:
        r = client.post(route, content=spec["content"], headers={"content-type": spec["ctype"]})
    elif "latents" in spec:
        lat = _post(client, "/encode", bundle_to_bytes(_synthetic(), format="trk")).content
        r = _post(client, route, spec["latents"](lat), "x.vqlat", restore_points=True)
    else:
        r = client.post(route, files=spec)
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert body["error"] == reason and body["status"] == status and body["message"]
    if status in (400, 413, 415, 422) and reason != "upload_too_large":
        assert body.get("accepted"), body


def test_healthy_after_hostile_input_and_no_temp_files_left(client, server):
    assert client.get("/readyz").status_code == 200
    r = _post(client, "/encode", bundle_to_bytes(_synthetic(), format="trk"), summary=True)
    assert r.status_code == 200 and r.json()["streamlines"] == 70
    metrics = client.get("/metrics").text
    assert not re.search(r'bentoml_service_request_total\{endpoint="/(encode|decode|reconstruct)",'
                         r'http_response_code="5\d\d"[^}]*\} [1-9]', metrics)
    leftovers = [p for p in Path(server.tmp).rglob("*") if p.is_file()
                 and ("bentoml-request-" in str(p) or p.name.startswith(("vqdiff-", "tmp")))]
    assert leftovers == []


def test_fuzzed_uploads_never_reach_a_5xx(client, subject_dir):
    """Mutated real files (tests/test_fuzz.py's mutations) posted to the running service: every answer is a
    200 or a 4xx JSON error, never a 5xx (VQDIFF_FUZZ_CASES scales it up, like the reader fuzzing)."""
    from test_fuzz import SEED, mutations

    n = max(8, int(os.environ.get("VQDIFF_FUZZ_CASES", "150")) // 10)
    rng = np.random.default_rng([SEED, 99])
    src = load_bundle(subject_dir / "PYT_R.trk")
    small = Bundle(src.streamlines[:70], src.header, "trk", "PYT_R")
    bodies = {"trk": bundle_to_bytes(small, format="trk"), "trx": bundle_to_bytes(small, format="trx")}
    latents = _post(client, "/encode", bodies["trk"], "PYT_R.trk").content
    # subjects: a TRX with two groups, its subject latents file (decoded and scored)
    grouped = Bundle(small.streamlines, small.header, "trk", "sub", groups={"A": np.arange(35), "B": np.arange(35, 70)})
    bodies["subject"] = bundle_to_bytes(grouped, format="trx")
    subject = _post(client, "/encode", bodies["subject"], "sub.trx").content
    statuses = []
    for case in range(n):
        for route, name, data, header in (("/encode", "b.trk", bodies["trk"], 1000), ("/encode", "b.trx", bodies["trx"], 400),
                                          ("/decode", "b.vqlat", latents, 2000), ("/encode", "s.trx", bodies["subject"], 400),
                                          ("/decode", "s.vqlat", subject, 4000), ("/score", "s.vqlat", subject, 4000)):
            r = _post(client, route, mutations(data, rng, header), name)
            assert r.status_code < 500, f"case {case} {route} {name}: {r.status_code} {r.text[:300]}"
            if r.status_code >= 400:
                assert r.json()["error"] and r.json()["message"]
            statuses.append(r.status_code)
    assert any(s >= 400 for s in statuses) and any(s == 200 for s in statuses)


# ---------------------------------------------------------------------------------------------- drain
def _slow_multipart(data: bytes, name: str, seconds: float, started, chunks: int = 30):
    """A multipart body with one file field, streamed in ``chunks`` pieces over ``seconds`` (a slow client);
    ``started`` is set once part of it has been sent."""
    import time

    boundary = "vqdiffdrain"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    step = -(-len(body) // chunks)

    def stream():
        for i, at in enumerate(range(0, len(body), step)):
            yield body[at:at + step]
            if i == 2:
                started.set()
            time.sleep(seconds / chunks)

    return stream(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tmp_path, subject_dir):
    """SIGTERM to ``bentoml serve`` (as docker / Kubernetes send it): /readyz turns 503, a new /encode gets
    503 + Retry-After at once, the request in flight (a slow upload still arriving) gets its 200 with
    real latents, and every process is gone well within VQDIFF_DRAIN_S."""
    import signal
    import threading
    import time

    drain_s = 20
    model = make_dev_model(tmp_path / "model", subject_dir)
    env = {"VQDIFF_MODEL": str(model), "VQDIFF_MODEL_TAG": "", "VQDIFF_API_TOKEN": "", "VQDIFF_WORKERS": "2",
           "VQDIFF_THREADS": "1", "VQDIFF_DRAIN_S": str(drain_s), "BENTOML_HOME": str(tmp_path / "bentoml")}
    data = (subject_dir / "IFOF_R.trk").read_bytes()
    with ServeProcess(env, log_path=tmp_path / "serve.log") as server:
        started, result = threading.Event(), {}
        content, headers = _slow_multipart(data, "IFOF_R.trk", 3.0, started)

        def in_flight():
            try:
                r = httpx.post(server.url + "/encode", content=content, headers=headers, timeout=60)
                result["response"] = r
            except httpx.HTTPError as exc:
                result["error"] = exc
            result["at"] = time.monotonic()

        thread = threading.Thread(target=in_flight)
        thread.start()
        assert started.wait(30)
        signalled = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        ready = httpx.get(server.url + "/readyz", timeout=5)
        for _ in range(20):  # the arbiter relays the signal to the workers: a moment
            if ready.status_code == 503:
                break
            time.sleep(0.1)
            ready = httpx.get(server.url + "/readyz", timeout=5)
        t0 = time.monotonic()
        refused = httpx.post(server.url + "/encode", files={"file": ("PYT_R.trk", (subject_dir / "PYT_R.trk").read_bytes())},
                             timeout=10)
        refused_in = time.monotonic() - t0
        alive = httpx.get(server.url + "/livez", timeout=5).status_code
        thread.join(60)
        server.proc.wait(drain_s + 5)
        exited_in = time.monotonic() - signalled
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert ready.status_code == 503 and ready.json()["error"] == "draining"
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert refused.json()["error"] == "draining" and refused_in < 2.0 and alive == 200
    assert "error" not in result, f"{result['error']!r}\n{log[-3000:]}"
    r = result["response"]
    assert r.status_code == 200, f"{r.status_code} {r.text[:300]}\n{log[-3000:]}"
    assert result["at"] > signalled  # it was in flight when the signal came
    assert Latents.from_bytes(r.content).n_streamlines == len(load_bundle(subject_dir / "IFOF_R.trk"))
    assert server.proc.returncode == 0 and exited_in < drain_s, f"exited after {exited_in:.1f} s"
    assert "Traceback" not in log and "Cannot connect" not in log, log[-3000:]


# ---------------------------------------------------------------------------------------------- subjects
SUBJECT_BUNDLES = ("ILF_R.trk", "POPT_R.trk", "PYT_R.trk")  # subject01's three smallest, in batch's (path) order


def _subject_files(subject_dir):
    return [("file", (n, (subject_dir / n).read_bytes(), "application/octet-stream")) for n in SUBJECT_BUNDLES]


def test_subject_of_three_files_matches_batch_per_subject(client, server, subject_dir, tmp_path):
    """Three per-bundle files in one request -> the subject file that ``vqdiff-encode-batch --per-subject``
    writes for a folder of them (byte for byte; the folder is called ``subject``, the service's name for it)."""
    from vqdiff.batch.job import run_batch
    from vqdiff.subject import Subject

    r = client.post("/encode", files=_subject_files(subject_dir))
    assert r.status_code == 200, r.text
    info = json.loads(r.headers["x-vqdiff-summary"])
    assert list(info["bundles"]) == [n[:-4] for n in SUBJECT_BUNDLES] and info["groups"] == sum(
        b["groups"] for b in info["bundles"].values())
    (tmp_path / "in" / "subject").mkdir(parents=True)
    for n in SUBJECT_BUNDLES:
        (tmp_path / "in" / "subject" / n).symlink_to(subject_dir / n)
    summary = run_batch("encode", tmp_path / "in", tmp_path / "out", model=server.model_dir, backend="torch",
                        progress=False, per_subject=True)
    assert summary["done"] == 1, summary
    assert r.content == (tmp_path / "out" / "subject.vqlat").read_bytes(), "service and batch subject files differ"
    assert Subject.from_bytes(r.content).names == [n[:-4] for n in SUBJECT_BUNDLES]


def test_subject_trx_round_trip_and_zip(client, server, subject_dir, tmp_path):
    """A TRX with groups built here from subject01 bundles (the first 40 streamlines of three, one group each)
    -> the API's subject bytes; /decode -> a TRX with the groups in order, or a zip of one file per bundle;
    /reconstruct -> figures per bundle."""
    import io
    import zipfile

    from vqdiff.api import Codec
    from vqdiff.carried import join_bundles

    parts = [load_bundle(subject_dir / n) for n in SUBJECT_BUNDLES]
    joined = join_bundles([Bundle(b.streamlines[:40], b.header, "trk", b.name) for b in parts], name="sub")
    src = tmp_path / "sub.trx"
    src.write_bytes(bundle_to_bytes(joined, format="trx"))
    r = _post(client, "/encode", src.read_bytes(), src.name)
    assert r.status_code == 200, r.text
    assert r.content == Codec.from_checkpoint(server.model_dir).encode_file(src).to_bytes(), "service and API differ"
    dec = _post(client, "/decode", r.content, "sub.vqlat")
    assert dec.status_code == 200 and dec.headers["content-disposition"].endswith('.trx"'), dec.text
    back = load_bundle_bytes(dec.content, format="trx")
    assert list(back.groups) == list(joined.groups) and len(back) == len(joined) == 120
    assert all(np.array_equal(back.groups[k], joined.groups[k]) for k in joined.groups)
    z = _post(client, "/decode", r.content, "sub.vqlat", bundles="zip", format="tck")
    assert z.status_code == 200, z.text
    with zipfile.ZipFile(io.BytesIO(z.content)) as f:
        assert f.namelist() == [n[:-4] + ".tck" for n in SUBJECT_BUNDLES]
    q = _post(client, "/reconstruct", src.read_bytes(), src.name, summary=True).json()
    assert sorted(q["quality"]["bundles"]) == sorted(joined.groups) and q["format"] == "trx"
    assert all(np.isfinite(v["mean_mdf_mm"]) for v in q["quality"]["bundles"].values())


def test_subject_refusals_name_what_is_accepted(client, subject_dir, tmp_path):
    """A mix of formats, duplicated names, groups with unknown indices or none, an unknown ``bundles`` or
    ``segment``: each a 4xx JSON saying what is accepted."""
    b = load_bundle(subject_dir / "PYT_R.trk")
    small = Bundle(b.streamlines[:30], b.header, "trk", "PYT_R")
    trk, trx = bundle_to_bytes(small, format="trk"), bundle_to_bytes(small, format="trx")
    mixed = client.post("/encode", files=[("file", ("a.trk", trk)), ("file", ("b.trx", trx))])
    assert mixed.status_code == 400 and mixed.json()["error"] == "mixed_formats" and "all TRK" in mixed.json()["accepted"]
    dup = client.post("/encode", files=[("file", ("a.trk", trk)), ("file", ("a.trk", trk))])
    assert dup.status_code == 400 and dup.json()["error"] == "duplicate_bundle_names"
    for groups in ({"A": np.array([0, 99])}, {"A": np.array([], np.int64)}):
        bad = Bundle(small.streamlines, small.header, "trx", "g", groups=groups)
        from vqdiff.carried import GROUPS_ACCEPTED

        try:
            data = bundle_to_bytes(bad, format="trx")
        except Exception:  # noqa: BLE001 - the writer may refuse it first; then nothing to post
            continue
        r = _post(client, "/encode", data, "g.trx")
        assert r.status_code == 400 and r.json()["error"] == "bad_groups" and GROUPS_ACCEPTED in r.json()["message"]
    assert _post(client, "/encode", trk, "a.trk", segment="maybe").json()["error"] == "bad_segment"
    lat = _post(client, "/encode", trk, "a.trk").content
    assert _post(client, "/decode", lat, "a.vqlat", bundles="tar").json()["error"] == "bad_bundles"
    many = client.post("/encode", files=[("file", (f"b{i}.trk", trk)) for i in range(MAX_BUNDLES + 1)])
    assert many.status_code == 413 and many.json()["error"] == "too_many_bundles" and many.json()["accepted"]


# ---------------------------------------------------------------------------------------------- analysis
def test_score_and_embedding(client, subject_dir):
    """/score against the server's norms (VQDIFF_NORMS, `_norms`): a bundle it has, scored as
    `score_latents` scores it; one it has not: a 422 naming its tracts; the embedding on request."""
    from vqdiff.analysis import EMBEDDING_VERSION, embedding
    from vqdiff.analysis.norms import Norms
    from vqdiff.analysis.scoring import score_latents

    src = subject_dir / "PYT_R.trk"
    r = _post(client, "/encode", src.read_bytes(), src.name, summary=True, embedding=True)
    assert r.status_code == 200, r.text
    emb = r.json()["embedding"]
    assert emb["version"] == EMBEDDING_VERSION and list(emb["bundles"]) == ["PYT_R"]
    lat = _post(client, "/encode", src.read_bytes(), src.name).content
    np.testing.assert_allclose(emb["bundles"]["PYT_R"], embedding(Latents.from_bytes(lat)), atol=1e-6)
    card = client.get("/model").json()
    s = _post(client, "/score", lat, "PYT_R.vqlat")
    assert s.status_code == 200, s.text
    (got,) = s.json()["bundles"]
    want = score_latents(Latents.from_bytes(lat), Norms.load(card["norms"]["path"]), bundle="PYT_R").to_dict()
    assert got.keys() == want.keys() and (got["tract"], got["flagged"], got["peak_node"]) == ("PYT_R", want["flagged"],
                                                                                               want["peak_node"])
    np.testing.assert_allclose([got["d2"], got["p_value"], *got["node_z"]], [want["d2"], want["p_value"], *want["node_z"]],
                               rtol=1e-6)
    other = _post(client, "/encode", (subject_dir / "ILF_R.trk").read_bytes(), "ILF_R.trk").content
    bad = _post(client, "/score", other, "ILF_R.vqlat")
    assert bad.status_code == 422 and bad.json()["error"] == "cannot_score" and "PYT_R" in bad.json()["message"]
    assert _post(client, "/encode", src.read_bytes(), src.name, embedding=True).status_code == 400


def test_bentoml_client_for_a_subject(client, server, subject_dir, tmp_path):
    """BentoML's own client (`bentoml.SyncHTTPClient`, README) for a subject: three per-bundle files in one call,
    and a TRX with groups (built here from subject01 bundles: the first 40 streamlines of each); decoded back
    to a TRX with the groups. The same bytes as a plain multipart POST."""
    import bentoml

    from vqdiff.carried import join_bundles
    from vqdiff.subject import Subject

    files = [subject_dir / n for n in SUBJECT_BUNDLES]
    parts = [load_bundle(p) for p in files]
    trx = tmp_path / "sub.trx"
    trx.write_bytes(bundle_to_bytes(join_bundles([Bundle(b.streamlines[:40], b.header, "trk", b.name) for b in parts],
                                                 name="sub"), format="trx"))
    with bentoml.SyncHTTPClient(server.url, timeout=120) as c:
        three = c.encode(file=files)  # a Path to the answer's file
        assert three.read_bytes() == client.post("/encode", files=_subject_files(subject_dir)).content
        sub = c.encode(file=[trx], register="auto")
        assert Subject.from_bytes(sub.read_bytes()).names == [n[:-4] for n in SUBJECT_BUNDLES]
        back = c.decode(file=sub, format="trx")
    out = load_bundle_bytes(back.read_bytes(), format="trx")
    assert list(out.groups) == [n[:-4] for n in SUBJECT_BUNDLES] and len(out) == 120

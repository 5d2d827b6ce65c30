"""The service with bearer-token auth on, serving its model from the BentoML model store by tag
(``VQDIFF_MODEL_TAG``); a real ``bentoml serve`` subprocess (auth off: tests/test_service.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("bentoml")
httpx = pytest.importorskip("httpx")

from serving import REPO, ServeProcess, make_dev_model  # noqa: E402

from vqdiff.bundle import Bundle, SpatialHeader  # noqa: E402
from vqdiff.fileio import file_sha256  # noqa: E402
from vqdiff.io import bundle_to_bytes  # noqa: E402

TOKEN = "t0k-" + "x" * 28


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-auth")
    model = make_dev_model(root / "model")
    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    tag = subprocess.run([sys.executable, "-m", "vqdiff.export.bento_store", str(model), "--name", "vqdiff-test"], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    assert tag.startswith("vqdiff-test:")
    env = {"VQDIFF_MODEL": "", "VQDIFF_MODEL_TAG": tag, "VQDIFF_API_TOKEN": TOKEN, "VQDIFF_WORKERS": "1",
           "VQDIFF_THREADS": "1", "VQDIFF_MAX_CONCURRENCY": "1", "BENTOML_HOME": str(root / "bentoml")}
    with ServeProcess(env, log_path=root / "serve.log") as proc:
        proc.model_dir = model
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120.0) as c:
        yield c


def _trk() -> bytes:
    lines = np.cumsum(np.random.default_rng(0).normal(0, 1, (70, 20, 3)), axis=1).astype(np.float32)
    return bundle_to_bytes(Bundle(list(lines), SpatialHeader.identity(), "memory", "s"), format="trk")


def _auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics"])
def test_probes_and_metrics_stay_open(client, path):
    assert client.get(path).status_code == 200


@pytest.mark.parametrize("headers, reason", [
    ({}, "unauthorized"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "unauthorized"),
    ({"Authorization": "Bearer"}, "unauthorized"),
    (_auth("wrong"), "invalid_token"),
    (_auth(TOKEN + "x"), "invalid_token"),
])
def test_requests_without_the_token_are_refused(client, headers, reason):
    r = client.post("/encode", files={"file": ("a.trk", _trk())}, headers=headers)
    assert r.status_code == 401 and r.json()["error"] == reason
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/model", headers=headers).status_code == 401
    assert client.get("/", headers=headers).status_code == 401


def test_the_token_opens_every_route(client, server):
    card = client.get("/model", headers=_auth()).json()
    assert card["service"]["auth"] == "bearer" and TOKEN not in str(card)
    assert card["model"]["sha256"] == file_sha256(server.model_dir / "model.safetensors")  # served by tag
    r = client.post("/encode", files={"file": ("a.trk", _trk())}, headers={"authorization": f"bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    lat = r.content
    r = client.post("/decode", files={"file": ("a.vqlat", lat)}, headers=_auth())
    assert r.status_code == 200 and r.content[:5] == b"TRACK"
    r = client.post("/score", files={"file": ("a.vqlat", lat)}, headers=_auth())  # no VQDIFF_NORMS here
    assert r.status_code == 503 and r.json()["error"] == "no_norms" and "VQDIFF_NORMS" in r.json()["accepted"]


def call_with_retry(client, endpoint: str, *, tries: int = 5, waited: list | None = None, **inputs):
    """The README's retry loop: ``client.call`` (BentoML's client), and on a 503 wait what the answer says
    (its JSON body's ``retry_after_s``, the ``Retry-After`` header's value) and try again."""
    import json
    import time
    from http import HTTPStatus

    from bentoml.exceptions import BentoMLException

    for attempt in range(tries):
        try:
            return client.call(endpoint, **inputs)
        except BentoMLException as exc:
            if exc.error_code != HTTPStatus.SERVICE_UNAVAILABLE or attempt == tries - 1:
                raise
            delay = float(json.loads(str(exc)).get("retry_after_s", 1))  # the client raises with the body as text
            if waited is not None:
                waited.append(delay)
            time.sleep(delay)


def test_bentoml_client_retries_a_503_after_retry_after(server, client, subject_dir):
    """VQDIFF_MAX_CONCURRENCY=1 here: while a slow /reconstruct (subject01 IFOF_R, 45 groups: well past the 0.2 s
    head start; CC_Fr_1 took 0.14-0.19 s and could finish before the loop began) holds the one slot, BentoML's
    SyncHTTPClient gets 503 + Retry-After on /encode, waits the advertised second and succeeds."""
    import threading
    import time

    import bentoml

    from vqdiff.latents import Latents

    slow_answer = []
    slow = threading.Thread(target=lambda: slow_answer.append(client.post(
        "/reconstruct", headers=_auth(), files={"file": ("IFOF_R.trk", (subject_dir / "IFOF_R.trk").read_bytes())})))
    with bentoml.SyncHTTPClient(server.url, token=TOKEN, timeout=120) as c:
        slow.start()
        time.sleep(0.2)  # the slow request first
        waited: list = []
        while not waited and slow.is_alive():
            out = call_with_retry(c, "encode", waited=waited, file=[subject_dir / "PYT_R.trk"])
        slow.join()
    assert slow_answer[0].status_code == 200, slow_answer[0].text
    assert waited and waited[0] == 1.0, "no 503 while the slow request ran"
    assert Latents.from_bytes(out.read_bytes()).n_streamlines == 320  # PYT_R

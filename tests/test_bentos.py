"""The bentos (scripts/build_bento.py; `make bento`, `make bento-lean`, `make bento-gpu`).

Versions live in pyproject.toml only: the bentofiles hold no package list, wheel name or extra index;
the script fills them. The CPU bento ships the CPU torch wheel (torch's CPU build is not on PyPI), the
lean bento has no torch at all, the GPU bento takes onnxruntime-gpu. Building the images and serving
from them is scripts/container-check.sh (`make container-check`: minutes and GBs, not in the suite).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import tomllib
import yaml
from serving import REPO

pytest.importorskip("bentoml")


def _script():
    spec = importlib.util.spec_from_file_location("build_bento", REPO / "scripts" / "build_bento.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BB = _script()  # scripts/build_bento.py, loaded once


def test_packages_come_from_pyproject_and_bentofiles_hold_none():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = [BB._name(r) for r in project["dependencies"] + project["optional-dependencies"]["serve"]]
    for variant in ("cpu", "lean"):
        names = [BB._name(r) for r in BB.packages(variant)]
        assert "torch" not in names and set(names) == set(deps) - {"torch"}, (variant, names)
    gpu = [BB._name(r) for r in BB.packages("gpu")]
    assert "onnxruntime-gpu" in gpu and "onnxruntime" not in gpu and "torch" in gpu and "tensorrt" not in gpu
    assert len(gpu) == len(set(gpu))
    for variant, bentofile in BB.BENTOFILES.items():
        python = yaml.safe_load((REPO / bentofile).read_text()).get("python", {})
        assert not {"packages", "wheels", "extra_index_url", "index_url", "requirements_txt"} & set(python), (variant, python)


def _fake_export(path):
    """An export directory's files, for packaging only (serving an export is tested in test_export.py and
    test_service_auto.py; serving from the image by scripts/container-check.sh)."""
    path.mkdir()
    for name in ("encoder.onnx", "decoder.onnx", "templates.safetensors"):
        (path / name).write_bytes(b"packaged, not run")
    (path / "manifest.json").write_text(json.dumps({"format": "vqdiff-export"}))
    return path


@pytest.mark.parametrize("variant", ["cpu", "lean", "gpu"])
def test_bento_builds_with_its_wheels_and_no_unreachable_index(tmp_path, variant):
    """Each bento builds here: one service, the vqdiff wheel installed (no sources, runs/, .venv or tests),
    the model folder it serves, the wheels it needs and no package index beyond PyPI."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    extra = ["--export", str(_fake_export(tmp_path / "export"))] if variant == "lean" else []
    cmd = [sys.executable, "scripts/build_bento.py", variant, "--tag-only", "--context", str(tmp_path / "ctx"), *extra]
    out = subprocess.run(cmd, cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    name, version = out.stdout.strip().splitlines()[-1].split(":")
    assert name == {"cpu": "vqdiff", "lean": "vqdiff-lean", "gpu": "vqdiff-gpu"}[variant]
    bento = tmp_path / "home" / "bentos" / name / version
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "vqdiff.service.app:VQDiff"
    assert [s["name"] for s in info["services"]] == ["vqdiff"]  # one service: no second one behind HTTP
    config = info["services"][0]["config"]
    if variant == "gpu":  # a GPU host: one worker with the GPU engine (every request's groups meet in one batcher)
        assert config["workers"] == 1 and config["resources"]["gpu"] == 1, config
    else:
        assert "gpu" not in config.get("resources", {}), config
    src = bento / "src"
    assert not any((src / d).exists() for d in ("vqdiff", "service", "export", "runs", ".venv", "tests", "training"))
    model = src / "models" / "default"
    if variant == "lean":
        assert (model / "encoder.onnx").is_file() and not (model / "model.safetensors").exists()
    else:
        assert (model / "model.safetensors").is_file()
    version_ = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    wheels = sorted(w.name for w in (bento / "env" / "python" / "wheels").iterdir())
    torch_wheels = [w for w in wheels if w.startswith("torch-")]
    assert f"vqdiff-{version_}-py3-none-any.whl" in wheels
    assert len(wheels) == 1 + len(torch_wheels)
    assert (len(torch_wheels), all("+cpu" in w for w in torch_wheels)) == ((1, True) if variant == "cpu" else (0, True))
    env_python = bento / "env" / "python"
    reqs = (env_python / "requirements.txt").read_text().splitlines()
    assert ("torch" in {_name(r) for r in reqs}) == (variant == "gpu")
    assert ("onnxruntime-gpu" in {_name(r) for r in reqs}) == (variant == "gpu")
    assert "download.pytorch.org" not in (env_python / "install.sh").read_text()
    if variant == "lean":  # locked here, installed with --no-deps: nothing can pull torch in
        lock = {_name(r) for r in (env_python / "requirements.lock.txt").read_text().splitlines()}
        assert "torch" not in lock and not any(n.startswith("nvidia-c") for n in lock), sorted(lock)
        assert "--no-deps" in (env_python / "install.sh").read_text()


def _name(line: str) -> str:
    return BB._name(line.strip()) if line.strip() and not line.startswith(("#", "-")) else ""

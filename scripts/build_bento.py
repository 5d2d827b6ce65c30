#!/usr/bin/env python3
"""Build one of vqdiff's bentos where only PyPI is reachable: `make bento`, `make bento-lean`, `make bento-gpu`.

Versions and wheel names live in one place: pyproject.toml (vqdiff's version, its dependencies and the
``serve`` extra) and the torch CPU wheel the Makefile names (``TORCH``). The bentofiles
(bentofile.yaml, service/bentofile-lean.yaml, service/bentofile-gpu.yaml) hold what is particular to
each image and no package list; this script fills ``python.packages`` and ``python.wheels`` from
those sources into a staging build context (build/bento-<variant>/: the filled bentofile, the model
folder, the wheels) and runs ``bentoml build`` on it.

Variants:

- ``cpu``: the vqdiff wheel and the CPU torch wheel ship inside the bento (torch's CPU build is not
  on PyPI, and download.pytorch.org is not reachable from every build), so the image installs from
  PyPI alone; the bundled checkpoint (models/default) on any engine, torch ones included.
- ``lean``: no torch. An export directory (ONNX + manifest.json + templates.safetensors; built from
  models/default with ``vqdiff-export`` when none is given) served with ONNX Runtime; the packages
  are locked here (``uv pip compile``) and installed with ``--no-deps`` so that the vqdiff wheel
  does not pull torch in.
- ``gpu``: CUDA base image, onnxruntime-gpu, torch from PyPI (its Linux build is the CUDA one),
  TensorRT when its wheels install (service/docker/setup-gpu.sh).

``--base-image`` replaces the bentofile's base image (scripts/container-check.sh uses it for a base
that trusts extra CA certificates).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
BENTOFILES = {"cpu": "bentofile.yaml", "lean": "service/bentofile-lean.yaml", "gpu": "service/bentofile-gpu.yaml"}
MODEL_DIR = "models/default"  # inside the build context, as VQDIFF_MODEL in the bentofiles says


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def packages(variant: str, pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The bento's requirements, from pyproject.toml: vqdiff's dependencies and its ``serve`` extra,
    without torch where a wheel supplies it (cpu) or where it must not be (lean); for the GPU bento
    onnxruntime-gpu (the ``gpu`` extra) replaces onnxruntime (the two cannot be installed together)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = list(project["dependencies"]) + list(extras["serve"])
    if variant == "gpu":
        gpu = [r for r in extras["gpu"] if _name(r) != "tensorrt"]  # TensorRT: the setup script, when it installs
        reqs = [r for r in reqs if _name(r) != "onnxruntime"] + gpu
    else:
        reqs = [r for r in reqs if _name(r) != "torch"]
    seen: dict[str, str] = {}
    for r in reqs:
        seen.setdefault(_name(r), r)
    return list(seen.values())


def vqdiff_wheel(out: Path) -> Path:
    """Build the vqdiff wheel (its name carries pyproject's version) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("vqdiff-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True)
    (wheel,) = out.glob("vqdiff-*.whl")
    return wheel


def torch_wheel(spec: str, given: str | None) -> Path:
    """The CPU torch wheel for ``spec`` (``torch==X``): ``given``, else pip's local file for it (on our
    machines `pip install torch==X` takes a local wheel), else a clear error on how to get one."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise SystemExit(f"build_bento: --torch-wheel {given}: no such file")
        return path
    version = spec.split("==", 1)[1] if "==" in spec else None
    dest = REPO / "build" / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    found = [w for w in dest.glob("torch-*.whl") if version and w.name.startswith(f"torch-{version}+cpu")]
    if found:
        return found[0]
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                          "-d", str(dest), spec], capture_output=True, text=True)
    found = sorted(dest.glob(f"torch-{version}*.whl")) if version else []
    if got.returncode != 0 or not found or "+cpu" not in found[0].name:
        raise SystemExit(
            f"build_bento: no CPU wheel of {spec} here ({got.stderr.strip()[-300:] or 'pip found a non-CPU build'}).\n"
            f"Give one with --torch-wheel FILE (or TORCH_WHEEL=FILE make bento); it can be downloaded with\n"
            f"  pip download --no-deps -d build/wheels {spec} --index-url https://download.pytorch.org/whl/cpu")
    return found[0]


def lean_export(export_dir: str | None) -> Path:
    """The export directory the lean bento serves: ``export_dir``, else models/default exported here."""
    if export_dir:
        path = Path(export_dir)
        missing = [n for n in ("encoder.onnx", "decoder.onnx", "manifest.json") if not (path / n).is_file()]
        if missing:
            raise SystemExit(f"build_bento: {path} is not an export directory (missing {', '.join(missing)}); "
                             "make one with `vqdiff-export models/default exports/default`")
        return path
    path = REPO / "build" / "export-default"
    if not (path / "manifest.json").is_file():
        print("build_bento: exporting models/default to build/export-default (vqdiff-export)", flush=True)
        subprocess.run([sys.executable, "-m", "vqdiff.export.cli_export", str(REPO / MODEL_DIR), str(path), "-f"],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def stage(variant: str, *, torch_spec: str, torch_wheel_path: str | None, export_dir: str | None,
          base_image: str | None) -> Path:
    """Write the staging build context build/bento-<variant>/ and return it."""
    ctx = REPO / "build" / f"bento-{variant}"
    if ctx.exists():
        shutil.rmtree(ctx)
    (ctx / "wheels").mkdir(parents=True)
    config = yaml.safe_load((REPO / BENTOFILES[variant]).read_text())
    wheels = [vqdiff_wheel(ctx / "wheels")]
    if variant == "cpu":
        src = torch_wheel(torch_spec, torch_wheel_path)
        wheels.append(ctx / "wheels" / src.name)
        shutil.copy2(src, wheels[-1])
    model = lean_export(export_dir) if variant == "lean" else REPO / MODEL_DIR
    shutil.copytree(model, ctx / MODEL_DIR, ignore=shutil.ignore_patterns("*.png", "__pycache__"))
    python = config.setdefault("python", {})
    python["packages"] = packages(variant)
    python["wheels"] = [f"./wheels/{w.name}" for w in wheels]
    docker = config.get("docker", {})
    if docker.get("setup_script"):  # the same relative path in the staging context
        (ctx / docker["setup_script"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / docker["setup_script"], ctx / docker["setup_script"])
    if base_image:
        config.setdefault("docker", {})["base_image"] = base_image
        for ignored in ("distro", "python_version", "cuda_version"):  # BentoML ignores them with a base image
            config["docker"].pop(ignored, None)
    (ctx / "bentofile.yaml").write_text(
        f"# Generated by scripts/build_bento.py from {BENTOFILES[variant]} and pyproject.toml: do not edit.\n"
        + yaml.safe_dump(config, sort_keys=False))
    return ctx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Examples:\n  python scripts/build_bento.py cpu\n"
                                       "  python scripts/build_bento.py lean --export exports/default\n"
                                       "  python scripts/build_bento.py gpu")
    p.add_argument("variant", choices=sorted(BENTOFILES), help="which bento (module docstring)")
    p.add_argument("--torch", default=os.environ.get("TORCH", "torch==2.13.0"),
                   help="the CPU torch the cpu bento ships (default: $TORCH or torch==2.13.0, as the Makefile)")
    p.add_argument("--torch-wheel", default=os.environ.get("TORCH_WHEEL") or None,
                   help="that torch's CPU wheel file (default: $TORCH_WHEEL, else pip's local file)")
    p.add_argument("--export", default=None,
                   help="lean: the export directory to serve (default: models/default exported to build/)")
    p.add_argument("--base-image", default=None, help="replace the bentofile's base image")
    p.add_argument("--tag-only", action="store_true", help="print only the bento's tag on stdout")
    args = p.parse_args(argv)
    ctx = stage(args.variant, torch_spec=args.torch, torch_wheel_path=args.torch_wheel, export_dir=args.export,
                base_image=args.base_image)
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    if args.variant == "gpu":  # the bento's config records the GPU shape (one worker, resources gpu: 1)
        env["VQDIFF_DEVICE"] = "cuda:0"
    out = subprocess.run([sys.executable, "-m", "bentoml", "build", "-o", "tag", str(ctx)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        return out.returncode
    tag = out.stdout.strip().splitlines()[-1].split("__tag__:")[-1].strip()
    print(tag if args.tag_only else f"built bento {tag} ({args.variant}; context {ctx.relative_to(REPO)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

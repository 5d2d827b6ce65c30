#!/usr/bin/env bash
# GPU bento: add TensorRT when its wheels can be installed (NVIDIA publishes them on PyPI and on
# pypi.nvidia.com). Without it the service runs on another engine (VQDIFF_ENGINE=auto: the fastest
# variant that opens and passes the quality gate, docs/engines.md), so a failed install does not fail the image build.
set -u
PY=/app/.venv/bin/python
if uv pip install --python "$PY" --extra-index-url https://pypi.nvidia.com "tensorrt-cu12>=10"; then
    echo "vqdiff: TensorRT installed"
else
    echo "vqdiff: TensorRT not installable here; the service will use ONNX Runtime CUDA"
fi

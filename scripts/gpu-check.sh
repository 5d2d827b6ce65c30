#!/usr/bin/env bash
# The GPU check, one prepared script for a lent CUDA machine (CUDA PyTorch and CPU onnxruntime
# preinstalled; no nibabel / dipy / trx / safetensors / bentoml; no network), <= 8 minutes from a bare start:
#
#   scripts/gpu-check.sh --fetch-wheels   # HERE (with network): wheels + subject01 into wheelhouse/ (git-ignored)
#   scripts/gpu-check.sh [--out DIR]      # THERE: install what is missing from wheelhouse/, pytest -m gpu,
#                                         #   then benchmarks/gpu_check.py (training, engines, subject, parity)
#   scripts/gpu-check.sh --dry-run        # anywhere (CI): every step except the CUDA ones, on the CPU, tiny
#
# vqdiff itself is not pip-installed: its four source folders are laid out as one package tree in a
# temporary folder put first on PYTHONPATH (no build step, nothing written into the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELHOUSE=${VQDIFF_WHEELHOUSE:-wheelhouse}
# what the lent machine lacks (module:wheel name); pinned to the versions this project is tested with
WHEELS=(nibabel==5.4.2 dipy==1.12.1 trx-python==0.6 safetensors==0.8.0)
MODULES=(nibabel:nibabel dipy:dipy trx:trx_python safetensors:safetensors)
TARGET_PY=${VQDIFF_GPU_PYTHON_VERSION:-3.12}   # the lent machine's python3
LIMIT_MB=48                                    # wheels + data; the whole tree that travels must stay < 64 MiB

mode=run out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) mode=dry ;;
    --fetch-wheels) mode=fetch ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (--dry-run | --fetch-wheels | --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ -x .venv/bin/python ] && [ "$mode" != run ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
data_src="${VQDIFF_SHARED_DATA:-../shared/data}"

if [ "$mode" = fetch ]; then
  mkdir -p "$WHEELHOUSE/data"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELHOUSE" "${WHEELS[@]}"
  rm -rf "$WHEELHOUSE/data/subject01"
  cp -r "$data_src/subject01" "$WHEELHOUSE/data/subject01"
  echo "gpu-check: $WHEELHOUSE/ now holds:"
  (cd "$WHEELHOUSE" && du -b ./*.whl data/subject01 | awk '{printf "  %7.2f MB  %s\n", $1 / 1e6, $2}')
  total=$(du -sb "$WHEELHOUSE" | cut -f1)
  echo "  total $((total / 1048576)) MiB (limit ${LIMIT_MB} MiB; the checkout adds $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1 | awk '{printf "%.1f", $1 / 1048576}') MiB)"
  [ "$total" -lt $((LIMIT_MB * 1048576)) ] || { echo "gpu-check: $WHEELHOUSE is over ${LIMIT_MB} MiB" >&2; exit 1; }
  exit 0
fi

t0=$(date +%s)
site=$(mktemp -d "${TMPDIR:-/tmp}/vqdiff-gpu-check.XXXXXX")
trap 'rm -rf "$site"' EXIT

# 1. the packages this machine lacks, from the wheelhouse
missing=()
for pair in "${MODULES[@]}"; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  files=()
  for w in "${missing[@]}"; do
    f=$(ls "$WHEELHOUSE"/"$w"-*.whl 2>/dev/null | head -1 || true)
    [ -n "$f" ] || { echo "gpu-check: $w is not installed and not in $WHEELHOUSE/ (run --fetch-wheels where pip reaches PyPI)" >&2; exit 1; }
    files+=("$f")
  done
  echo "gpu-check: installing ${missing[*]} from $WHEELHOUSE/"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/lib" "${files[@]}"
else
  echo "gpu-check: nibabel, dipy, trx, safetensors already importable"
fi
# 2. vqdiff from this checkout (python -P everywhere below: the checkout's own vqdiff/ folder, which
#    lacks export/ and the rest, must not shadow it from the current directory): vqdiff/ with export/, training/, service/ inside (pyproject's package-dir)
mkdir -p "$site/src"
tar --exclude=__pycache__ -cf - vqdiff | tar -C "$site/src" -xf -
tar --exclude=__pycache__ -cf - export training service | tar -C "$site/src/vqdiff" -xf -
export PYTHONPATH="$site/src:$site/lib${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$WHEELHOUSE/data/subject01" ]; then export VQDIFF_SHARED_DATA="$PWD/$WHEELHOUSE/data"
elif [ -d "$data_src/subject01" ]; then VQDIFF_SHARED_DATA="$(cd "$data_src" && pwd)"; export VQDIFF_SHARED_DATA
else echo "gpu-check: no subject01 data ($WHEELHOUSE/data or $data_src); run --fetch-wheels first" >&2; exit 1; fi
export PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=True
# the laid-out tree imports on its own (-S: without site's .pth files, an editable install's finder included)
purelib=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PYTHONPATH="$site/src:$site/lib:$purelib" "$PY" -P -S -c "import vqdiff, vqdiff.export.select, vqdiff.export.torch_cuda, \
vqdiff.training.train; assert vqdiff.__file__.startswith('$site'), vqdiff.__file__"
"$PY" -P -c "import vqdiff; print('gpu-check: vqdiff from', vqdiff.__file__.rsplit('/', 2)[0])"
"$PY" -c "import torch; print('gpu-check: torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"

# 3. the CUDA tests (they skip with "needs a CUDA GPU" without one)
"$PY" -P -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider

# 4. the measurements
args=()
[ "$mode" = dry ] && args+=(--dry-run)
[ -n "$out" ] && args+=(--out "$out")
"$PY" benchmarks/gpu_check.py "${args[@]}"
echo "gpu-check: done in $(( $(date +%s) - t0 )) s"

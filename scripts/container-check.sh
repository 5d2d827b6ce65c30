#!/usr/bin/env bash
# Build a vqdiff bento into an image, run it, and check it serves: `make container-check`.
#
#   scripts/container-check.sh [--variant cpu|lean|all] [--gpu] [--ca-certs DIR_OR_FILE] [--keep] [--port N]
#
# For each variant: builds the bento (scripts/build_bento.py), builds the image with docker or podman
# (whichever runs here), starts it, waits for /readyz, encodes and decodes a real bundle through it
# and compares the result with the local round trip on the same engine (scripts/container_roundtrip.py:
# largest point difference <= 1e-3 mm), stops it with SIGTERM during a request (the request must
# finish, the container must exit 0 within the drain time), starts it again (engine selection cached
# in the container), and prints image size, start-to-ready times and memory. It removes what it
# started (the images too, unless --keep). Exit status 1 when any check fails.
#
# Base image: python:3.11-slim (CPU) when it is here or can be pulled; otherwise a stand-in built
# without a registry: Debian bookworm from `debootstrap --variant=minbase` with Debian's python3.11
# and pip, imported and tagged under that name (it says so). --ca-certs: the build trusts these
# extra CA certificates (a proxy that intercepts HTTPS, as on hospital networks): they go into a
# derived base image (`docker.base_image`), with pip and uv told to use the system store.
#
# --gpu: the GPU bento (make bento-gpu) on the CUDA base image, run with `--gpus all` (docker) or
# `--device nvidia.com/gpu=all` (podman, CDI); needs the NVIDIA container toolkit and a GPU: without
# them it says so and skips (untested on our machines, which have neither).
#
# One-time setup on a Debian machine without Docker (as root): apt-get install podman buildah runc
# debootstrap. Not part of .ci/run: it takes minutes and a few GB.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
VARIANT=all GPU=0 CA_CERTS=${CA_CERTS:-} KEEP=0 PORT=${PORT:-3300}
BUNDLE=${BUNDLE:-${VQDIFF_SHARED_DATA:-../shared/data}/subject01/IFOF_R.trk}
DRAIN_S=${DRAIN_S:-30}
MAX_LEAN_MB=${MAX_LEAN_MB:-1024} MAX_LEAN_READY_S=${MAX_LEAN_READY_S:-10}
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) VARIANT=$2; shift 2 ;;
    --gpu) GPU=1; shift ;;
    --ca-certs) CA_CERTS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --port) PORT=$2; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "container-check: unknown option $1 (accepted: --variant cpu|lean|all, --gpu, --ca-certs PATH, --keep, --port N)" >&2; exit 2 ;;
  esac
done
case "$VARIANT" in cpu) VARIANTS=(cpu) ;; lean) VARIANTS=(lean) ;; all) VARIANTS=(lean cpu) ;;
  *) echo "container-check: --variant $VARIANT: accepted cpu, lean, all" >&2; exit 2 ;; esac
[ "$GPU" = 1 ] && VARIANTS=(gpu)
[ -x "$PY" ] || { echo "container-check: no $PY; run 'make install' first" >&2; exit 2; }
[ -f "$BUNDLE" ] || { echo "container-check: no bundle at $BUNDLE (set BUNDLE=... or VQDIFF_SHARED_DATA)" >&2; exit 2; }

if docker info >/dev/null 2>&1; then CLI=docker; elif command -v podman >/dev/null 2>&1; then CLI=podman; else
  echo "container-check: neither a running Docker engine nor podman here; one-time setup on Debian:" \
       "apt-get install podman buildah runc debootstrap" >&2; exit 2; fi
RUN_OPTS=()
if [ "$CLI" = podman ]; then  # rootful podman asks for rlimits above a sandbox's hard limits: stay below them
  RUN_OPTS+=(--ulimit "nofile=$(( $(ulimit -Hn) < 65536 ? $(ulimit -Hn) : 65536 ))")
  nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] && nproc=32768
  RUN_OPTS+=(--ulimit "nproc=$(( nproc < 32768 ? nproc : 32768 ))")
fi
say() { printf '\n== %s\n' "$*"; }
now() { date +%s.%N; }
secs() { "$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
FAILED=0 STARTED=() IMAGES=() SUMMARY=()
cleanup() {
  for c in "${STARTED[@]}"; do $CLI rm -f "$c" >/dev/null 2>&1 || true; done
  if [ "$KEEP" = 0 ]; then for i in "${IMAGES[@]}"; do $CLI rmi -f "$i" >/dev/null 2>&1 || true; done; fi
}
trap cleanup EXIT
verdict() { if "$@"; then echo 0; else echo 1; fi; }  # a condition's status as 0 / 1, whatever `set -e` says
check() {  # check NAME OK(0/1) DETAIL
  if [ "$2" = 0 ]; then SUMMARY+=("PASS  $1: $3"); else SUMMARY+=("FAIL  $1: $3"); FAILED=1; fi
  echo "  -> $([ "$2" = 0 ] && echo PASS || echo FAIL) $1: $3"
}
grep -E -o 'avx512[a-z_0-9]*|amx[a-z_0-9]*|avx2|fma' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ' | sed 's/^/CPU flags: /'; echo
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg); $CLI $($CLI --version | awk '{print $NF}')"

# ---------------------------------------------------------------- base image
BASE=python:3.11-slim
base_present() { $CLI image inspect "$1" >/dev/null 2>&1; }
if [ "$GPU" = 0 ] && ! base_present "$BASE" && ! timeout 120 $CLI pull "$BASE" >/dev/null 2>&1; then
  say "$BASE cannot be pulled here: building a stand-in (debootstrap bookworm minbase + Debian python3.11)"
  command -v debootstrap >/dev/null || { echo "container-check: needs debootstrap for the stand-in (apt-get install debootstrap)" >&2; exit 2; }
  root=$(mktemp -d /tmp/vqdiff-base.XXXXXX)
  debootstrap --variant=minbase --include=python3.11,python3-pip,python3-venv,ca-certificates bookworm "$root" \
    http://deb.debian.org/debian >/dev/null
  # as python:3.11-slim: `python`, a pip that installs (no PEP 668 marker), no package caches or docs
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/{doc,man,locale}/* \
    "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED
  ln -sf python3 "$root/usr/bin/python"
  tar -C "$root" -c . | $CLI import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' --change 'LABEL vqdiff.stand-in=debootstrap-bookworm-minbase' \
    - "docker.io/library/$BASE" >/dev/null
  rm -rf "$root"
  echo "  stand-in tagged docker.io/library/$BASE ($($CLI image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}'))"
fi
BASE_ARGS=()
if [ -n "$CA_CERTS" ]; then
  say "extra CA certificates from $CA_CERTS: a derived base image that trusts them"
  ctx=$(mktemp -d /tmp/vqdiff-ca.XXXXXX); mkdir "$ctx/certs"
  if [ -d "$CA_CERTS" ]; then cp "$CA_CERTS"/*.crt "$ctx/certs/"; else cp "$CA_CERTS" "$ctx/certs/"; fi
  from=$BASE; [ "$GPU" = 1 ] && from=""  # the GPU bento's CUDA base comes from BentoML's template
  if [ -n "$from" ]; then
    cat > "$ctx/Containerfile" <<EOF
FROM $from
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt UV_NATIVE_TLS=1
EOF
    $CLI build -q -t localhost/vqdiff-base-ca:3.11-slim "$ctx" >/dev/null
    BASE_ARGS=(--base-image localhost/vqdiff-base-ca:3.11-slim)
  else
    echo "  (--gpu: extra CA certificates are not applied to the CUDA base; build where PyPI is trusted)"
  fi
  rm -rf "$ctx"
fi

# ---------------------------------------------------------------- one variant
wait_ready() {  # wait_ready CONTAINER T0 LIMIT_S -> prints seconds, or fails
  local limit=$3 t
  while :; do
    if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then secs "$2" "$(now)"; return 0; fi
    t=$(secs "$2" "$(now)")
    if [ "$($CLI inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" != true ] || "$PY" -c "import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))" "$t" "$limit"; then
      $CLI logs "$1" 2>&1 | tail -30 >&2; return 1; fi
    sleep 0.2
  done
}
mem_mb() { $CLI stats --no-stream --format '{{.MemUsage}}' "$1" 2>/dev/null | awk '{print $1}'; }

for v in "${VARIANTS[@]}"; do
  say "variant $v: bento"
  tag=$("$PY" scripts/build_bento.py "$v" --tag-only "${BASE_ARGS[@]}")
  model=$REPO/build/bento-$v/models/default
  gpu_opts=()
  if [ "$v" = gpu ]; then  # the CUDA base image and a GPU run need the NVIDIA container toolkit
    if [ "$CLI" = docker ] && docker info 2>/dev/null | grep -qi nvidia; then gpu_opts=(--gpus all)
    elif [ "$CLI" = podman ] && [ -e /etc/cdi/nvidia.yaml ]; then gpu_opts=(--device nvidia.com/gpu=all)
    else SUMMARY+=("SKIP  gpu image and run: bento $tag built; no NVIDIA container toolkit here"); continue; fi
  fi
  image=localhost/vqdiff-check-$v:latest
  name=vqdiff-check-$v
  say "variant $v: image ($tag -> $image, $CLI)"
  t0=$(now)
  BENTOML_DO_NOT_TRACK=True "$REPO/.venv/bin/bentoml" containerize "$tag" --backend "$CLI" -t "$image" > "build/container-$v.log" 2>&1 \
    || { tail -40 "build/container-$v.log" >&2; check "$v build" 1 "bentoml containerize failed (build/container-$v.log)"; continue; }
  IMAGES+=("$image")
  size_mb=$($CLI image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f", $1/1e6}')
  check "$v build" 0 "$image, $size_mb MB, built in $(secs "$t0" "$(now)") s"
  if [ "$v" = lean ]; then
    check "lean size" "$(verdict [ "$size_mb" -le "$MAX_LEAN_MB" ])" "$size_mb MB (limit $MAX_LEAN_MB MB)"
    $CLI run --rm "${RUN_OPTS[@]}" --entrypoint /app/.venv/bin/python "$image" -c "import torch" >/dev/null 2>&1 && ok=1 || ok=0
    check "lean has no torch" $ok "import torch in the image: $([ $ok = 0 ] && echo 'fails (as it should)' || echo 'works')"
  fi

  say "variant $v: run (first start: the engine is selected and cached inside the container)"
  $CLI rm -f "$name" >/dev/null 2>&1 || true
  t0=$(now)
  $CLI run -d --name "$name" "${RUN_OPTS[@]}" "${gpu_opts[@]}" -p "127.0.0.1:$PORT:3000" "$image" >/dev/null
  STARTED+=("$name")
  limit=$([ "$v" = lean ] && echo "$MAX_LEAN_READY_S" || echo 180)
  if ready=$(wait_ready "$name" "$t0" 180); then
    ok=$(verdict "$PY" -c "import sys; sys.exit(float(sys.argv[1]) > float(sys.argv[2]))" "$ready" "$limit")
    check "$v ready (first start)" "$ok" "$ready s after run (limit $limit s)"
  else check "$v ready (first start)" 1 "not ready within 180 s"; continue; fi
  out=$("$PY" scripts/container_roundtrip.py "http://127.0.0.1:$PORT" "$BUNDLE" "$model") && ok=0 || ok=1
  check "$v round trip" $ok "$out"
  check "$v memory" 0 "$(mem_mb "$name") after encode + decode"

  say "variant $v: SIGTERM during a request ($CLI stop -t $DRAIN_S)"
  curl -s -o /dev/null -w '%{http_code}' -F "file=@$BUNDLE" "http://127.0.0.1:$PORT/encode" > "build/container-$v.inflight" &
  cpid=$!
  sleep 0.3
  t0=$(now); $CLI stop -t "$DRAIN_S" "$name" >/dev/null; stop_s=$(secs "$t0" "$(now)")
  wait $cpid || true
  code=$($CLI inspect -f '{{.State.ExitCode}}' "$name"); inflight=$(cat "build/container-$v.inflight")
  check "$v drain" "$(verdict [ "$code" = 0 -a "$inflight" = 200 ])" "exit $code after $stop_s s (limit $DRAIN_S s); the request in flight got $inflight"

  say "variant $v: second start (engine selection cached)"
  t0=$(now); $CLI start "$name" >/dev/null
  if ready=$(wait_ready "$name" "$t0" 120); then
    ok=$(verdict "$PY" -c "import sys; sys.exit(float(sys.argv[1]) > float(sys.argv[2]))" "$ready" "$limit")
    check "$v ready (second start)" "$ok" "$ready s after start (limit $limit s); memory $(mem_mb "$name")"
  else check "$v ready (second start)" 1 "not ready within 120 s"; fi
  $CLI stop -t "$DRAIN_S" "$name" >/dev/null
done

say "summary ($CLI; base $BASE$($CLI image inspect -f '{{index .Labels "vqdiff.stand-in"}}' "$BASE" 2>/dev/null | grep -q . && echo ', stand-in'))"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED

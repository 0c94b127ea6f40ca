#!/usr/bin/env bash
# The GPU check: the one script to run on a machine with an NVIDIA GPU, from the repo root:
#   1. a Python whose torch sees the GPU: .venv's (or $PYTHON's). When that torch is missing, a
#      CPU build, or a CUDA build that sees no device while nvidia-smi lists one, torch==2.13.0
#      is installed into it, first from PyTorch's CUDA 12.8 index, then from PyPI (its Linux
#      x86_64 wheel is a CUDA build); if both fail, the script prints why and exits 1.
#   2. impasto and its local-model packages importable from it. Without them it says to run
#      ./scripts/install first and exits 2. With --install it runs ./scripts/install (for .venv;
#      without a .venv it makes one first), and where that fails on a part the GPU check does
#      not need (redis-server, npm, the SDK clients), or for another $PYTHON, installs only
#      impasto's Python side: pip install -e ".[local]" pytest.
#   3. the opt-in GPU tests: IMPASTO_GPU_TESTS=1 pytest tests/gpu (skipped with --no-tests);
#   4. bench/gpu_throughput.py for sdxl, flux (schnell) and flux-dev at 1024x1024: the plain
#      diffusers loop vs impasto with 1 and 8 clients, for each variant in $VARIANTS, in what is
#      left of --budget-s (variants that no longer fit are skipped, and listed as such). The
#      table goes to stdout; the JSON to bench/results/gpu_throughput-<device>.json and the
#      whole output to bench/results/gpu_check-<device>.log (both copied to --out DIR if given).
# The benchmark runs even when a GPU test fails; the exit status is then 1.
# Each pip install here is stopped after $INSTALL_TIMEOUT seconds (default 300), and pip's own
# settings apply (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX): a machine without internet can
# install from a folder of wheels.
# Random weights are saved under $IMPASTO_BENCH_CACHE (default ~/.cache/impasto-bench: about
# 7 GB for SDXL and 34 GB for FLUX.1-schnell; FLUX.1-dev links schnell's files and adds 20 MB)
# and reused by later runs; pass real weights with e.g. `-- --sdxl-path DIR --flux-path DIR`.
#
#   bash bench/gpu_check.sh [--install] [--no-tests] [--budget-s S] [--out DIR] [-- options]
#   VARIANTS=default,compile IMAGES=16 ARCHES=sdxl bash bench/gpu_check.sh --budget-s 900
#
# Options after `--` go to gpu_throughput.py as they are.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

budget_s=540 # the whole script, installs and tests included: fits a 10-minute command
install=0
tests=1
out=""
bench_args=()
while [ $# -gt 0 ]; do
    case "$1" in
    --install) install=1 ;;
    --no-tests) tests=0 ;;
    --budget-s) budget_s="${2:-}" && shift ;;
    --out) out="${2:-}" && shift ;;
    --) shift && bench_args=("$@") && break ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
    *) echo "gpu_check: unknown option $1 (gpu_throughput.py options go after --)" >&2 && exit 2 ;;
    esac
    shift
done
case "$budget_s" in
'' | *[!0-9]*) echo "gpu_check: --budget-s takes whole seconds, not '$budget_s'" >&2 && exit 2 ;;
esac
started=$SECONDS
PYTHON="${PYTHON:-.venv/bin/python}"
TORCH_VERSION=2.13.0
INSTALL_TIMEOUT="${INSTALL_TIMEOUT:-300}"
# Most telling first: the budget cuts from the end of this list.
default_variants=default,compile,fbcache=0.08,teacache=0.4,deepcache=3,fp8,fuse_qkv
VARIANTS="${VARIANTS:-$default_variants,attention=_native_cudnn,attention=_flash_3}"
export IMPASTO_BENCH_CACHE="${IMPASTO_BENCH_CACHE:-$HOME/.cache/impasto-bench}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p bench/results

say() { echo "gpu_check: $*" >&2; }

# -- 1. a torch that sees the GPU ------------------------------------------------------------

if [ ! -x "$PYTHON" ] && [ "$PYTHON" = .venv/bin/python ]; then
    if [ "$install" = 0 ]; then
        say "no .venv: run ./scripts/install first (or: bash bench/gpu_check.sh --install)"
        exit 2
    fi
    say "creating .venv"
    python3 -m venv .venv || { say "python3 -m venv .venv failed" && exit 1; }
fi
if ! command -v "$PYTHON" >/dev/null; then
    say "no Python at $PYTHON"
    exit 2
fi

# Prints one line: `cuda VERSION DEVICE`, `cpu-build VERSION`, `no-device VERSION` or `missing`.
torch_state() {
    "$PYTHON" - <<'EOF' 2>/dev/null || echo "missing (python failed)"
try:
    import torch
except Exception as exc:
    print("missing", type(exc).__name__, exc)
else:
    if torch.cuda.is_available():
        print("cuda", torch.__version__, torch.cuda.get_device_name(0))
    elif torch.version.cuda is None:
        print("cpu-build", torch.__version__)
    else:
        print("no-device", torch.__version__, "(built for CUDA", torch.version.cuda + ")")
EOF
}

# pip install under a time limit; on failure prints the reason (the last lines of pip's output).
pip_install() {
    local what="$1" log
    shift
    log=$(mktemp)
    say "installing $what (at most ${INSTALL_TIMEOUT} s) ..."
    timeout "$INSTALL_TIMEOUT" "$PYTHON" -m pip install --quiet --retries 1 --timeout 30 \
        "$@" >"$log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        if [ $rc -eq 124 ]; then
            say "installing $what timed out after ${INSTALL_TIMEOUT} s; pip's last lines:"
        else
            say "installing $what failed (pip exit status $rc):"
        fi
        tail -n 6 "$log" | sed 's/^/    /' >&2
    fi
    rm -f "$log"
    return $rc
}

state=$(torch_state)
if [ "${state%% *}" != cuda ]; then
    say "torch in $PYTHON does not see a GPU: $state"
    if ! gpus=$(nvidia-smi -L 2>&1) || [ -z "$gpus" ]; then
        say "and nvidia-smi lists no GPU (${gpus:-no output}): no torch build can help here"
        exit 1
    fi
    say "nvidia-smi lists: $gpus"
    # torch==2.13.0 alone would be satisfied by an installed 2.13.0+cpu: name the build.
    force=()
    [ "${state%% *}" = missing ] || force=(--force-reinstall)
    pip_install "torch $TORCH_VERSION+cu128 from download.pytorch.org" "torch==$TORCH_VERSION+cu128" \
        --index-url https://download.pytorch.org/whl/cu128 ||
        pip_install "torch $TORCH_VERSION from PyPI" "${force[@]}" "torch==$TORCH_VERSION" ||
        {
            say "no CUDA build of torch could be installed (reasons above); install one into" \
                "$PYTHON by hand, or point PIP_FIND_LINKS at a folder of its wheels"
            exit 1
        }
    state=$(torch_state)
    if [ "${state%% *}" != cuda ]; then
        say "torch was installed but still sees no GPU: $state"
        exit 1
    fi
fi
device=${state#cuda * }
say "torch ${state#cuda } (${PYTHON})"
slug=$(echo "$device" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
json="bench/results/gpu_throughput-${slug:-device}.json"
log="bench/results/gpu_check-${slug:-device}.log"

# -- 2. impasto in that Python ------------------------------------------------------------------

# The source tree first: a Python without the editable install (PYTHON=python3) finds impasto too.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
importable() { "$PYTHON" -c "import impasto.cli, diffusers, transformers, httpx, pytest" 2>&1; }
if ! missing=$(importable); then
    if [ "$install" = 0 ]; then
        say "impasto cannot run in $PYTHON (${missing##*$'\n'}): run ./scripts/install first" \
            "(or: bash bench/gpu_check.sh --install)"
        exit 2
    fi
    if [ "$PYTHON" = .venv/bin/python ]; then
        say "running ./scripts/install ..."
        ./scripts/install || say "./scripts/install failed (see above)"
    fi
    if ! importable >/dev/null; then
        pip_install "impasto's Python side" -e ".[local]" pytest
    fi
    if ! missing=$(importable); then
        say "impasto still cannot run in $PYTHON: ${missing##*$'\n'}"
        exit 1
    fi
fi

: >"$log"
status=0

# -- 3. the GPU tests -----------------------------------------------------------------------------

if [ "$tests" = 1 ]; then
    echo "== GPU tests (tests/gpu)" | tee -a "$log"
    # At most half of what is left, so the benchmark always gets its turn.
    tests_limit=$(((budget_s - (SECONDS - started)) / 2))
    [ "$tests_limit" -ge 60 ] || tests_limit=60
    IMPASTO_GPU_TESTS=1 timeout "$tests_limit" "$PYTHON" -m pytest tests/gpu -q \
        -p no:cacheprovider 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        status=1
        [ "$rc" -eq 124 ] && say "GPU tests stopped after ${tests_limit} s" | tee -a "$log"
        say "GPU tests failed (exit status $rc); running the benchmark anyway" 2>&1 | tee -a "$log"
    fi
fi
tests_s=$((SECONDS - started))

# -- 4. the benchmark -----------------------------------------------------------------------------

left=$((budget_s - (SECONDS - started) - 20)) # 20 s for the table and the JSON
[ "$left" -ge 60 ] || left=60
echo "== throughput: ${ARCHES:-sdxl,flux,flux-dev}, plain diffusers vs impasto, ${left} s" | tee -a "$log"
"$PYTHON" bench/gpu_throughput.py --device cuda --arch "${ARCHES:-sdxl,flux,flux-dev}" \
    --images "${IMAGES:-8}" --variants "$VARIANTS" --budget-s "$left" --json "$json" \
    "${bench_args[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] || status=1

say "tests ${tests_s} s, total $((SECONDS - started)) s; results in $json, output in $log" \
    2>&1 | tee -a "$log"
if [ -n "$out" ]; then
    mkdir -p "$out" && cp -f "$log" "$out"/ && { [ ! -f "$json" ] || cp -f "$json" "$out"/; }
fi
exit $status

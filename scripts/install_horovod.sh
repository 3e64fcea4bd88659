#!/usr/bin/env bash
# Install Horovod (PyTorch + Gloo) into a Python environment, for `aicfl cluster pretrain`.
#
#   scripts/install_horovod.sh [PYTHON]        (default: .venv/bin/python)
#
# Horovod 0.28.1, the newest release, does not build as published against torch 2.13:
# torch's headers need C++17 while Horovod asks for C++14, and CMake >= 4 refuses its
# minimum-version line. This script patches the sdist, builds a wheel once into a cache
# keyed by Horovod, Python, torch and the GPU choice, and installs it. Run again, it exits
# at once when horovod.torch imports and horovodrun lists PyTorch and Gloo.
#
# Environment:
#   AICFL_WHEEL_CACHE   where built wheels are kept (default ~/.cache/aicfl/wheels)
#   AICFL_HOROVOD_GPU   1: build the NCCL path as well (needs nvcc, NCCL and a CUDA build of
#                       torch in PYTHON; NCCL defaults to the nvidia-nccl wheel torch uses,
#                       else HOROVOD_NCCL_HOME / HOROVOD_NCCL_INCLUDE + HOROVOD_NCCL_LIB)
#   AICFL_HOROVOD_SDIST a local horovod-0.28.1.tar.gz, for hosts without a package index
#   MAKEFLAGS           passed to make (default -j<number of cores>)
#
# Only the training cluster needs this; the agent and the server install without it.
set -euo pipefail

HOROVOD_VERSION=0.28.1
PY=${1:-.venv/bin/python}
# A bare name (python3) is looked up on PATH; a venv's symlink is kept, not resolved.
if ! PY=$(command -v "$PY") || [[ ! -x "$PY" ]]; then
    echo "install_horovod: no Python interpreter at ${1:-.venv/bin/python}" >&2
    exit 2
fi
BIN_DIR=$(dirname "$PY")
HOROVODRUN="$BIN_DIR/horovodrun"

is_installed() {
    "$PY" -c "import horovod.torch" >/dev/null 2>&1 || return 1
    [[ -x "$HOROVODRUN" ]] || return 1
    local report
    report=$("$HOROVODRUN" --check-build 2>/dev/null) || return 1
    grep -q '\[X\] PyTorch' <<<"$report" && grep -q '\[X\] Gloo' <<<"$report"
}

if is_installed; then
    echo "install_horovod: horovod $HOROVOD_VERSION with PyTorch and Gloo already installed for $PY"
    exit 0
fi

# The runtime dependencies (Horovod's install_requires with PyTorch); also in the `cluster` extra.
if ! "$PY" -c "import cloudpickle, psutil, yaml, packaging, cffi" >/dev/null 2>&1; then
    "$PY" -m pip install -q cloudpickle psutil pyyaml packaging "cffi>=1.4"
fi

PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) || {
    echo "install_horovod: torch is not importable from $PY; install torch first" >&2
    exit 2
}
VARIANT=gloo
if [[ "${AICFL_HOROVOD_GPU:-0}" == 1 ]]; then
    VARIANT=gloo-nccl
fi
CACHE_ROOT=${AICFL_WHEEL_CACHE:-$HOME/.cache/aicfl/wheels}
# A Horovod wheel is bound to the exact torch it was compiled against (C++ ABI).
CACHE_DIR="$CACHE_ROOT/horovod-$HOROVOD_VERSION/$PY_TAG-torch-${TORCH_VERSION//+/_}-$VARIANT"
mkdir -p "$CACHE_DIR"

# One build at a time per cache entry, when several setups run at once.
exec 9>"$CACHE_DIR/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

find_wheel() {
    compgen -G "$CACHE_DIR/horovod-$HOROVOD_VERSION-$PY_TAG-*.whl" | head -n 1 || true
}

WHEEL=$(find_wheel)
if [[ -z "$WHEEL" ]]; then
    echo "install_horovod: building horovod $HOROVOD_VERSION for $PY_TAG, torch $TORCH_VERSION ($VARIANT); about 10 minutes on 2 cores"
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/aicfl-horovod.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    if [[ -n "${AICFL_HOROVOD_SDIST:-}" ]]; then
        cp "$AICFL_HOROVOD_SDIST" "$WORK/horovod-$HOROVOD_VERSION.tar.gz"
    else
        "$PY" -m pip download -q "horovod==$HOROVOD_VERSION" --no-deps --no-binary :all: -d "$WORK"
    fi
    tar -xzf "$WORK/horovod-$HOROVOD_VERSION.tar.gz" -C "$WORK"
    SRC="$WORK/horovod-$HOROVOD_VERSION"
    # torch 2.13's headers use C++17.
    sed -i -E 's/set\(CMAKE_CXX_STANDARD 14\)/set(CMAKE_CXX_STANDARD 17)/' \
        "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$SRC/horovod/torch/CMakeLists.txt" || {
        echo "install_horovod: could not patch the C++ standard in horovod/torch/CMakeLists.txt" >&2
        exit 1
    }
    # Recent nvcc (CUDA 13) no longer compiles C++11, which Horovod asks of its CUDA kernels.
    sed -i -E 's/set\(CMAKE_CUDA_STANDARD 11\)/set(CMAKE_CUDA_STANDARD 17)/' \
        "$SRC/horovod/common/ops/cuda/CMakeLists.txt"
    # GCC >= 13 no longer pulls <string>, <cstdint>, <stdexcept>... in through other headers, and
    # some of Horovod's headers (group_table.h, common.h) rely on that.
    export CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }-include cstdint -include string -include stdexcept -include limits -include memory -include functional"
    export CMAKE_POLICY_VERSION_MINIMUM=3.5
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
    export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    if [[ "$VARIANT" == gloo-nccl ]]; then
        export HOROVOD_GPU_OPERATIONS=NCCL
        if [[ -z "${HOROVOD_CUDA_HOME:-}" ]] && NVCC=$(command -v nvcc); then
            HOROVOD_CUDA_HOME=$(dirname "$(dirname "$NVCC")")
            export HOROVOD_CUDA_HOME
        fi
        if [[ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}" ]]; then
            # The NCCL that torch's CUDA wheels bring (nvidia-nccl-cu*): link the library that
            # torch has already loaded when horovod.torch is imported. The wheel ships only
            # libnccl.so.2, so give CMake the unversioned name it looks for.
            SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
            NCCL_H=$(find "$SITE/nvidia" -name nccl.h 2>/dev/null | head -n 1)
            NCCL_SO=$(find "$SITE/nvidia" -name 'libnccl.so*' 2>/dev/null | head -n 1)
            if [[ -n "$NCCL_H" && -n "$NCCL_SO" ]]; then
                mkdir -p "$WORK/nccl-lib"
                ln -sf "$NCCL_SO" "$WORK/nccl-lib/libnccl.so"
                export HOROVOD_NCCL_INCLUDE=$(dirname "$NCCL_H") HOROVOD_NCCL_LIB="$WORK/nccl-lib"
                export HOROVOD_NCCL_LINK=SHARED
                echo "install_horovod: NCCL from $NCCL_SO"
            fi
        fi
    fi
    # The build runs in this environment (--no-build-isolation: it must see this torch), whose
    # setuptools must make wheels by itself (>= 70.1) or have `wheel` beside it.
    if ! "$PY" -c "import sys, setuptools; sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))" \
        >/dev/null 2>&1; then
        "$PY" -m pip install -q "setuptools>=70.1"
    fi
    # Horovod's setup.py otherwise runs make -j8, too many for a small shared machine.
    export MAKEFLAGS=${MAKEFLAGS:--j$(nproc 2>/dev/null || echo 2)}
    "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WORK/dist" "$SRC"
    cp "$WORK"/dist/horovod-"$HOROVOD_VERSION"-*.whl "$CACHE_DIR/"
    WHEEL=$(find_wheel)
fi

echo "install_horovod: installing $WHEEL"
"$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL"

if ! is_installed; then
    echo "install_horovod: horovod installed but horovodrun --check-build does not list PyTorch and Gloo:" >&2
    "$HOROVODRUN" --check-build >&2 || true
    exit 1
fi
echo "install_horovod: horovod $HOROVOD_VERSION ready; horovodrun --check-build lists PyTorch and Gloo"

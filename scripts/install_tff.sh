#!/usr/bin/env bash
# Build TensorFlow Federated's own virtualenv, for the side-by-side bench (bench/tff_peer.py).
#
#   scripts/install_tff.sh [VENV]        (default: .venv-tff beside this repository's .venv)
#
# TFF 0.87.0 pins tensorflow 2.14, numpy ~1.25, scipy ~1.9.3 and jax/jaxlib == 0.4.14; the
# package index has no jaxlib 0.4.14 for Python 3.11, and torch (aicfl's own venv) needs a newer
# numpy, so TFF lives in a virtualenv of its own. Its other pins are installed first, with
# jax/jaxlib 0.4.13 (TFF's jax backend is not used by the bench), then TFF itself with
# --no-deps. Run again, it exits at once when `import tensorflow_federated` reports 0.87.0.
#
# TFF starts a C++ worker_binary process that outlives the Python process that started it;
# whatever runs TFF stops it afterwards (bench/tff_side.py runs in its own process group and
# kills the group; bench/tff_peer.py and the test check that none is left).
#
# Environment:
#   AICFL_TFF_PYTHON   the Python 3.9-3.11 that builds the venv
#                      (default /root/.pyenv/versions/3.11.7/bin/python3 if present, else python3)
set -euo pipefail

TFF_VERSION=0.87.0
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-$ROOT/.venv-tff}
VPY="$VENV/bin/python"

fail() {
    echo "install_tff: $*" >&2
    exit 1
}

# The check a finished venv passes: TFF imports, at the right version, and computes a
# federated mean (the check also proves the worker_binary starts).
check() {
    "$VPY" - <<'EOF' 2>/dev/null
import os, signal
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.setpgrp()  # so that the worker_binary TFF starts can be stopped with us
try:
    import numpy as np
    import tensorflow as tf
    import tensorflow_federated as tff

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def mean(x):
        return tff.federated_mean(x)

    got = float(mean([1.0, 2.0, 3.0]))
    assert abs(got - 2.0) < 1e-6, got
    print(f"tensorflow-federated {tff.__version__}, tensorflow {tf.__version__}, "
          f"numpy {np.__version__}")
finally:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
EOF
}

if [[ -x "$VPY" ]] && report=$(check) && grep -q "tensorflow-federated $TFF_VERSION" <<<"$report"; then
    echo "install_tff: already installed at $VENV ($report)"
    exit 0
fi

BASE=${AICFL_TFF_PYTHON:-}
if [[ -z "$BASE" ]]; then
    if [[ -x /root/.pyenv/versions/3.11.7/bin/python3 ]]; then
        BASE=/root/.pyenv/versions/3.11.7/bin/python3
    else
        BASE=python3
    fi
fi
BASE=$(command -v "$BASE") || fail "no Python interpreter ${AICFL_TFF_PYTHON:-python3}"
"$BASE" -c 'import sys; sys.exit(not ((3, 9) <= sys.version_info[:2] <= (3, 11)))' ||
    fail "TFF $TFF_VERSION needs Python 3.9-3.11; $BASE is $("$BASE" -V 2>&1) (set AICFL_TFF_PYTHON)"

if [[ ! -x "$VPY" ]]; then
    "$BASE" -m venv "$VENV" || fail "could not create a virtualenv at $VENV with $BASE"
fi
# pip's output goes to a log, shown when a step fails.
LOG="$VENV/install_tff.log"
: >"$LOG"
pip_install() {
    "$VPY" -m pip install --disable-pip-version-check "$@" >>"$LOG" 2>&1 || {
        grep -v '^WARNING: Location' "$LOG" | tail -20 >&2
        return 1
    }
}
echo "install_tff: building $VENV (a few minutes; pip's log: $LOG)" >&2
pip_install --upgrade "pip<25" "setuptools<70" wheel || fail "could not upgrade pip in $VENV"

# TFF 0.87.0's install_requires, jax/jaxlib lowered to 0.4.13, plus what its imports need
# from packages it pins (tensorflow-privacy's and google-vizier's own requirements).
pip_install \
    "tensorflow==2.14.1" "numpy==1.25.2" "ml-dtypes==0.2.0" "scipy~=1.9.3" \
    "jax==0.4.13" "jaxlib==0.4.13" \
    "absl-py==1.*,>=1.0" "attrs==23.1.0" "cachetools~=5.3" "dm-tree==0.1.8" \
    "dp-accounting==0.4.3" "grpcio~=1.46" "portpicker~=1.6" \
    "tensorflow-model-optimization==0.7.5" "tensorflow-privacy==0.9.0" \
    "tensorflow-probability~=0.22.0" "tqdm~=4.64" "typing-extensions==4.5.*" \
    "googleapis-common-protos==1.61.0" "protobuf>=3.20.3,<5" "grpcio-tools<1.60" ||
    fail "could not install TFF $TFF_VERSION's pinned dependencies into $VENV (see pip's error above)"
# google-vizier 0.1.11 pins sqlalchemy<=1.4.20, which has no wheel for Python 3.11; TFF only
# imports vizier's pyvizier types, which do not need the database.
pip_install --no-deps "google-vizier==0.1.11" "tensorflow-federated==$TFF_VERSION" ||
    fail "could not install tensorflow-federated $TFF_VERSION into $VENV"

report=$(check) || {
    "$VPY" -c "import tensorflow_federated" 2>&1 | tail -5 >&2
    fail "tensorflow-federated $TFF_VERSION installed at $VENV but does not run (error above)"
}
echo "install_tff: installed at $VENV ($report)"

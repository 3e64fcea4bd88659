#!/bin/sh
# Start the coordinator from AICFL_* variables.
#
# `aicfl server start` takes the database, data folder, host, port, TLS files and
# log level from its flags, and the flags' defaults win over AICFL_* variables;
# so this maps the variables onto flags. The other settings (AICFL_SIGNING_KEY_FILE,
# AICFL_SIGNATURE_WINDOW, AICFL_ELIGIBILITY_WINDOW, AICFL_TICK_INTERVAL, AICFL_LONG_POLL,
# AICFL_LONG_POLL_MAX_HELD, AICFL_IDLE_RETRY, AICFL_POLL_RETRY, AICFL_ACTIVE_RETRY,
# AICFL_MAX_*_BYTES, AICFL_BODY_READ_TIMEOUT, AICFL_UPLOAD_SLOTS, AICFL_ENROLL_*,
# AICFL_BLOB_STORE, AICFL_S3_ENDPOINT_URL) are read from the environment by the server itself.
# Extra arguments are passed on to `aicfl server start`.
set -eu

set -- \
  --db "${AICFL_DB:-}" \
  --data-dir "${AICFL_DATA_DIR:-/var/lib/aicfl}" \
  --host "${AICFL_HOST:-0.0.0.0}" \
  --port "${AICFL_PORT:-8080}" \
  --log-level "${AICFL_LOG_LEVEL:-info}" \
  "$@"
if [ -n "${AICFL_TLS_CERT:-}" ]; then
  set -- --tls-cert "$AICFL_TLS_CERT" --tls-key "${AICFL_TLS_KEY:?AICFL_TLS_KEY must be set with AICFL_TLS_CERT}" "$@"
fi
# An empty --db means the default: SQLite under the data folder.
exec aicfl server start "$@"

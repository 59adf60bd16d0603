#!/bin/sh
# Export the credentials docker/make-secrets.py made for this deployment (compose sets
# MEDIAREPO_ENV_FILE), then run the command: the server, the worker or beat.
set -e
if [ -n "${MEDIAREPO_ENV_FILE:-}" ]; then
    set -a
    . "$MEDIAREPO_ENV_FILE"
    set +a
fi
exec "$@"

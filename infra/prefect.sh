#!/usr/bin/env bash
# The prefect CLI with the stack's credentials: `infra/prefect.sh ARGS...` is `prefect ARGS...`
# with PREFECT_API_AUTH_STRING from the environment or $LORAFLOW_CREDENTIALS_FILE (checked
# against the server first; no value is printed). Needs PREFECT_API_URL (. infra/env.sh). E.g.
#   infra/prefect.sh deployment run finetune/finetune --watch     start a pipeline run by hand
#   infra/prefect.sh flow-run ls                                  what ran, in which state
#   infra/prefect.sh flow-run logs FLOW_RUN_ID                    one run's log
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL (. infra/env.sh) to a running Prefect server}"
export DO_NOT_TRACK="${DO_NOT_TRACK:-1}"
exec python -m loraflow.credentials --no-mlflow -- prefect --no-prompt "$@"

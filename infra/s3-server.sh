#!/usr/bin/env bash
# Start an S3-protocol server for local production-like runs: moto's S3 on 127.0.0.1 (in memory:
# objects are lost when it stops; use MinIO or a real bucket to keep them), behind a check that
# every request is signed with the stack's key, as MinIO or AWS would check it (anonymous and
# wrongly signed requests get 403; infra/s3-server.py). Creates the buckets named in S3_BUCKETS
# (default: "mlflow models") before it answers, then prints `S3 ready at URL`.
set -euo pipefail
cd "$(dirname "$0")/.."
# the stack's key (server.env's S3_ACCESS_KEY/S3_SECRET_KEY, set by infra/local-stack.sh)
: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID (the S3 keys: infra/new-credentials.sh)}"
: "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY (the S3 keys: infra/new-credentials.sh)}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
# shellcheck disable=SC2086 # the bucket names are words
exec python infra/s3-server.py --host "${S3_HOST:-127.0.0.1}" --port "${S3_PORT:-9000}" \
  --buckets ${S3_BUCKETS:-mlflow models}

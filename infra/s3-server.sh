#!/usr/bin/env bash
# Start an S3-protocol server for local production-like runs: moto's standalone server on
# 127.0.0.1 (in memory: objects are lost when it stops; use MinIO or a real bucket to keep them).
# Creates the buckets named in S3_BUCKETS (default: "mlflow models") once it answers.
set -euo pipefail
host="${S3_HOST:-127.0.0.1}"
port="${S3_PORT:-9000}"
# moto accepts any key pair; the stack's own (server.env's S3_ACCESS_KEY/S3_SECRET_KEY, set by
# infra/local-stack.sh) are required anyway, as MinIO or AWS would check them.
: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID (the S3 keys: infra/new-credentials.sh)}"
: "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY (the S3 keys: infra/new-credentials.sh)}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
python -c "from moto.server import main; main()" -H "$host" -p "$port" &
server=$!
trap 'kill "$server"' INT TERM
for _ in $(seq 100); do
  python - "$host" "$port" 2>/dev/null <<'PY' && break
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
PY
  sleep 0.2
done
for bucket in ${S3_BUCKETS:-mlflow models}; do
  python - "http://$host:$port" "$bucket" <<'PY'
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])
print(f"bucket s3://{sys.argv[2]} ready at {sys.argv[1]}")
PY
done
wait "$server"

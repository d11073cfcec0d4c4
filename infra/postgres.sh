#!/usr/bin/env bash
# Start PostgreSQL for the stack's servers, on 127.0.0.1 only (port POSTGRES_PORT=5432), its
# data in POSTGRES_DATA ($LORAFLOW_HOME/postgres). One role and database per server: prefect
# (database prefect) and mlflow (databases mlflow and mlflow_auth, the basic-auth app's users),
# their passwords POSTGRES_PREFECT_PASSWORD / POSTGRES_MLFLOW_PASSWORD from server.env
# (infra/new-credentials.sh; no defaults). Every start creates what is missing and sets the
# passwords again (rotation: edit server.env, restart), so a restart is harmless. Logins: those
# two roles by password over TCP, each to its own databases; the superuser only through the
# socket in the data directory, as the OS user that runs the server (peer). Prints
# `PostgreSQL ready at 127.0.0.1:PORT` once the roles and databases exist; stops (a fast
# shutdown: open transactions are rolled back, nothing committed is lost) on SIGTERM or Ctrl-C.
# PostgreSQL refuses to run as root: started by root, it runs as POSTGRES_OS_USER (postgres,
# created if missing), which then owns the data directory and must be able to reach it.
set -euo pipefail
cd "$(dirname "$0")/.."
home="${LORAFLOW_HOME:-$PWD/.loraflow}"
data="${POSTGRES_DATA:-$home/postgres}"
port="${POSTGRES_PORT:-5432}"
: "${POSTGRES_PREFECT_PASSWORD:?set POSTGRES_PREFECT_PASSWORD (infra/new-credentials.sh; source server.env)}"
: "${POSTGRES_MLFLOW_PASSWORD:?set POSTGRES_MLFLOW_PASSWORD (infra/new-credentials.sh; source server.env)}"

# the server's programs: POSTGRES_BIN, else those on PATH, else Debian's newest
# /usr/lib/postgresql/N/bin (the package puts only the clients on PATH)
bin="${POSTGRES_BIN:-}"
if [ -z "$bin" ] && command -v initdb >/dev/null; then bin="$(dirname "$(readlink -f "$(command -v initdb)")")"; fi
if [ -z "$bin" ]; then bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"; fi
if [ ! -x "$bin/postgres" ] || [ ! -x "$bin/initdb" ] || [ ! -x "$bin/psql" ]; then
  echo "infra/postgres.sh: PostgreSQL is not installed (apt-get install postgresql), or set" \
    "POSTGRES_BIN to the folder of its postgres, initdb and psql (or run the stack on SQLite:" \
    "STACK_DATABASE=sqlite infra/local-stack.sh)" >&2
  exit 2
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "infra/postgres.sh: port $port on 127.0.0.1 is taken (another PostgreSQL?); stop it or" \
    "choose another: POSTGRES_PORT" >&2
  exit 2
fi

mkdir -p "$data"
data="$(cd "$data" && pwd)"
as_db=()  # how to run a program as the server's OS user
os_user="$(id -un)"
if [ "$(id -u)" = 0 ]; then
  os_user="${POSTGRES_OS_USER:-postgres}"
  if ! id -u "$os_user" >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin "$os_user"
  fi
  chown "$os_user:" "$data"
  as_db=(setpriv "--reuid=$os_user" "--regid=$os_user" --init-groups --)
  reachable() { (cd / && "${as_db[@]}" test -w "$data" -a -x "$data"); }
  if ! reachable && [ "$(dirname "$data")" = "$(cd "$home" && pwd)" ]; then
    # the stack's home is private to root (new-credentials.sh makes it so): let the server's
    # user pass through it to its data directory (search, not list; every file inside keeps
    # its own mode: secrets/ and mlflow-auth.ini stay private to root)
    if command -v setfacl >/dev/null; then setfacl -m "u:$os_user:x" "$home"; else chmod o+x "$home"; fi
    echo "$home: user $os_user may now pass through it to $data"
  fi
  if ! reachable; then
    echo "infra/postgres.sh: PostgreSQL runs as user $os_user (it refuses root), which cannot" \
      "reach $data: a folder above it is private to root. Put the data elsewhere," \
      "e.g. POSTGRES_DATA=/var/lib/loraflow/postgres, or run the stack as another user" >&2
    exit 2
  fi
fi
chmod 700 "$data"

if [ ! -s "$data/PG_VERSION" ]; then
  echo "a new database cluster in $data (user $os_user) ..."
  (cd "$data" && "${as_db[@]}" "$bin/initdb" --pgdata="$data" --username="$os_user" \
    --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 --locale=C --no-instructions) \
    >/dev/null
fi
# who may log in, rewritten at every start: the superuser through the socket only, each server's
# role to its own databases over loopback with its password
printf '%s\n' \
  "# written by infra/postgres.sh at every start" \
  "local all $os_user peer" \
  "host prefect prefect 127.0.0.1/32 scram-sha-256" \
  "host mlflow,mlflow_auth mlflow 127.0.0.1/32 scram-sha-256" > "$data/pg_hba.conf"

# a subshell that becomes the server: $! is the postmaster
(cd "$data" && exec "${as_db[@]}" "$bin/postgres" -D "$data" -p "$port" \
  -c listen_addresses=127.0.0.1 -c unix_socket_directories="$data" \
  -c password_encryption=scram-sha-256) &
server=$!
stop_server() { kill -INT "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
trap stop_server EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

psql() { (cd "$data" && "${as_db[@]}" "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$data" -p "$port" "$@"); }
for _ in $(seq 120); do
  (cd "$data" && "${as_db[@]}" "$bin/pg_isready" -q -h "$data" -p "$port") && break
  kill -0 "$server" 2>/dev/null || { echo "infra/postgres.sh: PostgreSQL exited" >&2; exit 1; }
  sleep 0.5
done
# The passwords reach the server as SCRAM verifiers computed here, never as text: a statement
# that fails is written to the server's log with its text.
verifier() {  # verifier VARIABLE: the SCRAM-SHA-256 verifier of the password in VARIABLE
  PASSWORD_VARIABLE="$1" python - <<'EOF'
import base64, hashlib, hmac, os

password = os.environ[os.environ["PASSWORD_VARIABLE"]].encode()
salt, rounds = os.urandom(16), 4096
salted = hashlib.pbkdf2_hmac("sha256", password, salt, rounds)
client_key = hmac.new(salted, b"Client Key", "sha256").digest()
server_key = hmac.new(salted, b"Server Key", "sha256").digest()
stored_key = hashlib.sha256(client_key).digest()
b64 = [base64.b64encode(b).decode() for b in (salt, stored_key, server_key)]
print(f"SCRAM-SHA-256${rounds}:{b64[0]}${b64[1]}:{b64[2]}")
EOF
}
missing() { echo "WHERE NOT EXISTS (SELECT FROM $1 WHERE $2 = '$3')\\gexec"; }
printf '%s\n' \
  "SELECT 'CREATE ROLE prefect' $(missing pg_roles rolname prefect)" \
  "SELECT 'CREATE ROLE mlflow' $(missing pg_roles rolname mlflow)" \
  "ALTER ROLE prefect LOGIN PASSWORD '$(verifier POSTGRES_PREFECT_PASSWORD)';" \
  "ALTER ROLE mlflow LOGIN PASSWORD '$(verifier POSTGRES_MLFLOW_PASSWORD)';" \
  "SELECT 'CREATE DATABASE prefect OWNER prefect' $(missing pg_database datname prefect)" \
  "SELECT 'CREATE DATABASE mlflow OWNER mlflow' $(missing pg_database datname mlflow)" \
  "SELECT 'CREATE DATABASE mlflow_auth OWNER mlflow' $(missing pg_database datname mlflow_auth)" \
  "REVOKE ALL ON DATABASE prefect, mlflow, mlflow_auth FROM PUBLIC;" | psql -d postgres
echo "PostgreSQL ready at 127.0.0.1:$port (databases prefect, mlflow, mlflow_auth; data in $data)"
wait "$server"

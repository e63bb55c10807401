# shellcheck shell=bash
# Sourced by .ci/run: a PostgreSQL server on 127.0.0.1 for the `postgres`-marked tests (the Optuna
# study shared by workers on many machines). Installs Debian's postgresql if missing, starts a
# throw-away cluster as the postgres user (CI runs as root; a non-root developer runs it as themselves),
# creates a login role with CREATEDB and exports WORKBENCH_PG_URL. The tests create their own database.
# Idempotent: a second source reuses the running server. Override with WORKBENCH_PG_PORT / _DATA / _PASSWORD.
# An already exported WORKBENCH_PG_URL is left alone (bring your own server).

_wb_pg_setup() {
  local port="${WORKBENCH_PG_PORT:-54329}" data="${WORKBENCH_PG_DATA:-/tmp/workbench-pg-${WORKBENCH_PG_PORT:-54329}}"
  local role=workbench password="${WORKBENCH_PG_PASSWORD:-workbench}" bindir user
  if ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
      echo "setup-postgres: PostgreSQL is not installed and this is not root: apt-get install postgresql, or export WORKBENCH_PG_URL" >&2
      return 1
    fi
    echo "setup-postgres: installing postgresql from the Debian packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  bindir="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
  if [ "$(id -u)" = 0 ]; then user=postgres; else user="$(id -un)"; fi
  _wb_as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
  if [ ! -s "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$data"
    chmod 700 "$data"
    # local socket: trust for the superuser setup below; TCP: password (scram) for the tests
    _wb_as_pg "$bindir/initdb" -D "$data" -U "$user" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  fi
  if ! _wb_as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    _wb_as_pg "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
      -o "-p $port -k $data -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
  fi
  _wb_as_pg "$bindir/psql" -h "$data" -p "$port" -U "$user" -d postgres -v ON_ERROR_STOP=1 -q >/dev/null <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$role') THEN
    CREATE ROLE $role LOGIN CREATEDB PASSWORD '$password';
  ELSE
    ALTER ROLE $role LOGIN CREATEDB PASSWORD '$password';
  END IF;
END \$\$;
SQL
  export WORKBENCH_PG_URL="postgresql+psycopg2://$role:$password@127.0.0.1:$port/postgres"
  echo "setup-postgres: server on 127.0.0.1:$port (data $data); WORKBENCH_PG_URL exported"
}

if [ -z "${WORKBENCH_PG_URL:-}" ]; then
  _wb_pg_setup
fi
unset -f _wb_pg_setup _wb_as_pg 2>/dev/null || true

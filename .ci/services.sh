#!/usr/bin/env bash
# Services the test suite needs, from Debian 12 packages; called by .ci/run before `make test`.
#   - PostgreSQL server (cluster 15/main on 127.0.0.1:5432) with role+database rlhfkit/rlhfkit_test, password
#     rlhfkit: tests/annotate/test_postgres.py connects to postgresql://rlhfkit:rlhfkit@127.0.0.1:5432/rlhfkit_test
#     (override with RLHFKIT_TEST_PG_URL).
#   - chromium + chromium-driver (/usr/bin/chromium) for the real-browser test of the annotation UI.
# Idempotent: installs only what is missing, starts only what is stopped; a second run takes about a second.
# Runs as root (as CI does). A failure here does not stop CI: the dependent tests skip and say why.
set -uo pipefail

log() { echo "services.sh: $*"; }
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo -n"; fi

missing=()
command -v pg_ctlcluster >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }; then
    log "WARNING: apt-get install ${missing[*]} failed; dependent tests will skip"
  fi
fi

# PostgreSQL: create the default cluster if the package did not, start it, create the test role and database.
if command -v pg_lsclusters >/dev/null 2>&1; then
  ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
  if ! pg_lsclusters -h | awk '{print $1"/"$2}' | grep -qx "$ver/main"; then
    $SUDO pg_createcluster "$ver" main >/dev/null || log "WARNING: pg_createcluster $ver main failed"
  fi
  if ! pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main" {print $4}' | grep -q online; then
    $SUDO pg_ctlcluster "$ver" main start || log "WARNING: could not start PostgreSQL $ver/main"
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
  if pg_isready -q -h 127.0.0.1 -p 5432; then
    psql_admin() { $SUDO su postgres -s /bin/sh -c "psql -qAtX -v ON_ERROR_STOP=1 -c \"$1\"" ; }
    if [ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname='rlhfkit'")" != "1" ]; then
      psql_admin "CREATE ROLE rlhfkit LOGIN PASSWORD 'rlhfkit' CREATEDB" >/dev/null
    fi
    if [ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname='rlhfkit_test'")" != "1" ]; then
      psql_admin "CREATE DATABASE rlhfkit_test OWNER rlhfkit" >/dev/null
    fi
    log "PostgreSQL $ver ready on 127.0.0.1:5432 (database rlhfkit_test)"
  else
    log "WARNING: PostgreSQL is not accepting connections; tests/annotate/test_postgres.py will skip"
  fi
fi
[ -x /usr/bin/chromium ] && log "$(/usr/bin/chromium --version 2>/dev/null | head -1) at /usr/bin/chromium"
exit 0

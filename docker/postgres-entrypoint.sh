#!/bin/sh
# Entry point of docker/Dockerfile.postgres: on the first start (an empty $PGDATA) make the cluster with the user,
# password and database of POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB (the names the public postgres image
# uses), password authentication over the network; then run the server in the foreground. Runs as `postgres`.
set -eu
: "${POSTGRES_USER:=fsmllm}" "${POSTGRES_DB:=$POSTGRES_USER}"
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
  echo "postgres-entrypoint: set POSTGRES_PASSWORD" >&2
  exit 1
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  password=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$password"
  initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$password" --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$password"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"  # any address, with the password
  if [ "$POSTGRES_DB" != postgres ]; then  # single-user mode: no server is listening yet
    printf 'CREATE DATABASE "%s" OWNER "%s";\n' "$POSTGRES_DB" "$POSTGRES_USER" \
      | postgres --single -D "$PGDATA" postgres >/dev/null
  fi
  echo "postgres-entrypoint: cluster made in $PGDATA (database $POSTGRES_DB, user $POSTGRES_USER)"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"

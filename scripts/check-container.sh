#!/usr/bin/env bash
# Checks what can be checked of the container files without a container engine (this machine has
# the Docker client only, and neither `docker build --check` nor buildx work without one):
#   check-container.sh compose   deploy/compose.yaml through `docker-compose config` (Debian's
#                                docker-compose, which validates against the Compose schema)
#   check-container.sh image     every file deploy/Containerfile copies from the build context
#                                exists and the server binary is static; every flag and variable
#                                the Containerfile, compose.yaml and the Helm chart give
#                                kernex-server is one that binary knows (`serve --help`)
set -euo pipefail
cd "$(dirname "$0")/.."

compose() {
  if ! command -v docker-compose >/dev/null; then
    echo "check-container: compose skipped, docker-compose is not installed (Debian package docker-compose)"
    return 0
  fi
  # Dummy secrets: the file refuses to start without them, which is checked too.
  if docker-compose -f deploy/compose.yaml config -q 2>/dev/null; then
    echo "check-container: deploy/compose.yaml starts without its secrets" >&2
    exit 1
  fi
  POSTGRES_PASSWORD=check S3_ACCESS_KEY=checkkey S3_SECRET_KEY=checksecret \
    docker-compose -f deploy/compose.yaml config -q
  echo "check-container: deploy/compose.yaml ok ($(docker-compose version --short))"
}

image() {
  local missing=0 bin=target/x86_64-unknown-linux-musl/release/kernex-server
  # COPY lines without --from take their sources from the build context (the repository root).
  while read -r src; do
    if [ ! -e "$src" ]; then
      echo "check-container: deploy/Containerfile copies $src, which does not exist (run \`just server-static\`)" >&2
      missing=1
    fi
  done < <(grep -E '^COPY ' deploy/Containerfile | grep -v -- '--from=' | awk '{ print $(NF-1) }')
  [ "$missing" = 0 ] || exit 1
  file "$bin" | grep -q "static" || { echo "check-container: $bin is not static" >&2; exit 1; }
  local help
  help=$("$bin" serve --help)
  local used
  used=$( (grep -ohE -- '--[a-z][a-z0-9-]+' deploy/Containerfile deploy/compose.yaml deploy/helm/kernex/templates/deployment.yaml deploy/helm/kernex/values.yaml;
           grep -ohE 'KERNEX_[A-Z0-9_]+' deploy/Containerfile deploy/compose.yaml deploy/helm/kernex/templates/*.yaml) \
         | sort -u | grep -vE -- '^--(from|ignore-existing|console-address|build|no-install-recommends)$')
  for word in $used; do
    case "$word" in
      KERNEX_DATA_DIR|KERNEX_DATABASE_URL) "$bin" --help | grep -q "env: $word" ;;
      KERNEX_LOG|KERNEX_LOG_FORMAT) grep -q "\"$word\"" server/src/lib.rs ;;
      KERNEX_*) grep -q "env: $word" <<<"$help" ;;
      *) grep -qE -- "$word( |,|=|$)" <<<"$help" ;;
    esac || { echo "check-container: deploy/ gives kernex-server $word, which it does not know" >&2; exit 1; }
  done
  echo "check-container: deploy/Containerfile sources present, $bin static, $(wc -w <<<"$used") flags and variables known"
}

case "${1:-}" in
  compose) compose ;;
  image) image ;;
  *) echo "usage: $0 compose|image" >&2; exit 2 ;;
esac

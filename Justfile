# Every routine task. `./dev <recipe>` installs what a fresh machine lacks, then runs it here.

set shell := ["bash", "-euo", "pipefail", "-c"]

musl_target := "x86_64-unknown-linux-musl"
agent_bin := justfile_directory() / "target" / musl_target / "agent/kernex-agent"
standin_iso := justfile_directory() / "target/qemu/standin.iso"

export CC_x86_64_unknown_linux_musl := "musl-gcc"

# List the recipes.
default:
    @just --list

# Server on SQLite + an agent enrolling and heartbeating, printing the device as it appears.
demo: build
    scripts/demo.sh

# Debug builds of every binary and test (dependencies optimised: RSA key generation needs it).
build:
    cargo build --workspace --bins --tests

# The static musl agent, as shipped; checks it is static and prints its size and idle memory.
agent: agent-binary
    scripts/agent-footprint.sh {{agent_bin}}

# Only build the static musl agent and check that it is static.
agent-binary:
    cargo build -p kernex-agent --profile agent --target {{musl_target}}
    @if cargo tree -q -p kernex-agent --target {{musl_target}} -e normal --prefix none | grep -q '^utoipa'; then echo "kernex-agent links utoipa: only kernex-server may turn on kernex-protocol's openapi feature" >&2; exit 1; fi
    @out=$(file {{agent_bin}}); echo "$out"; grep -q "static" <<<"$out" || { echo "kernex-agent is not static" >&2; exit 1; }
    @echo "kernex-agent (static musl, stripped): $(stat -c %s {{agent_bin}}) bytes"

# The static musl kernex-server (what deploy/Containerfile ships); checks it is static, prints its size.
server-static:
    cargo build -p kernex-server --release --target {{musl_target}}
    @out=$(file target/{{musl_target}}/release/kernex-server); echo "$out"; grep -q "static" <<<"$out" || { echo "kernex-server is not static" >&2; exit 1; }
    @echo "kernex-server (static musl): $(stat -c %s target/{{musl_target}}/release/kernex-server) bytes"

# The container image's inputs, checked without an engine: static binary, copied files, known flags.
container: server-static
    scripts/check-container.sh image

# The image really built and run with podman, offline (scripts/container-smoke.sh): Debian base
# from debootstrap (once), build, run with a volume; probes, uid 65532, tenant + API key over REST.
container-run: server-static
    scripts/container-smoke.sh

# A second static agent that says it is one patch newer (`<x.y.z+1>-next`), for the self-update
# tests; rebuilt only when the agent's sources change. Leaves the shipped agent in place.
agent-next: agent-binary
    #!/usr/bin/env bash
    set -euo pipefail
    out=target/agent-next/kernex-agent
    inputs=$(git ls-files -co --exclude-standard agent protocol Cargo.lock | sort | xargs cat | sha256sum | cut -c1-16)
    if [ -x "$out" ] && [ "$(cat "$out.inputs" 2>/dev/null)" = "$inputs" ]; then
      echo "$out ($("$out" --version)) is up to date"; exit 0
    fi
    current=$({{agent_bin}} --version | cut -d' ' -f2)
    next=$(awk -F. '{ split($3, p, "-"); printf "%d.%d.%d-next", $1, $2, p[1] + 1 }' <<<"$current")
    KERNEX_AGENT_VERSION=$next cargo build -p kernex-agent --profile agent --target {{musl_target}}
    mkdir -p target/agent-next
    cp {{agent_bin}} "$out"
    cargo build -p kernex-agent --profile agent --target {{musl_target}}
    echo "$inputs" > "$out.inputs"
    echo "$out: $("$out" --version) (shipped: $({{agent_bin}} --version))"

# Formatting and lints, as CI runs them; the monitoring files checked against the metrics.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    scripts/check-monitoring.sh
    scripts/check-systemd-units.sh
    scripts/check-container.sh compose
    scripts/check-helm.sh

# Everything CI runs: lints, unit tests, integration tests on SQLite and PostgreSQL with the musl
# agent, schemathesis against the OpenAPI document, the bundle and backup tests with the S3 store
# (Garage), the web console in headless Chromium, then the QEMU chain (tenant ISO booted with BIOS
# and UEFI, appliances enroll, link their user VM, take a bundle and a new agent).
test: lint build agent
    cargo test --workspace --exclude kernex-tests
    just _integration sqlite
    just _integration postgres
    just test-openapi
    just _s3
    just _browser
    just test-qemu

# The stand-in base ISO (Ubuntu live-server layout, built from Debian packages); rebuilt only when
# qemu/build-standin.sh or qemu/initramfs/ change.
standin:
    #!/usr/bin/env bash
    set -euo pipefail
    inputs=$(cat qemu/build-standin.sh qemu/initramfs/* | sha256sum | cut -c1-16)
    if [ -f "{{standin_iso}}" ] && [ "$(cat "{{standin_iso}}.inputs" 2>/dev/null)" = "$inputs" ]; then
      echo "stand-in ISO {{standin_iso}} is up to date"
      exit 0
    fi
    qemu/build-standin.sh "{{standin_iso}}"
    echo "$inputs" > "{{standin_iso}}.inputs"

# The user-VM stand-in for the QEMU chain: the stand-in's kernel and modules, qemu/uservm/init and
# the static agent running `vm-endpoint`.
uservm: standin agent-binary
    qemu/build-uservm.sh {{standin_iso}} {{agent_bin}} target/qemu/uservm

# The whole chain under QEMU: server, imagebuilder, BIOS + UEFI boots, enrollment, the BIOS
# appliance linked to a user VM, a bundle rolled out to both appliances, the agent updating itself.
test-qemu: build agent-binary agent-next standin uservm
    KERNEX_STANDIN_ISO={{standin_iso}} KERNEX_AGENT_BIN={{agent_bin}} \
      KERNEX_AGENT_NEXT_BIN={{justfile_directory()}}/target/agent-next/kernex-agent \
      KERNEX_USERVM_DIR={{justfile_directory()}}/target/qemu/uservm \
      cargo test -p kernex-tests --test qemu

# The stand-in's own boot checks: BIOS, UEFI, USB stick, hard disk, failing late-command (slow).
boot-check: standin
    BOOTCHECK_DIR={{justfile_directory()}}/target/qemu qemu/boot-check.sh {{standin_iso}}

# Tenant ISO cost on an Ubuntu-sized base: cp vs full remaster vs the cached fast path.
bench-iso: agent-binary standin
    cargo build --release -p imagebuilder
    scripts/bench-iso.sh {{standin_iso}} {{agent_bin}}

# Build a tenant ISO, e.g. `just iso example /path/to/ubuntu-24.04.1-live-server-amd64.iso`.
iso tenant base *ARGS: agent-binary
    cargo run -q -p imagebuilder -- build --tenant {{tenant}} --base {{base}} --agent {{agent_bin}} {{ARGS}}

# The integration suite against a real PostgreSQL (started here if it is not running).
test-postgres: build agent-binary
    just _integration postgres

# schemathesis (PyPI, pinned, in target/schemathesis-venv) fuzzes every operation of a seeded debug
# server; any 5xx, undocumented status or body off the schema fails. Deeper: `OPENAPI_MAX_EXAMPLES=200
# just test-openapi --seed 7` (extra arguments go to schemathesis).
# The running server against its own OpenAPI document (`GET /api/v1/openapi.json`).
test-openapi *ARGS:
    cargo build -p kernex-server
    scripts/openapi-check.sh {{ARGS}}

# The web console in headless Chromium (Debian's chromium + chromium-driver): log in, create a
# token, a real agent enrolls and goes online, roll a bundle out and back; screenshots in
# target/console-screenshots/.
test-browser: build agent-binary
    just _browser

[private]
_browser:
    @echo "==> the web console in headless Chromium"
    KERNEX_AGENT_BIN={{agent_bin}} cargo test -p kernex-tests --test browser
    @echo "screenshots: $(ls target/console-screenshots/*.png | wc -l) in target/console-screenshots/"

# The S3 bundle store against a real Garage (started on loopback by scripts/garage.sh unless it
# runs already): the store's own tests, then the bundle tests and the S3 backup/restore test on
# SQLite with the musl agent.
test-s3: build agent-binary
    just _s3

[private]
_s3:
    @echo "==> S3 bundle store against Garage"
    settings=$(scripts/garage.sh); eval "$settings"; \
      cargo test --workspace --exclude kernex-tests --lib store::s3 && \
      KERNEX_AGENT_BIN={{agent_bin}} cargo test -p kernex-tests --test integration -- bundles:: backup::s3_

# The integration suite on one backend, with the shipped (musl) agent.
[private]
_integration backend: agent-next
    @echo "==> integration tests on {{backend}}"
    {{ if backend == "postgres" { "export KERNEX_TEST_POSTGRES=\"$(scripts/postgres.sh)\";" } else { "" } }} \
      KERNEX_AGENT_BIN={{agent_bin}} KERNEX_AGENT_NEXT_BIN={{justfile_directory()}}/target/agent-next/kernex-agent \
      cargo test -p kernex-tests --test integration

# Bundle downloads (256 MiB to 64 clients) from kernex-server and from nginx in the same run, and
# a 1 GiB upload next to cp + sync.
bench-bundles *ARGS:
    cargo build --release -p kernex-server
    scripts/bench-bundles.sh {{ARGS}}

# Heartbeat throughput against SQLite and PostgreSQL, side by side with a no-op endpoint.
bench-heartbeat *ARGS:
    cargo build --release -p kernex-server -p kernex-bench
    scripts/bench-heartbeat.sh {{ARGS}}

# Where a heartbeat's CPU goes, per server thread and per heartbeat (e.g. `--devices 100000`).
profile-heartbeat *ARGS:
    cargo build --release -p kernex-server
    scripts/profile-heartbeat.sh {{ARGS}}

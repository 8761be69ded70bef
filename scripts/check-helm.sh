#!/usr/bin/env bash
# Lints and renders deploy/helm/kernex with Helm itself. Helm is not a Debian 12 package and no
# download but the registries' is possible here, so this uses helm-python-sdk (PyPI, pinned): its
# wheel bundles libhelm_c, Helm v4's own Go SDK (the `lint` and `template` actions) behind a C ABI,
# in target/helm-venv. Checks: `helm lint --strict` with complete values; the render has every
# object the chart promises, probes on /healthz and /readyz; incomplete values fail naming the
# missing value.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=0.2.2
venv=$root/target/helm-venv
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('helm-python-sdk') != '$version')" 2>/dev/null; then
  echo "==> installing helm-python-sdk $version (Helm's Go SDK) into $venv"
  python3 -m venv "$venv" || { echo "check-helm: python3 -m venv failed (is python3-venv installed?)" >&2; exit 1; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check "helm-python-sdk==$version"
fi
exec "$venv/bin/python" - "$root/deploy/helm/kernex" <<'PY'
import re
import sys

import helm_python as helm

chart_dir = sys.argv[1]
values = {
    "database": {"url": "postgres://kernex:secret@postgres:5432/kernex"},
    "s3": {
        "endpoint": "https://s3.example.com",
        "bucket": "bundles",
        "region": "eu-central-1",
        "accessKeyId": "AKIDEXAMPLE",
        "secretAccessKey": "example-secret",
    },
}
failed = False


def fail(message):
    global failed
    print(f"check-helm: {message}", file=sys.stderr)
    failed = True


report = helm.lint(chart_dir, values, strict=True, kube_version="v1.30.0")
for message in report.get("messages") or []:
    print(f"  lint [{message['severity']}] {message['path']}: {message['error']}")
    if message["severity"] >= 2:
        fail(f"helm lint --strict: {message['path']}: {message['error']}")
for error in report.get("errors") or []:
    fail(f"helm lint: {error}")

chart = helm.Chart.load(chart_dir)
rendered = chart.render(values, name="kx", namespace="kernex", is_install=True)
text = "\n---\n".join(body for path, body in sorted(rendered.items()) if body.strip())
kinds = re.findall(r"^kind: (\S+)$", text, re.M)
for kind in ["Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler", "PodDisruptionBudget"]:
    if kind not in kinds:
        fail(f"helm template: no {kind} rendered (got {kinds})")
for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
    if not re.search(rf"{probe}:\n\s+httpGet:\n\s+path: {path}\n", text):
        fail(f"helm template: the Deployment has no {probe} on {path}")
if "--plain-http" not in text:
    fail("helm template: serve lacks --plain-http (it refuses plain HTTP off loopback otherwise)")

# Existing Secrets instead of values: no Secret rendered, the Deployment refers to them.
external = {**values, "database": {"existingSecret": "kernex-db"}, "s3": {**values["s3"], "accessKeyId": "", "secretAccessKey": "", "existingSecret": "kernex-s3"}}
rendered = chart.render(external, name="kx", namespace="kernex")
text = "\n".join(rendered.values())
if re.search(r"^kind: Secret$", text, re.M):
    fail("helm template: a Secret is rendered although both existingSecret values are set")
for secret in ["kernex-db", "kernex-s3"]:
    if f"name: {secret}" not in text:
        fail(f"helm template: the Deployment does not use the existing Secret {secret}")

# Incomplete values fail and name what is missing.
try:
    chart.render({**values, "database": {"url": ""}}, name="kx")
    fail("helm template: rendered without database.url")
except helm.errors.HelmError as error:
    if "database.url" not in str(error):
        fail(f"helm template without database.url: unclear error {error}")

if failed:
    sys.exit(1)
print(f"check-helm: deploy/helm/kernex ok (helm lint --strict, helm template: {', '.join(sorted(set(kinds)))})")
PY

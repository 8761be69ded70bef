#!/usr/bin/env bash
# Checks deploy/: the Prometheus alert rules (promtool check + unit tests), the Grafana dashboard
# (valid JSON), and that every kernex_* metric they use is one kernex-server exports.
set -euo pipefail
cd "$(dirname "$0")/.."
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts_test.yml)
jq -e '.panels | length > 0' deploy/grafana/kernex-dashboard.json >/dev/null
exported=$(grep -o 'kernex_[a-z_]*' server/src/metrics.rs | sort -u)
used=$( { jq -r '.panels[].targets[].expr' deploy/grafana/kernex-dashboard.json; cat deploy/prometheus/alerts.yml; } \
  | grep -o 'kernex_[a-z_]*' | sed -E 's/_(bucket|sum|count)$//' | sort -u)
missing=$(comm -13 <(echo "$exported") <(echo "$used"))
if [ -n "$missing" ]; then
  echo "deploy/ uses metrics kernex-server does not export: $missing" >&2
  exit 1
fi
echo "monitoring: $(echo "$used" | wc -l) metrics used, all exported; alert rules and their tests pass"

#!/usr/bin/env bash
# Installs the external programs the test suite runs for real, when missing: redis-server (the Redis tests
# start their own instance), redis-sentinel and nginx (the scale-out tests), and Prometheus/promtool (the deploy
# tests check rules and scrape a live server), chromium and chromium-driver (the browser page tests).
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# redis-sentinel: the Sentinel failover tests (tests/deploy/test_sentinel.py); nginx: the balancer tests
# (tests/deploy/test_nginx.py). Both are only started by the tests, on free loopback ports.
command -v redis-sentinel >/dev/null 2>&1 || need+=(redis-sentinel)
{ command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || need+=(nginx)
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || need+=(prometheus)
# chromium and chromium-driver: the browser chat page tests (tests/api/http/test_page.py) drive a real headless
# Chromium through /usr/bin/chromedriver.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: please install ${need[*]} (no apt-get here)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"

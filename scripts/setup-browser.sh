#!/usr/bin/env bash
# Headless Chromium for the browser tests (tests/test_prefect_server.py renders an artifact page of the
# Prefect UI). Installed from Debian's package when it can be (root and apt-get); otherwise those tests
# skip and say why. Never fails the caller.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Debian's chromium for the browser tests"
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
    || echo "setup: could not install chromium; the browser tests will be skipped"
else
  echo "setup: chromium is absent and cannot be installed here (not root or no apt-get); browser tests skip"
fi
exit 0

#!/bin/sh
# Installs Debian's headless-capable Chromium for the report's browser test (tests/test_report.py), only if it
# is absent. Where it cannot be installed (no root, no package mirror), the test skips and says why.
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "ensure_chromium: could not install chromium; the browser test will skip" >&2
else
    echo "ensure_chromium: chromium is absent and cannot be installed here; the browser test will skip" >&2
fi
exit 0

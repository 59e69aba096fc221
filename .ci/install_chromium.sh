#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver for the HTML-report browser test
# (tests/report/test_browser.py drives /usr/bin/chromium through Selenium with /usr/bin/chromedriver).
# Nothing is downloaded at test time: Selenium Manager is told to stay offline.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo present)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core
/usr/bin/chromium --version

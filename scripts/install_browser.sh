#!/usr/bin/env bash
# Debian's chromium, for the live page's browser test (tests/test_web_page.py drives it
# headless through its DevTools protocol). Idempotent; skipped where apt is not available.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "[install_browser] chromium: $(chromium --version 2>/dev/null | head -1)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install_browser] no apt-get: install chromium yourself; its test is skipped until then"
  exit 0
fi
sudo=""
[[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
if $sudo apt-get install -y -q chromium >/dev/null 2>&1 || {
    $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q chromium >/dev/null 2>&1; }
then
  echo "[install_browser] chromium: $(chromium --version 2>/dev/null | head -1)"
else
  echo "[install_browser] apt could not install chromium; its test is skipped until it is installed"
fi

#!/usr/bin/env bash
# Installs Debian's chromium for the report's browser tests, unless a Chromium is already there.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if [ -n "${CHROMIUM:-}" ] || command -v "$name" >/dev/null; then exit 0; fi
done
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q chromium >/dev/null 2>&1 \
  || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium >/dev/null; }
command -v chromium >/dev/null

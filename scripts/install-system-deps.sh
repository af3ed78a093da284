#!/usr/bin/env bash
# System packages the test suites use: Prometheus (+ promtool), Chromium (browser tests),
# PostgreSQL (feedback DB tests). Idempotent; installs only what is missing. Needs root/sudo.
set -euo pipefail
packages=(prometheus postgresql)
# The browser: Debian's chromium. On Ubuntu that package is a snap stub that cannot run in
# CI; GitHub's Ubuntu runners ship Google Chrome, which the browser tests use instead.
if [ -x /usr/bin/google-chrome ] && ! grep -q '^ID=debian' /etc/os-release; then
  echo "browser: /usr/bin/google-chrome"
else
  packages+=(chromium)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian packages start services on install; tests start their own instances.
  $SUDO systemctl disable --now prometheus postgresql >/dev/null 2>&1 || true
fi
echo "system packages present: ${packages[*]}"

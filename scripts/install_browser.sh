#!/usr/bin/env bash
# Chromium and its driver, for the browser test of the UIs (`make test`), from the
# distribution's packages (apt, ~25 s) when this runs as root; otherwise it says what to run,
# and the browser test is skipped until they are there.
set -euo pipefail
packages=(chromium chromium-driver)  # Debian's names
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt_get() { env DEBIAN_FRONTEND=noninteractive apt-get -qq "$@" >/dev/null; }
    install_chromium() { apt_get install -y --no-install-recommends "${packages[@]}"; }
    # Stale or missing package lists: update once, then try again.
    if install_chromium || { apt_get update && install_chromium; }; then
      echo "installed ${packages[*]} (apt) for the browser test"
    else
      echo "could not install ${packages[*]} with apt; the browser test will be skipped" >&2
    fi
  else  # never escalates by itself
    echo "the browser test will be skipped; to run it: sudo apt-get install ${packages[*]}" >&2
  fi
fi

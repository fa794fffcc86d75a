#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its dev extra.
# uv resolves and installs the ~200 wheels in parallel (measured here: 80 s against pip's
# 3.4 min, both with cold caches); pip remains the fallback. uv does not read pip's
# configuration, so the wheel locations pip is configured with (find-links: the CPU torch
# wheel) and its constraints are handed over explicitly. --compile-bytecode as pip does: with
# PYTHONDONTWRITEBYTECODE set (as here) a venv without .pyc files recompiles torch and
# transformers in every process, 20-25 s an import instead of ~9 (every Ray worker pays it).
# The browser for the UI test is scripts/install_browser.sh's (`make test` runs it; the demo
# does not need it).
set -euo pipefail
python=${PYTHON:-python3}
venv=${VENV:-.venv}

test -x "$venv/bin/python" || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)

uv_args=()
find_links=$("${pip[@]}" config get global.find-links 2>/dev/null || true)
find_links=${find_links:-${PIP_FIND_LINKS:-}}
for location in $find_links; do uv_args+=(--find-links "$location"); done
constraint=$("${pip[@]}" config get global.constraint 2>/dev/null || true)
constraint=${constraint:-${PIP_CONSTRAINT:-}}
for file in $constraint; do uv_args+=(--constraint "$file"); done

if "${pip[@]}" install --quiet --disable-pip-version-check uv \
   && "$venv/bin/uv" pip install --quiet --compile-bytecode --python "$venv/bin/python" "${uv_args[@]}" -e '.[dev]'; then
  echo "installed with uv into $venv"
else
  echo "uv install failed; installing with pip (slower)" >&2
  "${pip[@]}" install --quiet --disable-pip-version-check -e '.[dev]'
fi

#!/usr/bin/env bash
# System (Debian) packages the test suite needs beyond the Python venvs:
#   chromium + fonts-liberation  headless browser for the Label Studio screenshot (tests/e2e)
#   redis-server                 queue tests
# Installs what is missing with apt-get when run as root; otherwise prints the command to run and
# exits non-zero. Quiet (no output, exit 0) when everything is already present. Used by
# `make system-deps`, which `make test` runs first.
set -euo pipefail

# binary -> Debian package providing it
declare -A NEED=(
  [/usr/bin/chromium]=chromium
  [/usr/bin/redis-server]=redis-server
)
# Packages checked by file rather than binary: fonts-liberation has no executable.
FONT=/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf

missing=()
for bin in "${!NEED[@]}"; do
  [[ -x "$bin" ]] || missing+=("${NEED[$bin]}")
done
[[ -f "$FONT" ]] || missing+=(fonts-liberation)

((${#missing[@]} == 0)) && exit 0

mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"

if [[ $(id -u) -ne 0 ]]; then
  echo "error: system packages needed by the tests are missing: ${missing[*]}" >&2
  echo "       install them as root:  $cmd" >&2
  exit 1
fi

echo "system_test_deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "system_test_deps: installed ${missing[*]}" >&2

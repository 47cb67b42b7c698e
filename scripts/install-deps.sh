#!/usr/bin/env bash
# Installs every system dependency Arbiter needs from Debian packages. Idempotent: packages that are
# already present are skipped, so a second run costs a dpkg query and nothing else.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config ccache
  libgtest-dev libgmock-dev libbenchmark-dev
  libopenmpi-dev openmpi-bin
  libprotobuf-dev protobuf-compiler
  libgrpc++-dev protobuf-compiler-grpc
  libboost-dev libcpp-httplib-dev nlohmann-json3-dev
  libpcre2-dev libsqlite3-dev libfasttext-dev
  libpq-dev postgresql  # PostgreSQL storage (--db postgres://...); the server only for the tests
  curl python3
  chromium  # tests only: the HTML report read back in a headless browser (tests/browser/)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "install-deps: all system packages present"
fi

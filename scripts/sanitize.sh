#!/usr/bin/env bash
# The CPU test suite under AddressSanitizer + UndefinedBehaviorSanitizer (not part of CI: the
# instrumented build takes ~30 minutes on 2 cores). Usage: scripts/sanitize.sh [BUILD_DIR] [ctest args...]
# The tests that launch mpirun run without leak detection: OpenMPI's plugins never free some of their
# allocations and are unloaded before the report, so their leaks cannot be told apart by name.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build-asan}
shift || true
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
# GCC 12 reports a false maybe-uninitialized inside <regex> under the sanitizers.
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DARBITER_CUDA=OFF -DARBITER_BENCH=OFF \
  -DCMAKE_CXX_FLAGS="$flags -Wno-maybe-uninitialized" -DCMAKE_EXE_LINKER_FLAGS="$flags" \
  -DCMAKE_SHARED_LINKER_FLAGS="$flags" >/dev/null
ninja -C "$build" -j"${JOBS:-2}"
export UBSAN_OPTIONS=print_stacktrace=1
mpi='EpCli|parallel_mpi_test'
cd "$build"
status=0
ASAN_OPTIONS=detect_leaks=1 ctest -j"${JOBS:-2}" --timeout 900 -E "$mpi" "$@" || status=$?
ASAN_OPTIONS=detect_leaks=0 ctest -j"${JOBS:-2}" --timeout 900 -R "$mpi" "$@" || status=$?
exit $status

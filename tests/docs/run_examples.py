#!/usr/bin/env python3
"""Runs the examples of a Markdown page as written: every code block preceded by `<!-- test: sh -->`
runs in one bash session (in block order, from the repository root), every block preceded by
`<!-- test: node -->` runs with node once the shell blocks before it have run. A marker may add
`, replace "A" "B"` (any number) to run the block with A replaced by B. Before running,
`build/arbiter` becomes the binary under test, `models/` a temporary folder and port 8080 a free
port; background jobs are ended at the end. Fails when a command fails (curl must answer 2xx).

usage: python3 tests/docs/run_examples.py PAGE.md --bin BUILD/arbiter [--node NODE --node-path DIR]
"""
import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

ap = argparse.ArgumentParser()
ap.add_argument("page")
ap.add_argument("--bin", required=True)
ap.add_argument("--node", default="node")
ap.add_argument("--node-path", default="")
args = ap.parse_args()
repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

blocks, tag = [], None
lines = open(os.path.join(repo, args.page), encoding="utf-8").read().split("\n")
i = 0
while i < len(lines):
    m = re.match(r"<!-- test: (sh|node)((?:, replace \"[^\"]*\" \"[^\"]*\")*) -->", lines[i])
    if m:
        tag, replace = m.group(1), re.findall(r'replace "([^"]*)" "([^"]*)"', m.group(2))
    elif lines[i].startswith("```") and tag:
        j = lines.index("```", i + 1)
        text = "\n".join(lines[i + 1:j])
        for a, b in replace:  # e.g. fewer generated tokens than a user would ask for, to keep the test quick
            text = text.replace(a, b)
        blocks.append((tag, text))
        tag, i = None, j
    i += 1
if not blocks:
    sys.exit(f"run_examples: no `<!-- test: ... -->` blocks in {args.page}")

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
work = tempfile.mkdtemp(prefix="arbiter-doc-examples-")


def adapt(text):
    text = text.replace("build/arbiter", os.path.abspath(args.bin))
    text = re.sub(r"(?<![\w/])models/", work + "/models/", text)
    text = text.replace("8080", str(port))
    return re.sub(r"\bcurl -s ", "curl -sf ", text)  # a 4xx/5xx answer fails the example


# Shell blocks up to each node block run first; the session stays open (servers in the background).
script = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true; wait || true' EXIT", f"cd {repo}"]
steps = []
for kind, text in blocks:
    if kind == "sh":
        script.append("echo " + shlex.quote("$ " + text.splitlines()[0][:100]) + " >&2")
        script.append(adapt(text))
    else:
        path = os.path.join(work, f"example{len(steps)}.cjs")
        open(path, "w").write(adapt(text))
        script.append("echo " + shlex.quote("$ node " + os.path.basename(path)) + " >&2")
        script.append(f"NODE_PATH={args.node_path} {args.node} {path}")
try:
    p = subprocess.run(["bash", "-c", "\n".join(script)], timeout=240)
finally:
    shutil.rmtree(work, ignore_errors=True)
if p.returncode != 0:
    sys.exit(f"run_examples: the examples of {args.page} failed (status {p.returncode})")
print(f"run_examples: {len(blocks)} examples of {args.page} ran")

#!/usr/bin/env python3
"""Every link in README.md and docs/*.md to a local file (and to a heading of a Markdown page) resolves.

usage: python3 tests/docs/check_links.py [REPO]   (exit 1 listing each broken link with its file and line)
"""
import glob
import os
import re
import sys

repo = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", ".."))
pages = [os.path.join(repo, "README.md")] + sorted(glob.glob(os.path.join(repo, "docs", "*.md")))


def prose_lines(path):
    """(line number, text) outside fenced code blocks."""
    fence = None
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        m = re.match(r"\s*(```|~~~)", line)
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
            continue
        if fence is None:
            yield n, line


def anchors(path):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen, out = {}, set()
    for _, line in prose_lines(path):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        k = seen.get(slug, 0)
        seen[slug] = k + 1
        out.add(slug if k == 0 else f"{slug}-{k}")
    # Explicit anchors: <a id="..."> / <a name="...">
    for line in open(path, encoding="utf-8"):
        out.update(re.findall(r'<a (?:id|name)="([^"]+)"', line))
    return out


broken, checked = [], 0
for page in pages:
    for n, line in prose_lines(page):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            where = f"{os.path.relpath(page, repo)}:{n}: {target}"
            if not os.path.exists(full):
                broken.append(f"{where}: no such file {os.path.relpath(full, repo)}")
            elif anchor and full.endswith(".md") and anchor not in anchors(full):
                broken.append(f"{where}: no heading #{anchor} in {os.path.relpath(full, repo)}")
if broken:
    print("broken links:\n  " + "\n  ".join(broken), file=sys.stderr)
    sys.exit(1)
print(f"check_links: {checked} local links in {len(pages)} pages resolve")

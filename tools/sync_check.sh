#!/usr/bin/env bash
# Fail if nbdev_export + nbdev_clean change the tree: the package must be exported from the notebooks as committed,
# and the notebooks must be clean. Compares the whole tree state (tracked changes and untracked files' contents)
# before and after, so it also works with uncommitted work in progress.
set -uo pipefail
bin=${1:-.venv/bin}
if ! git rev-parse --git-dir >/dev/null 2>&1; then echo "sync-check: not a git checkout, skipped"; exit 0; fi
state() {
  git status --porcelain=v1 --untracked-files=all
  { git diff --binary; git diff --cached --binary
    git ls-files --others --exclude-standard -z | xargs -0 -r sha256sum; } | sha256sum
}
before=$(state)
"$bin/nbdev_export" && "$bin/nbdev_clean" || { echo "sync-check: nbdev_export/nbdev_clean failed"; exit 1; }
if [ "$before" != "$(state)" ]; then
  echo "sync-check FAILED: nbdev_export/nbdev_clean changed the tree. Commit the notebooks, the exported package"
  echo "and the cleaned notebooks together (run 'make export'). Changed now:"
  git status --short
  exit 1
fi
echo "sync-check: notebooks and package in sync"

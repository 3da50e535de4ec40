#!/bin/sh
# A hostile build for the sandbox tests: it tries to read every path in $AGENT_LOG_DIR/targets
# (one a line) and records what it got in $AGENT_LOG_DIR/build-<runner|server>.stolen (READ path
# and the content, or DENIED path); then it does what a legitimate build does (git, sh, files in
# its worktree and in $TMPDIR) and fails if any of that fails.
where=runner
case $PWD in */integration) where=server ;; esac
out=$(mktemp)
: > "$out"
while read -r target; do
    if cat "$target" > /dev/null 2>&1; then
        { echo "READ $target"; tr '\0' '\n' < "$target"; echo; } >> "$out"
    else
        echo "DENIED $target" >> "$out"
    fi
done < "$AGENT_LOG_DIR/targets"
set -e
git rev-parse HEAD > /dev/null
git log --oneline -1 > /dev/null
echo built > build-output.txt
echo scratch > "$TMPDIR/build-scratch.txt"
grep -q scratch "$TMPDIR/build-scratch.txt"
echo "legit build ok" >> "$out"
mv "$out" "$AGENT_LOG_DIR/build-$where.stolen"

#!/bin/sh
# The scripted agent of the end-to-end tests (`--agent command`). What it does is chosen by a
# line "MODE: <mode>" in the task's description (it reads the prompt):
#   commit (default)  write notes/<task>.md and commit it with the Task-Id trailer; when the
#                     prompt says the previous patchset was rejected, add "fixed" and amend
#   fail              exit 1           fail-once   fail on the first attempt only
#   nocommit          exit 0, no commit             twocommits  make two commits
#   wait              leave a scratch file, record its pid, wait for $AGENT_LOG_DIR/release
#                     (or release-<task>)
#   wait-once         wait on the first attempt only, commit on the next
#   cost              commit, and report 25 cents through PIPELINE_COST_FILE
#   costly-fail       report 10 cents through PIPELINE_COST_FILE, then exit 1
#   sameline          wait like "wait", then write shared.txt (every task edits the same line)
#   notrailer         commit without the Task-Id trailer
#   chatty            print "line i of N" for i = 1..N (N from a "LINES: N" line, default 200)
#   chatty-wait       print the first half, wait like "wait", print the rest
#   longline          print one line of 100,000 characters
#   spoof             also put a "Task-Id:" trailer of the task named by a "SPOOF: <id>" line
#   slow              commit after a short pause (0.3 s), so that faults meet work in progress
#   interleave        print out-1, err-2, out-3, ... err-10 alternately on stdout and stderr
#   big               commit 3 MB of random bytes too (a large bundle)
#   big-wait          wait like "wait", then do as "big"
#   orphan            start a daemon (its own session) that records its pid in <task>.daemon.pid,
#                     waits like "wait" and then commits late.txt itself; wait like "wait"
#   hostile           try to read every path in $AGENT_LOG_DIR/targets (one a line), record in
#                     <task>.stolen what it got (READ path and the content, or DENIED path), and
#                     commit that record too; hostile-wait: then wait like "wait". It also
#                     tries to create each path in $AGENT_LOG_DIR/write-targets, if there is
#                     one, and records WROTE path or UNWRITABLE path
# It logs each prompt and environment under $AGENT_LOG_DIR.
set -eu
log=${AGENT_LOG_DIR:?AGENT_LOG_DIR must be set}
mkdir -p "$log"
cp "$PIPELINE_PROMPT_FILE" "$log/$PIPELINE_RUN_ID.prompt"
env | grep '^PIPELINE_' | sort > "$log/$PIPELINE_RUN_ID.env"
env | sort > "$log/$PIPELINE_RUN_ID.fullenv"
pwd > "$log/$PIPELINE_RUN_ID.cwd"
n=$(cat "$log/$PIPELINE_TASK_ID.attempts" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$log/$PIPELINE_TASK_ID.attempts"
mode=$(sed -n 's/^MODE: *//p' "$PIPELINE_PROMPT_FILE" | head -n 1)
echo "agent: task $PIPELINE_TASK_ID attempt $n mode ${mode:-commit}"

wait_for_release() {
    echo $$ > "$log/$PIPELINE_TASK_ID.pid"
    echo scratch > scratch.txt
    i=0
    while [ ! -e "$log/release" ] && [ ! -e "$log/release-$PIPELINE_TASK_ID" ] && [ $i -lt 1200 ]; do
        sleep 0.05; i=$((i + 1))
    done
    rm -f scratch.txt
}

lines=$(sed -n 's/^LINES: *//p' "$PIPELINE_PROMPT_FILE" | head -n 1)
lines=${lines:-200}
chatter() { i=$1; while [ "$i" -le "$2" ]; do echo "line $i of $lines"; i=$((i + 1)); done; }

case "$mode" in
    chatty) chatter 1 "$lines" ;;
    chatty-wait) half=$((lines / 2)); chatter 1 "$half"; wait_for_release; chatter $((half + 1)) "$lines" ;;
    longline) head -c 100000 /dev/zero | tr '\0' x; echo ;;
    interleave) i=1; while [ $i -le 10 ]; do
            if [ $((i % 2)) -eq 1 ]; then echo "out-$i"; else echo "err-$i" >&2; fi
            i=$((i + 1)); sleep 0.01; done ;;
    fail) echo "agent: deliberate failure" >&2; exit 1 ;;
    fail-once) if [ "$n" -eq 1 ]; then echo "agent: first attempt fails" >&2; exit 1; fi ;;
    nocommit) echo "agent: did nothing"; exit 0 ;;
    slow) sleep 0.3 ;;
    wait) wait_for_release ;;
    big) mkdir -p notes; head -c 3000000 /dev/urandom > "notes/$PIPELINE_TASK_ID.bin" ;;
    big-wait) wait_for_release; mkdir -p notes; head -c 3000000 /dev/urandom > "notes/$PIPELINE_TASK_ID.bin" ;;
    wait-once) if [ "$n" -eq 1 ]; then wait_for_release; fi ;;
    orphan)
        LOG=$log TASK=$PIPELINE_TASK_ID setsid sh -c '
            echo $$ > "$LOG/$TASK.daemon.pid"
            i=0
            while [ ! -e "$LOG/release" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
            echo late > late.txt
            git -c user.name=daemon -c user.email=d@example.invalid add late.txt
            git -c user.name=daemon -c user.email=d@example.invalid commit -q -m late
        ' < /dev/null > /dev/null 2>&1 &
        wait_for_release ;;
    hostile|hostile-wait)
        stolen=$(mktemp)
        : > "$stolen"
        while read -r target; do
            if cat "$target" > /dev/null 2>&1; then
                { echo "READ $target"; tr '\0' '\n' < "$target"; echo; } >> "$stolen"
            else
                echo "DENIED $target" >> "$stolen"
            fi
        done < "$log/targets"
        # Paths it tries to create (one a line, optional).
        if [ -e "$log/write-targets" ]; then
            while read -r target; do
                if (: > "$target") 2>/dev/null; then
                    echo "WROTE $target" >> "$stolen"
                else
                    echo "UNWRITABLE $target" >> "$stolen"
                fi
            done < "$log/write-targets"
        fi
        mkdir -p notes
        cp "$stolen" "notes/$PIPELINE_TASK_ID.stolen"
        mv "$stolen" "$log/$PIPELINE_TASK_ID.stolen"
        if [ "$mode" = hostile-wait ]; then wait_for_release; fi ;;
    cost) echo 25 > "$PIPELINE_COST_FILE" ;;
    costly-fail) echo 10 > "$PIPELINE_COST_FILE"; echo "agent: failed at a cost" >&2; exit 1 ;;
    sameline) if [ "$n" -eq 1 ]; then wait_for_release; fi; echo "$PIPELINE_TASK_ID attempt $n" > shared.txt ;;
esac

git="git -c user.name=agent -c user.email=agent@example.invalid"
mkdir -p notes
echo "task $PIPELINE_TASK_ID attempt $n" > "notes/$PIPELINE_TASK_ID.md"
if grep -q "previous patchset was rejected" "$PIPELINE_PROMPT_FILE"; then
    echo fixed >> "notes/$PIPELINE_TASK_ID.md"
fi
$git add notes
[ -e shared.txt ] && $git add shared.txt
if [ "$(git rev-parse HEAD)" != "$PIPELINE_BASE_COMMIT" ]; then
    $git commit --quiet --amend --no-edit
elif [ "$mode" = notrailer ]; then
    $git commit --quiet -m "notes for $PIPELINE_TASK_ID, no trailer"
elif [ "$mode" = spoof ]; then
    other=$(sed -n 's/^SPOOF: *//p' "$PIPELINE_PROMPT_FILE" | head -n 1)
    $git commit --quiet -m "notes for $PIPELINE_TASK_ID" -m "Task-Id: $PIPELINE_TASK_ID
Task-Id: $other"
else
    $git commit --quiet -m "notes for $PIPELINE_TASK_ID" -m "Task-Id: $PIPELINE_TASK_ID"
fi
if [ "$mode" = twocommits ]; then
    echo more >> "notes/$PIPELINE_TASK_ID.md"
    $git commit --quiet -am "a second commit"
fi
echo "agent: committed"

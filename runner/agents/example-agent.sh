#!/bin/sh
# An example agent for `--agent command`: it "implements" a task by writing the task's
# description into notes/<task id>.md and committing it with the Task-Id trailer (amending the
# previous patchset when there is one). Replace it with a real coding agent, e.g.
#   --agent command --agent-cmd 'my-agent --prompt "$PIPELINE_PROMPT_FILE"'
set -eu
mkdir -p notes
# The description is the prompt's "### Description" section.
awk '/^### Description$/ {on=1; next} /^#/ {on=0} on' "$PIPELINE_PROMPT_FILE" > "notes/$PIPELINE_TASK_ID.md"
[ -s "notes/$PIPELINE_TASK_ID.md" ] || echo "$PIPELINE_TASK_ID" > "notes/$PIPELINE_TASK_ID.md"
git add "notes/$PIPELINE_TASK_ID.md"
ident="-c user.name=example-agent -c user.email=agent@example.invalid"
if [ "$(git rev-parse HEAD)" != "$PIPELINE_BASE_COMMIT" ]; then
    git $ident commit --quiet --amend --no-edit --allow-empty
else
    git $ident commit --quiet -m "notes: $PIPELINE_TASK_ID" -m "Task-Id: $PIPELINE_TASK_ID"
fi
echo "committed notes/$PIPELINE_TASK_ID.md"

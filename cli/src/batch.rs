//! `task add --from-file`: tasks from a JSON-lines file, created in batches (each all or none,
//! in one call), their IDs printed one a line, in order, as each batch is created. The file is
//! read as it goes, so memory stays bounded however long it is.

use std::io::{BufRead, BufReader, Read, Write};

use serde::Deserialize;

use crate::client::{Client, Failure};
use crate::model::NewTask;

/// Tasks per call, and the description bytes past which a batch goes early (the server takes
/// messages of up to 4 MiB).
const BATCH_TASKS: usize = 1000;
const BATCH_BYTES: usize = 2 << 20;

/// One line of the file: the fields of `task add`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    title: String,
    #[serde(default)]
    description: String,
    namespace: Option<String>,
    priority: Option<u32>,
    parent: Option<String>,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    requires: Vec<String>,
    max_cost: Option<f64>,
    id: Option<String>,
    #[serde(default)]
    approval: bool,
}

impl Line {
    fn into_task(self) -> Result<NewTask, String> {
        Ok(NewTask {
            id: self.id,
            title: self.title,
            description: self.description,
            namespace: self.namespace,
            priority: self.priority.unwrap_or(2),
            parent: self.parent,
            depends_on: self.depends_on,
            requires: self.requires,
            max_cost_cents: self.max_cost,
            approval: self.approval,
        })
    }
}

/// Parses one line of the file; `None` for a blank one.
fn parse(text: &str) -> Result<Option<NewTask>, String> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let line: Line = serde_json::from_str(text).map_err(|e| {
        // serde counts lines within the one it was given: say the column only.
        let message = e.to_string();
        let what = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(what, _)| what);
        format!("{what} (column {})", e.column())
    })?;
    line.into_task().map(Some)
}

/// Creates the tasks of `path` (`-`: standard input), printing each ID as its batch is created.
pub async fn create_from_file(
    client: &mut Client,
    path: &str,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let input: Box<dyn Read> = if path == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(path)
                .map_err(|e| Failure::usage(format!("cannot read --from-file {path}: {e}")))?,
        )
    };
    let mut created = 0usize;
    let mut batch: Vec<NewTask> = Vec::new();
    let (mut bytes, mut first_line) = (0usize, 1usize);
    let mut lines = BufReader::new(input).lines();
    let mut number = 0usize;
    loop {
        let next = lines.next();
        let end = next.is_none();
        if let Some(text) = next {
            number += 1;
            let text = text.map_err(|e| {
                Failure::usage(format!(
                    "{path} line {number}: cannot read it: {e}{}",
                    so_far(created)
                ))
            })?;
            match parse(&text) {
                Ok(Some(task)) => {
                    if batch.is_empty() {
                        first_line = number;
                    }
                    bytes += task.description.len() + task.title.len();
                    batch.push(task);
                }
                Ok(None) => {}
                Err(why) => {
                    return Err(Failure::usage(format!(
                        "{path} line {number}: {why}{}",
                        so_far(created)
                    )));
                }
            }
        }
        if !batch.is_empty() && (end || batch.len() >= BATCH_TASKS || bytes >= BATCH_BYTES) {
            let tasks = client
                .create_tasks(std::mem::take(&mut batch))
                .await
                .map_err(|f| Failure {
                    message: format!(
                        "{path}, the batch from line {first_line} to {number}: {}{}",
                        f.message,
                        so_far(created)
                    ),
                    exit_code: f.exit_code,
                })?;
            for t in &tasks {
                writeln!(out, "{}", t.id).map_err(|e| Failure::internal(e.to_string()))?;
            }
            created += tasks.len();
            bytes = 0;
        }
        if end {
            return Ok(());
        }
    }
}

/// What was created before a failure, for its message.
fn so_far(created: usize) -> String {
    match created {
        0 => " (no task was created)".to_owned(),
        n => format!(" (the {n} tasks before it were created)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_tasks_and_mistakes_are_named() {
        let t = parse(r#"{"title": "a", "depends_on": ["t-1"], "priority": 0}"#)
            .expect("parsed")
            .expect("a task");
        assert_eq!((t.title.as_str(), t.priority), ("a", 0));
        assert_eq!(t.depends_on, ["t-1"]);
        let gpu = parse(r#"{"title": "g", "requires": ["gpu", "os=linux"]}"#)
            .expect("parsed")
            .expect("a task");
        assert_eq!(gpu.requires, ["gpu", "os=linux"]);
        assert_eq!(parse("   ").expect("blank"), None);
        let typo = parse(r#"{"title": "a", "dependson": ["t-1"]}"#).expect_err("typo");
        assert!(typo.contains("unknown field `dependson`"), "{typo}");
        let untitled = parse(r#"{"description": "x"}"#).expect_err("no title");
        assert!(untitled.contains("missing field `title`"), "{untitled}");
        assert!(parse("{not json").is_err());
    }
}

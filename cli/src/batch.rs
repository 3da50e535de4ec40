//! `task add --from-file`: tasks from a JSON-lines file, created in batches (each all or none,
//! in one call), their IDs printed one a line, in order, as each batch is created. The file is
//! read as it goes, and each line within a cap, so memory stays bounded however long it (or a
//! line of it) is. A batch is bounded by its tasks' encoded bytes as well as by their count, so
//! no request passes the server's message limit; a line too large for any request is refused
//! before anything more is sent, naming it and its size.

use std::io::{BufRead, BufReader, Read, Write};

use serde::Deserialize;

use crate::client::Client;
use crate::failure::Failure;
use crate::model::NewTask;

/// Tasks per call.
const BATCH_TASKS: usize = 1000;
/// The bytes of a call's tasks, encoded: the server takes messages of up to 4 MiB, and a
/// batch stays well under it whatever its lines hold (long lists of dependencies or labels
/// count, not only the descriptions). A task larger than this alone is refused before sending.
const BATCH_BYTES: usize = 3 << 20;
/// The longest line read: a task of [`BATCH_BYTES`] written with every character escaped
/// (`\u0001`) takes about six times that. A longer line is refused without being read into
/// memory.
const MAX_LINE_BYTES: usize = 6 * BATCH_BYTES;

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
    #[serde(default)]
    epic: bool,
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
            epic: self.epic,
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
    let mut reader = BufReader::new(input);
    let mut batch = Batch {
        path,
        tasks: Vec::new(),
        bytes: 0,
        first_line: 1,
        last_line: 0,
        created: 0,
    };
    let mut raw = Vec::new();
    let mut number = 0usize;
    loop {
        let len = read_line_capped(&mut reader, &mut raw, MAX_LINE_BYTES).map_err(|e| {
            Failure::usage(format!(
                "{path} line {}: cannot read it: {e}{}",
                number + 1,
                so_far(batch.created)
            ))
        })?;
        let Some(len) = len else {
            return batch.send(client, out).await;
        };
        number += 1;
        let refuse = |why: String, created: usize| {
            Failure::usage(format!("{path} line {number}: {why}{}", so_far(created)))
        };
        if len > MAX_LINE_BYTES {
            return Err(refuse(
                format!(
                    "the line is {len} bytes long, more than a task can be ({} MiB at most; a \
                     description is at most 1 MiB)",
                    MAX_LINE_BYTES >> 20
                ),
                batch.created,
            ));
        }
        let text = std::str::from_utf8(&raw).map_err(|_| {
            refuse(
                "cannot read it: it is not valid UTF-8".to_owned(),
                batch.created,
            )
        })?;
        let task = match parse(text) {
            Ok(Some(task)) => task,
            Ok(None) => continue,
            Err(why) => return Err(refuse(why, batch.created)),
        };
        let size = crate::wire::create_request_len(&task);
        if size > BATCH_BYTES {
            return Err(refuse(
                format!(
                    "the task is {size} bytes once encoded, more than one request may carry \
                     ({} MiB; a description is at most 1 MiB)",
                    BATCH_BYTES >> 20
                ),
                batch.created,
            ));
        }
        // Sent before it would grow past the limits, so no request is ever refused for its
        // size.
        if batch.bytes + size > BATCH_BYTES {
            batch.send(client, out).await?;
        }
        if batch.tasks.is_empty() {
            batch.first_line = number;
        }
        batch.tasks.push(task);
        batch.bytes += size;
        batch.last_line = number;
        if batch.tasks.len() >= BATCH_TASKS {
            batch.send(client, out).await?;
        }
    }
}

/// The tasks read but not sent yet, and where they came from.
struct Batch<'a> {
    path: &'a str,
    tasks: Vec<NewTask>,
    /// Their size in the request, encoded.
    bytes: usize,
    first_line: usize,
    last_line: usize,
    /// Tasks created so far.
    created: usize,
}

impl Batch<'_> {
    /// Creates the batch's tasks in one call (all or none), printing their IDs.
    async fn send(&mut self, client: &mut Client, out: &mut impl Write) -> Result<(), Failure> {
        if self.tasks.is_empty() {
            return Ok(());
        }
        let tasks = client
            .create_tasks(std::mem::take(&mut self.tasks))
            .await
            .map_err(|f| Failure {
                message: format!(
                    "{}, the batch from line {} to {}: {}{}",
                    self.path,
                    self.first_line,
                    self.last_line,
                    f.message,
                    so_far(self.created)
                ),
                exit_code: f.exit_code,
            })?;
        for t in &tasks {
            writeln!(out, "{}", t.id).map_err(|e| Failure::internal(e.to_string()))?;
        }
        self.created += tasks.len();
        self.bytes = 0;
        Ok(())
    }
}

/// Reads the next line into `buf` (without its line ending), keeping at most `cap` bytes of
/// it, so a huge line costs no memory; returns the whole line's length, `None` at the end.
fn read_line_capped(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<Option<usize>> {
    buf.clear();
    let (mut len, mut any) = (0usize, false);
    loop {
        let chunk = match reader.fill_buf() {
            Ok(chunk) => chunk,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            break;
        }
        any = true;
        let newline = chunk.iter().position(|&b| b == b'\n');
        let take = newline.unwrap_or(chunk.len());
        let keep = take.min(cap.saturating_sub(buf.len()));
        buf.extend_from_slice(&chunk[..keep]);
        len += take;
        reader.consume(take + usize::from(newline.is_some()));
        if newline.is_some() {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if buf.last() == Some(&b'\r') && len <= cap {
        buf.pop();
        len -= 1;
    }
    Ok(Some(len))
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

    #[test]
    fn lines_are_read_within_a_cap_and_their_length_counted() {
        let text = format!("a\r\nbb\n\n{}\nlast", "x".repeat(100));
        let mut reader = std::io::BufReader::with_capacity(7, text.as_bytes());
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        while let Some(len) = read_line_capped(&mut reader, &mut buf, 10).expect("read") {
            lines.push((len, String::from_utf8(buf.clone()).expect("utf-8")));
        }
        assert_eq!(
            lines,
            [
                (1, "a".to_owned()),
                (2, "bb".to_owned()),
                (0, String::new()),
                (100, "x".repeat(10)),
                (4, "last".to_owned()),
            ]
        );
    }

    #[test]
    fn a_task_at_the_field_limits_counts_what_it_holds() {
        let task = parse(&format!(
            r#"{{"title": "{}", "requires": [{}], "depends_on": [{}]}}"#,
            "t".repeat(1000),
            vec![format!("\"{}\"", "k".repeat(128)); 16].join(", "),
            vec![format!("\"{}\"", "d".repeat(64)); 20].join(", "),
        ))
        .expect("parsed")
        .expect("a task");
        let size = crate::wire::create_request_len(&task);
        assert!(size > 1000 + 16 * 128 + 20 * 64, "{size}");
        // A thousand of them would pass the server's 4 MiB: a batch holds fewer.
        assert!(1000 * size > 4 << 20);
        assert!(BATCH_BYTES / size < 1000);
    }
}

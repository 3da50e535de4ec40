//! Memory and limits: what one client can make the server hold, and requests that must fit
//! the server's message limit.

use pipeline_tests::{Server, TestRepo};

/// `task add --from-file` batches by the bytes a request carries, not by count only: a
/// thousand lines at the fields' limits (long titles, sixteen long labels, many dependencies)
/// make more than the server's 4 MiB and are sent in several requests, all created. A line
/// too large for any request is refused before anything is sent, exit 2, naming the line
/// and its size (it was exit 5, "cannot reach the server", after 100 MB were sent).
#[test]
fn tasks_from_a_file_are_batched_by_bytes_and_a_huge_line_is_named() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let dep = "d".repeat(64);
    server.add(&["--title", "the dependency", "--id", &dep]);
    let labels: Vec<String> = (0..16)
        .map(|i| format!("\"k{i}={}\"", "v".repeat(120)))
        .collect();
    let deps = vec![format!("\"{dep}\""); 16].join(", ");
    let mut lines = String::new();
    for i in 0..1000 {
        lines.push_str(&format!(
            "{{\"title\": \"{i:04} {}\", \"description\": \"{}\", \"requires\": [{}], \
             \"depends_on\": [{deps}]}}\n",
            "t".repeat(1000),
            "d".repeat(1000),
            labels.join(", "),
        ));
    }
    assert!(lines.len() > 4_400_000, "{} bytes", lines.len());
    let file = repo.dir.path().join("tasks.jsonl");
    std::fs::write(&file, &lines).expect("write");
    let out = server
        .ctl(&["task", "add", "--from-file", file.to_str().expect("utf-8")])
        .ok();
    let ids: Vec<&str> = out.lines().collect();
    assert_eq!(ids.len(), 1000, "every line created");
    assert_eq!((ids[0], ids[999]), ("t-1", "t-1000"));
    let last = server.show("t-1000");
    assert!(
        last["title"]
            .as_str()
            .is_some_and(|t| t.starts_with("0999 ")),
        "in order: {}",
        last["title"]
    );
    assert_eq!(last["depends_on"], serde_json::json!([dep]));

    let huge = repo.dir.path().join("huge.jsonl");
    let big = format!(
        "{{\"title\": \"huge\", \"description\": \"{}\"}}",
        "x".repeat(100_000_000)
    );
    std::fs::write(&huge, format!("{{\"title\": \"small\"}}\n{big}\n")).expect("write");
    let line = server
        .ctl(&["task", "add", "--from-file", huge.to_str().expect("utf-8")])
        .refused(2, "line 2");
    assert!(line.contains(&format!("{} bytes", big.len())), "{line}");
    assert!(line.contains("no task was created"), "{line}");
    let listed = server.ctl(&["task", "list", "--json"]).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1001), "nothing more");
}

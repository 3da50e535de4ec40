//! Commit bundles from runners: their header read without git (the signature, the
//! prerequisites, the refs), so that a bundle that is not what its sender announced is refused
//! before git is asked to unbundle it.

use std::path::Path;

use pipeline_core::ids::CommitId;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// What a bundle's header says: the commits it needs and the commits of its refs.
#[derive(Debug, Default)]
pub struct BundleHeader {
    pub prerequisites: Vec<CommitId>,
    pub refs: Vec<CommitId>,
}

/// Reads a bundle's header (v2 or v3) without git: the signature line, capabilities,
/// prerequisites (`-<id> …`) and refs (`<id> <name>`), up to the blank line before the pack.
pub async fn read_header(path: &Path) -> std::result::Result<BundleHeader, String> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| e.to_string())?;
    // The header is text; a real one is far smaller than this.
    let mut reader = BufReader::new(file).take(1 << 20);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    if !matches!(line.as_str(), "# v2 git bundle\n" | "# v3 git bundle\n") {
        return Err("it does not start with a git bundle signature".to_owned());
    }
    let mut header = BundleHeader::default();
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("its header does not end".to_owned());
        }
        let l = line.trim_end_matches('\n');
        if l.is_empty() {
            return Ok(header);
        }
        if l.starts_with('@') {
            continue;
        }
        if let Some(rest) = l.strip_prefix('-') {
            let id = rest.split(' ').next().unwrap_or_default();
            let id = CommitId::parse(id).map_err(|_| format!("bad prerequisite line {l:?}"))?;
            header.prerequisites.push(id);
        } else {
            let id = l.split(' ').next().unwrap_or_default();
            let id = CommitId::parse(id).map_err(|_| format!("bad ref line {l:?}"))?;
            header.refs.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=T", "-c", "user.email=t@example.invalid"])
            .args(args)
            .output()
            .expect("git");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn commit(dir: &Path, file: &str, message: &str) -> String {
        std::fs::write(dir.join(file), file).expect("write");
        git(dir, &["add", file]);
        git(dir, &["commit", "-q", "-m", message]);
        git(dir, &["rev-parse", "HEAD"])
    }

    #[tokio::test]
    async fn bundle_headers_are_read_without_git() {
        let dir = tempfile::tempdir().expect("temp");
        let d = dir.path();
        git(d, &["init", "-q", "-b", "main"]);
        let root = commit(d, "a", "root");
        let one = commit(d, "b", "one");
        let file = d.join("b.bundle");
        git(
            d,
            &[
                "bundle",
                "create",
                "-q",
                file.to_str().expect("utf-8"),
                "main",
                &format!("^{root}"),
            ],
        );
        let header = read_header(&file).await.expect("header");
        assert_eq!(header.prerequisites, [CommitId::parse(&root).expect("id")]);
        assert_eq!(header.refs, [CommitId::parse(&one).expect("id")]);
        std::fs::write(&file, "not a bundle\n").expect("write");
        assert!(read_header(&file).await.is_err());
        std::fs::write(&file, "# v2 git bundle\n").expect("write");
        assert!(read_header(&file).await.is_err());
    }
}

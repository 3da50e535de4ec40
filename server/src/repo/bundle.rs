//! Commit bundles from runners: their header read without git (the signature, the
//! prerequisites, the refs, where the pack starts), so that a bundle that is not what its
//! sender announced is refused before git is asked to index its pack; and the rules a received
//! tree's new paths must keep so that any runner can check it out ([`check_paths`]).

use std::path::Path;

use pipeline_core::ids::CommitId;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// What a bundle's header says: the commits it needs and the commits of its refs.
#[derive(Debug, Default)]
pub struct BundleHeader {
    pub prerequisites: Vec<CommitId>,
    pub refs: Vec<CommitId>,
    /// Where the pack starts: the byte after the header's blank line.
    pub pack_offset: u64,
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
    let mut offset = reader
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    if !matches!(line.as_str(), "# v2 git bundle\n" | "# v3 git bundle\n") {
        return Err("it does not start with a git bundle signature".to_owned());
    }
    let mut header = BundleHeader::default();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("its header does not end".to_owned());
        }
        offset += n;
        let l = line.trim_end_matches('\n');
        if l.is_empty() {
            header.pack_offset = offset as u64;
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

/// The longest path a checkout can write on Linux (`PATH_MAX` less its NUL): git writes the
/// path relative to the worktree, in one system call.
pub const MAX_PATH_BYTES: usize = 4095;

/// The longest name of one file or directory (`NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;

/// Checks the paths a received commit adds or changes ([`pipeline_core::git::Git::new_paths`]):
/// none deeper than git checks out by default, longer than a checkout can write, or with a
/// name longer than a file system allows. Such a tree could be stored, but no runner could
/// check the base out once it landed. Says what is wrong with the first bad path.
pub fn check_paths(paths: &[Vec<u8>]) -> std::result::Result<(), String> {
    use pipeline_core::git::MAX_TREE_DEPTH;
    let shown = |p: &[u8]| {
        let text = String::from_utf8_lossy(p);
        let mut short: String = text.chars().take(60).collect();
        if short.len() < text.len() {
            short.push('…');
        }
        pipeline_core::ids::quote_for_message(&short)
    };
    for path in paths {
        let depth = path.split(|b| *b == b'/').count();
        if depth > MAX_TREE_DEPTH {
            return Err(format!(
                "the path {} is {depth} levels deep; git checks out at most {MAX_TREE_DEPTH} \
                 (core.maxTreeDepth)",
                shown(path)
            ));
        }
        if path.len() > MAX_PATH_BYTES {
            return Err(format!(
                "the path {} is {} bytes long; a checkout can write at most {MAX_PATH_BYTES}",
                shown(path),
                path.len()
            ));
        }
        if let Some(name) = path
            .split(|b| *b == b'/')
            .find(|n| n.len() > MAX_NAME_BYTES)
        {
            return Err(format!(
                "the name {} is {} bytes long; a file system takes at most {MAX_NAME_BYTES}",
                shown(name),
                name.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_core::testgit::git;

    fn commit(dir: &Path, file: &str, message: &str) -> String {
        pipeline_core::testgit::commit(dir, file, message).to_string()
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
        let bytes = std::fs::read(&file).expect("read");
        let at = usize::try_from(header.pack_offset).expect("offset");
        assert_eq!(&bytes[at..at + 4], b"PACK", "the pack starts there");
        std::fs::write(&file, "not a bundle\n").expect("write");
        assert!(read_header(&file).await.is_err());
        std::fs::write(&file, "# v2 git bundle\n").expect("write");
        assert!(read_header(&file).await.is_err());
    }

    #[test]
    fn new_paths_must_be_checked_out_anywhere() {
        let deep = |n: usize| vec!["a"; n].join("/").into_bytes();
        assert_eq!(check_paths(&[b"src/main.rs".to_vec(), deep(2048)]), Ok(()));
        let err = check_paths(&[deep(2049)]).expect_err("too deep");
        assert!(err.contains("2049 levels deep"), "{err}");
        let long = [b'x'; 200];
        let mut path = Vec::new();
        for _ in 0..21 {
            path.extend_from_slice(&long);
            path.push(b'/');
        }
        path.push(b'f');
        let err = check_paths(&[path]).expect_err("too long");
        assert!(err.contains("4222 bytes long"), "{err}");
        let err = check_paths(&[vec![b'n'; 256]]).expect_err("a long name");
        assert!(err.contains("the name"), "{err}");
        assert!(!err.contains('\n'));
    }
}

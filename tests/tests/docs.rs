//! The documents a user needs in the repository are true: the reference is the contract word
//! for word, the licenses are the ones the crates declare, and the TLS recipe of `docs/tls.md`,
//! run as written, makes certificates the server serves and its runners and `pipelinectl`
//! trust.

use std::path::{Path, PathBuf};
use std::process::Command;

use pipeline_tests::{Runner, Server, TestRepo, listed, run, scripted_agent, wait_connected};

/// The workspace's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Where `docs/reference.md`'s copy of the contract starts.
const CONTRACT_MARKER: &str = "<!-- CONTRACT.md, word for word from here to the end: tests/tests/docs.rs compares them. -->\n\n";

/// The shared contract: `PIPELINE_CONTRACT`, or `shared/CONTRACT.md` in a folder above the
/// checkout (the project's layout), if there is one.
fn shared_contract() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PIPELINE_CONTRACT") {
        return Some(PathBuf::from(path));
    }
    root()
        .ancestors()
        .skip(1)
        .map(|dir| dir.join("shared/CONTRACT.md"))
        .find(|path| path.is_file())
}

#[test]
fn the_reference_is_the_contract_word_for_word() {
    let reference = read(&root().join("docs/reference.md"));
    let (preamble, copy) = reference
        .split_once(CONTRACT_MARKER)
        .expect("docs/reference.md marks where the contract starts");
    assert!(
        preamble.contains("which stays the") && preamble.contains("source of what must not change"),
        "the reference says where what must not change is decided: {preamble}"
    );
    assert!(copy.starts_with("# The contract\n"), "{copy:.80}");
    let Some(path) = shared_contract() else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "the_reference_is_the_contract_word_for_word: no shared CONTRACT.md above the \
             checkout (set PIPELINE_CONTRACT): compared nothing"
        );
        return;
    };
    let contract = read(&path);
    if copy != contract {
        let line = copy
            .lines()
            .zip(contract.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "the end".to_owned(), |i| format!("line {}", i + 1));
        panic!(
            "docs/reference.md is not in step with {} (first difference at {line} of the \
             contract): copy the contract below the marker again",
            path.display()
        );
    }
}

#[test]
fn the_licenses_the_crates_declare_are_in_the_repository() {
    let manifest = read(&root().join("Cargo.toml"));
    assert!(
        manifest.contains("license = \"MIT OR Apache-2.0\""),
        "the workspace declares MIT OR Apache-2.0"
    );
    let mit = read(&root().join("LICENSE-MIT"));
    assert!(mit.starts_with("MIT License\n\nCopyright (c) the pipeline authors\n"));
    assert!(mit.contains("Permission is hereby granted, free of charge"));
    let apache = read(&root().join("LICENSE-APACHE"));
    assert!(apache.contains("Apache License") && apache.contains("Version 2.0, January 2004"));
    assert!(apache.contains("END OF TERMS AND CONDITIONS"));
    let readme = read(&root().join("README.md"));
    assert!(
        readme.contains("[LICENSE-APACHE](LICENSE-APACHE)")
            && readme.contains("[LICENSE-MIT](LICENSE-MIT)"),
        "the README says how the code is licensed"
    );
}

/// The shell block of `docs/tls.md` that follows the line saying this test runs it.
fn tls_recipe() -> String {
    let doc = read(&root().join("docs/tls.md"));
    let after = doc
        .split_once("<!-- tests/tests/docs.rs runs this block")
        .expect("docs/tls.md marks its recipe")
        .1;
    let block = after
        .split_once("```sh\n")
        .expect("a shell block after the mark")
        .1;
    block
        .split_once("```")
        .expect("the block ends")
        .0
        .to_owned()
}

#[test]
fn the_tls_recipe_makes_certificates_the_server_serves_and_clients_trust() {
    let repo = TestRepo::new();
    let dir = repo.dir.path().join("certs");
    std::fs::create_dir(&dir).expect("mkdir");
    // As written, in an empty directory.
    let out = run(
        pipeline_tests::isolate(&mut Command::new("sh"), &repo.home())
            .args(["-e", "-c", &tls_recipe()])
            .current_dir(&dir),
    );
    assert!(
        out.status.success(),
        "the recipe failed: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("server.pem: OK"), "{}", out.stdout);
    assert!(
        out.stdout.contains("DNS:coordinator.example.com") && out.stdout.contains("127.0.0.1"),
        "{}",
        out.stdout
    );
    let file = |name: &str| dir.join(name).to_str().expect("utf-8").to_owned();
    let (ca, cert, key) = (file("ca.pem"), file("server.pem"), file("server.key"));
    // The server as the recipe runs it (on every address, which TLS allows).
    let server = Server::start(
        &repo,
        &[
            "--listen",
            "0.0.0.0:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    let port = server.addr.rsplit(':').next().expect("port").to_owned();
    let token = repo.admin_token();
    // pipelinectl trusts it with --tls-ca, by each name the certificate has here...
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{port}");
        let status = pipeline_tests::ctl(
            &url,
            &["--tls-ca", &ca, "--token", &token, "status", "--json"],
        )
        .json();
        assert_eq!(status["runners"], 0, "{status}");
        // ...and not without it.
        let line = pipeline_tests::ctl(&url, &["--token", &token, "status"])
            .refused(5, "cannot reach the pipeline server");
        assert!(
            line.contains("UnknownIssuer") || line.contains("certificate"),
            "{line}"
        );
    }
    // A runner trusts it the same way, and registers over TLS.
    let mut args = scripted_agent();
    args.extend(["--no-verify".to_owned(), "--tls-ca".to_owned(), ca.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let runner = Runner::spawn(&repo, &format!("https://localhost:{port}"), "tls", &args);
    let url = format!("https://localhost:{port}");
    wait_connected(&runner.proc, "tls", || {
        listed(
            pipeline_tests::ctl(
                &url,
                &["--tls-ca", &ca, "--token", &token, "runners", "--json"],
            )
            .json(),
        )
    });
    let status = pipeline_tests::ctl(
        &url,
        &["--tls-ca", &ca, "--token", &token, "status", "--json"],
    )
    .json();
    assert_eq!(status["runners"], 1, "{status}");
}

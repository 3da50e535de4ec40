//! The operator's kit end to end, through the real binaries: durations and sizes with units,
//! shell completions and man pages, a runner that takes one task and exits (`--once`), and a
//! runner stopped the way its systemd unit stops it.

use pipeline_proto::v1 as pb;
use pipeline_tests::{Runner, Server, TestRepo, agent_args, as_strs, bin, fake_runner};

#[test]
fn durations_and_sizes_take_units_end_to_end() {
    let repo = TestRepo::new();
    let server = Server::start(
        &repo,
        &[
            "--lease-ttl",
            "2m",
            "--max-bundle-bytes",
            "1KiB",
            "--log-cap-bytes",
            "1MiB",
            "--fetch-base-timeout",
            "10m",
            "--handshake-timeout",
            "10s",
            "--backoff-base",
            "1s",
        ],
    );
    let mut fake = fake_runner(&repo, &server);
    assert_eq!(fake.lease_ttl_ms, 120_000, "--lease-ttl 2m is two minutes");
    server.add(&["--title", "t"]);
    let lease = fake.next_assignment().lease.expect("lease");
    let err = fake
        .complete(
            lease,
            pb::LeaseOutcome::Verified,
            Some("0".repeat(40)),
            vec![b'x'; 1500],
        )
        .expect_err("refused");
    assert!(
        err.message().contains("over the 1024-byte limit"),
        "--max-bundle-bytes 1KiB is 1,024 bytes: {}",
        err.message()
    );

    // A real runner with units on its durations works a task through.
    let repo = TestRepo::new();
    let server = Server::start(&repo, &["--lease-ttl", "30s"]);
    let args = agent_args(&["--no-verify", "--timeout", "30m", "--drain-timeout", "1m"]);
    let _runner = Runner::start(&repo, &server, "units", &as_strs(&args));
    let id = server.add(&["--title", "with units"]);
    server.wait_status(&id, "done");

    // A duration that is not a whole number of seconds is refused in one line, exit 2.
    let out = pipeline_tests::run(&mut Server::command(&repo, &["--lease-ttl", "1500ms"]));
    assert_eq!(out.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("not a whole number of seconds"),
        "{}",
        out.stderr
    );
}

/// Runs `script` in `bash -c` and returns its stdout.
fn bash(script: &str) -> String {
    pipeline_tests::run(std::process::Command::new("bash").args(["-c", script])).ok()
}

/// Whether `program` is on `PATH`.
fn have(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_bash_completion_loads_and_completes_subcommands_and_flags() {
    let ctl = bin("pipelinectl");
    // COMP_* as bash sets them for `pipelinectl ta<TAB>`, `… task a<TAB>`, `… task add --pri<TAB>`.
    let script = format!(
        r#"set -e
source <({ctl} completions bash)
complete -p pipelinectl
COMP_WORDS=(pipelinectl ta); COMP_CWORD=1
_pipelinectl pipelinectl ta pipelinectl
echo "1:${{COMPREPLY[*]}}"
COMP_WORDS=(pipelinectl task a); COMP_CWORD=2
_pipelinectl pipelinectl a task
echo "2:${{COMPREPLY[*]}}"
COMP_WORDS=(pipelinectl task add --pri); COMP_CWORD=3
_pipelinectl pipelinectl --pri add
echo "3:${{COMPREPLY[*]}}"
COMP_WORDS=(pipelinectl completions ''); COMP_CWORD=2
_pipelinectl pipelinectl '' completions
echo "4:${{COMPREPLY[*]}}"
"#,
        ctl = ctl.display()
    );
    let out = bash(&script);
    assert!(out.contains("-F _pipelinectl pipelinectl"), "{out}");
    assert!(out.contains("\n1:task\n"), "{out}");
    assert!(out.contains("\n2:add\n"), "{out}");
    assert!(out.contains("\n3:--priority\n"), "{out}");
    let shells = out
        .lines()
        .find_map(|l| l.strip_prefix("4:"))
        .unwrap_or_default();
    for shell in ["bash", "zsh", "fish"] {
        assert!(shells.split(' ').any(|s| s == shell), "{shells}");
    }

    // The server's and the runner's, from the hidden generator flag; zsh and fish scripts too.
    for name in ["pipeline-server", "pipeline-runner"] {
        let script = format!(
            "source <({} --generate-completions bash); complete -p {name}",
            bin(name).display()
        );
        assert!(bash(&script).contains(&format!("_{}", name.replace('-', "__"))));
    }
    let zsh =
        pipeline_tests::run(std::process::Command::new(&ctl).args(["completions", "zsh"])).ok();
    assert!(zsh.starts_with("#compdef pipelinectl"), "{zsh}");
    let fish =
        pipeline_tests::run(std::process::Command::new(&ctl).args(["completions", "fish"])).ok();
    assert!(fish.contains("complete -c pipelinectl"), "{fish}");
    if have("zsh") {
        let path = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(path.path(), &zsh).expect("write");
        pipeline_tests::run(std::process::Command::new("zsh").arg("-n").arg(path.path())).ok();
    }
}

#[test]
fn man_pages_are_generated_for_the_three_binaries_and_render() {
    let dir = tempfile::tempdir().expect("tempdir");
    let man1 = dir.path().join("man1");
    for name in ["pipeline-server", "pipeline-runner", "pipelinectl"] {
        let listed = pipeline_tests::run(
            std::process::Command::new(bin(name))
                .arg("--generate-man")
                .arg(&man1),
        )
        .ok();
        assert!(
            listed.lines().any(|l| l.ends_with(&format!("/{name}.1"))),
            "{listed}"
        );
    }
    let mut pages: Vec<String> = std::fs::read_dir(&man1)
        .expect("man1")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for page in [
        "pipeline-server.1",
        "pipeline-runner.1",
        "pipelinectl.1",
        "pipelinectl-task.1",
        "pipelinectl-task-add.1",
        "pipelinectl-runners-drain.1",
        "pipelinectl-completions.1",
    ] {
        assert!(pages.iter().any(|p| p == page), "{page} in {pages:?}");
    }
    for page in &pages {
        let path = man1.join(page);
        let roff = std::fs::read_to_string(&path).expect("read page");
        let name = page.trim_end_matches(".1");
        assert!(roff.contains(&format!(".TH {name} 1")), "{page}: {roff}");
        for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS"] {
            assert!(roff.contains(section), "{page} lacks {section}");
        }
        if have("groff") {
            // -ww: every warning; -z: parse and format, print nothing.
            let out = pipeline_tests::run(
                std::process::Command::new("groff")
                    .args(["-man", "-Tutf8", "-ww", "-z"])
                    .arg(&path),
            );
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "groff on {page}: {}",
                out.stderr
            );
        }
    }
    let server = std::fs::read_to_string(man1.join("pipeline-server.1")).expect("read");
    assert!(server.contains("\\-\\-lease\\-ttl"), "the flags are there");
    if have("man") {
        let text = pipeline_tests::run(
            std::process::Command::new("man")
                .arg("-l")
                .arg(man1.join("pipeline-server.1"))
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "200"),
        )
        .ok();
        assert!(text.contains("--lease-ttl <DURATION>"), "{text}");
        assert!(text.contains("SYNOPSIS"), "{text}");
    }

    // The generator flag is honoured only alone: with the server's own flags it is a mistake.
    let out = pipeline_tests::run(
        std::process::Command::new(bin("pipeline-server"))
            .args(["--generate-man"])
            .arg(&man1)
            .args(["--repo", "/nonexistent"]),
    );
    assert_eq!(out.code(), Some(2), "{}", out.stderr);
}

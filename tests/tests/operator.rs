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
    // COMP_* as bash sets them for `pipelinectl ta<TAB>`, `… task ad<TAB>`, `… task add --pri<TAB>`.
    let script = format!(
        r#"set -e
source <({ctl} completions bash)
complete -p pipelinectl
COMP_WORDS=(pipelinectl ta); COMP_CWORD=1
_pipelinectl pipelinectl ta pipelinectl
echo "1:${{COMPREPLY[*]}}"
COMP_WORDS=(pipelinectl task ad); COMP_CWORD=2
_pipelinectl pipelinectl ad task
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

/// Starts a `--once` runner for `server` and waits for it to exit; returns its exit code and
/// its log.
fn once(repo: &TestRepo, server: &Server, name: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = agent_args(&["--once"]);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut runner = Runner::spawn(repo, &server.url, name, &as_strs(&args));
    let (status, log) = runner.proc.wait_exit_log();
    (status.code(), log)
}

#[test]
fn a_once_runner_takes_one_task_finishes_it_and_exits_by_its_outcome() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    // Two tasks wait; the runner takes the first (priority 0), lands it and exits 0, and leaves
    // the second alone.
    let first = server.add(&["--title", "first", "--priority", "0"]);
    let second = server.add(&["--title", "second", "--priority", "1"]);
    let (code, log) = once(&repo, &server, "once-ok", &["--no-verify", "--slots", "4"]);
    assert_eq!(code, Some(0), "{log}");
    let task = server.wait_status(&first, "done");
    assert_eq!(task["patchset"], 1);
    let logs = server.ctl(&["logs", &first]).ok();
    assert!(
        logs.contains("sending the result"),
        "its log was shipped: {logs}"
    );
    let other = server.show(&second);
    assert_eq!(other["status"], "open", "{other}");
    assert!(
        pipeline_tests::runs(&other).is_empty(),
        "the second task was never leased: {other}"
    );
    let runners = server.ctl(&["runners", "--json"]).json();
    let me = runners
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "once-ok"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(me["state"], "offline", "{runners}");
    server.ctl(&["task", "cancel", &second]).ok();

    // The task's own failure: the result is taken and charged, exit 3.
    let failing = server.add(&["--title", "fails", "--description", "MODE: fail"]);
    let (code, log) = once(&repo, &server, "once-fail", &["--no-verify"]);
    assert_eq!(code, Some(3), "{log}");
    let task = server.show(&failing);
    assert_eq!(task["failures"], 1, "charged: {task}");
    assert_eq!(task["status"], "open");

    // Nothing to take: a SIGTERM before any lease ends it with 0.
    let mut args = agent_args(&["--once", "--no-verify", "--only-task", "nothing-here"]);
    args.push("--label=idle".to_owned());
    let mut idle = Runner::spawn(&repo, &server.url, "once-idle", &as_strs(&args));
    server.wait_connected(&idle.proc, "once-idle");
    idle.proc.signal("TERM");
    let (status, log) = idle.proc.wait_exit_log();
    assert_eq!(status.code(), Some(0), "{log}");
}

#[test]
fn a_once_runner_that_cannot_do_the_work_gives_it_back_and_exits_4() {
    let repo = TestRepo::new();
    // The server's verification names a program no machine here has: the runner gives the
    // lease back before its agent runs, uncharged.
    let server = Server::start(&repo, &["--build-cmd", "no-such-build-tool {namespace}"]);
    let id = server.add(&["--title", "t", "--namespace", "ns"]);
    let (code, log) = once(&repo, &server, "once-infra", &[]);
    assert_eq!(code, Some(4), "{log}");
    let task = server.wait_task(&id, "given back", |t| {
        pipeline_tests::runs(t)
            .iter()
            .any(|r| r["failure_kind"] == "infrastructure")
    });
    assert_eq!(task["failures"], 0, "uncharged: {task}");
    assert_eq!(task["status"], "open");
}

#[test]
fn the_dockerfile_names_what_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    // Every binary it builds and copies is one the workspace builds.
    let built: Vec<&str> = dockerfile
        .split("--bin ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert_eq!(built, ["pipeline-server", "pipeline-runner", "pipelinectl"]);
    for name in &built {
        assert!(bin(name).exists(), "{name}");
        assert!(
            dockerfile.contains(&format!("target/release/{name}")),
            "{name} is copied"
        );
    }
    // The user is made before it is used, and the runner's default arguments are its flags.
    let made = dockerfile.find("useradd").expect("useradd");
    let used = dockerfile.find("USER pipeline").expect("USER");
    assert!(made < used);
    assert!(
        dockerfile[made..used].contains(" pipeline\n"),
        "useradd … pipeline"
    );
    assert!(dockerfile.contains("CMD [\"--once\"]"));
    let help =
        pipeline_tests::run(std::process::Command::new(bin("pipeline-runner")).arg("--help")).ok();
    assert!(help.contains("--once"), "{help}");
    for var in [
        "PIPELINE_RUNNER_WORK_DIR",
        "PIPELINE_REPO",
        "PIPELINE_STATE_DIR",
        "PIPELINE_LISTEN",
    ] {
        assert!(dockerfile.contains(&format!("{var}=")), "{var}");
    }
    let server_help =
        pipeline_tests::run(std::process::Command::new(bin("pipeline-server")).arg("--help")).ok();
    for var in ["PIPELINE_REPO", "PIPELINE_STATE_DIR", "PIPELINE_LISTEN"] {
        assert!(server_help.contains(var), "{var}");
    }
    assert!(help.contains("PIPELINE_RUNNER_WORK_DIR"));
}

/// The `KEY=VALUE` settings of a unit file, in order (comments and sections left out).
fn unit_settings(name: &str) -> Vec<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The one value of `key` in `settings`.
fn setting<'a>(settings: &'a [(String, String)], key: &str) -> &'a str {
    let values: Vec<&str> = settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(values.len(), 1, "{key}: {values:?}");
    values[0]
}

/// A systemd time span as the units write them (`11min`, `10s`, `2min`).
fn span(text: &str) -> std::time::Duration {
    let text = text.replace("min", "m");
    std::time::Duration::from_secs(
        pipeline_core::units::seconds(&text).unwrap_or_else(|e| panic!("{text}: {e}")),
    )
}

#[test]
fn the_systemd_units_are_hardened_and_stop_a_runner_after_its_drain() {
    for unit in ["pipeline-server.service", "pipeline-runner.service"] {
        let s = unit_settings(unit);
        for (key, want) in [
            ("KillMode", "mixed"),
            ("KillSignal", "SIGTERM"),
            ("Restart", "on-failure"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("ProtectHome", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(setting(&s, key), want, "{unit}: {key}");
        }
        let user = setting(&s, "User");
        assert!(
            user.starts_with("pipeline"),
            "{unit}: a dedicated user, not {user}"
        );
        assert!(
            !setting(&s, "StateDirectory").is_empty(),
            "{unit}: the writable state"
        );
    }
    let sysusers = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pipeline.sysusers.conf"),
    )
    .expect("sysusers");
    for user in ["pipeline ", "pipeline-runner "] {
        assert!(
            sysusers
                .lines()
                .any(|l| l.starts_with("u") && l[1..].trim_start().starts_with(user)),
            "{user}is made"
        );
    }

    // The runner: the token as a credential under the name the runner reads, and a stop
    // timeout past the drain, the agents' kill grace and the releases (5 s), so that the
    // runner gives its leases back before systemd's SIGKILL.
    let s = unit_settings("pipeline-runner.service");
    let creds: Vec<&str> = s
        .iter()
        .filter(|(k, _)| k == "LoadCredential")
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(
        creds
            .iter()
            .any(|c| c.starts_with("pipeline-runner-token:")),
        "{creds:?}"
    );
    let env = |name: &str| -> String {
        s.iter()
            .filter(|(k, _)| k == "Environment")
            .find_map(|(_, v)| v.strip_prefix(&format!("{name}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("Environment={name}=…"))
    };
    let drain = span(&env("PIPELINE_DRAIN_TIMEOUT"));
    let grace = span(&env("PIPELINE_KILL_GRACE"));
    let stop = span(setting(&s, "TimeoutStopSec"));
    assert!(
        stop >= drain + grace + std::time::Duration::from_secs(30),
        "TimeoutStopSec {stop:?} must outlast the drain {drain:?} + kill grace {grace:?} + releases"
    );

    // systemd's own reading of both units, where systemd-analyze is installed.
    if have("systemd-analyze") {
        verify_units();
    } else {
        eprintln!("skipping systemd-analyze verify: systemd-analyze is not installed");
    }

    // What the unit does on `systemctl stop`, against the real runner, its timings scaled
    // down: SIGTERM to the runner alone (KillMode=mixed), an agent that would run past the
    // drain. The agent keeps working while the runner drains; when the drain's bound passes
    // the runner stops it and gives the lease back, uncharged, and exits 0 by itself, with no
    // process of the agent left for systemd's SIGKILL.
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let args = agent_args(&["--no-verify", "--drain-timeout", "2s"]);
    let mut runner = Runner::start(&repo, &server, "unit", &as_strs(&args));
    let id = server.add(&["--title", "long", "--description", "MODE: wait"]);
    let agent = repo.wait_agent(&id);
    runner.proc.signal("TERM");
    pipeline_tests::wait_for("the runner to drain", || {
        let runners = server.ctl(&["runners", "--json"]).json();
        (runners[0]["state"] == "draining").then_some(())
    });
    let status = runner.proc.wait_exit();
    assert!(status.success(), "{status:?}\n{}", runner.log());
    assert!(
        !pipeline_tests::alive(&agent),
        "the agent {agent} outlived its runner"
    );
    let task = server.wait_task(&id, "given back", |t| {
        pipeline_tests::event_kinds(t).contains(&"released".to_owned())
    });
    assert_eq!(task["failures"], 0, "uncharged: {task}");
    assert_ne!(task["status"], "in_progress");
    assert_eq!(
        repo.agent_file(&format!("{id}.attempts"))
            .as_deref()
            .map(str::trim),
        Some("1"),
        "the agent ran once, and was not killed by the runner's SIGTERM before the drain's end"
    );
}

/// `systemd-analyze verify` of both units in a root of their own (the binaries they name,
/// systemd's own units), with nothing said: a setting it cannot read is only a warning, so
/// any output fails.
fn verify_units() {
    let root = tempfile::tempdir().expect("tempdir");
    let bin_dir = root.path().join("usr/local/bin");
    let units = root.path().join("etc/systemd/system");
    let system = root.path().join("usr/lib/systemd/system");
    for dir in [&bin_dir, &units, &system] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    for name in ["pipeline-server", "pipeline-runner"] {
        std::fs::copy(bin(name), bin_dir.join(name)).expect("copy binary");
    }
    for entry in std::fs::read_dir("/usr/lib/systemd/system")
        .into_iter()
        .flatten()
    {
        let Ok(entry) = entry else { continue };
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::copy(entry.path(), system.join(entry.file_name()));
        }
    }
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for unit in ["pipeline-server.service", "pipeline-runner.service"] {
        std::fs::copy(deploy.join(unit), units.join(unit)).expect("copy unit");
    }
    let out = pipeline_tests::run(
        std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", root.path().display()))
            .args([
                "/etc/systemd/system/pipeline-server.service",
                "/etc/systemd/system/pipeline-runner.service",
            ]),
    );
    assert!(
        out.status.success() && out.stderr.trim().is_empty() && out.stdout.trim().is_empty(),
        "systemd-analyze verify: {out:?}"
    );
}

/// The token as the runner unit hands it over: a systemd credential, in the file
/// `$CREDENTIALS_DIRECTORY/pipeline-runner-token`, with nothing on the command line or in the
/// environment.
#[test]
fn a_runner_registers_with_the_token_of_its_systemd_credential() {
    let repo = TestRepo::new();
    let server = Server::start(&repo, &[]);
    let creds = tempfile::tempdir().expect("credentials dir");
    std::fs::write(
        creds.path().join("pipeline-runner-token"),
        format!("{}\n", repo.registration_token()),
    )
    .expect("write the credential");
    let args = agent_args(&["--no-verify"]);
    let cmd = Runner::command(&repo, &server.url, "from-credential", &as_strs(&args));
    // The harness passes --token; a unit passes none.
    let argv: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let at = argv.iter().position(|a| a == "--token").expect("--token");
    let mut without = std::process::Command::new(cmd.get_program());
    without.args(argv[..at].iter().chain(&argv[at + 2..]));
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => without.env(key, value),
            None => without.env_remove(key),
        };
    }
    without.env("CREDENTIALS_DIRECTORY", creds.path());
    let runner = pipeline_tests::Proc::spawn(&mut without);
    server.wait_connected(&runner, "from-credential");
    let id = server.add(&["--title", "through the credential"]);
    server.wait_status(&id, "done");
}

//! The edge of the server against clients that misbehave: where the local admin token goes,
//! how much a runner may say about itself, connections that never speak, a base fetch nobody
//! reads, registration floods, oversized messages, the `Bearer` scheme, costs and log numbers
//! out of range, and agent output with terminal escapes.

use std::path::{Path, PathBuf};
use std::process::Command;

use pipeline_tests::{Output, Server, TestRepo, bin, run};

/// Starts a server whose `HOME` is `home` (so its note for `pipelinectl` goes there).
fn start_with_home(repo: &TestRepo, home: &Path, extra: &[&str]) -> Server {
    let mut cmd = Server::command(repo, extra);
    cmd.env("HOME", home);
    Server::spawn(&mut cmd).unwrap_or_else(|log| panic!("server did not start:\n{log}"))
}

/// `pipelinectl --server URL ARGS` with `HOME` set to `home` and no token in the environment.
fn ctl_home(url: &str, home: &Path, args: &[&str]) -> Output {
    run(Command::new(bin("pipelinectl"))
        .arg("--server")
        .arg(url)
        .args(args)
        .env("HOME", home)
        .env_remove("PIPELINE_SERVER")
        .env_remove("PIPELINE_TOKEN"))
}

/// The notes servers left for `pipelinectl` under `home`, by file name.
fn notes(home: &Path) -> Vec<String> {
    let dir: PathBuf = home.join(".local/state/pipeline/servers");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn two_servers_on_one_port_each_get_their_own_admin_token() {
    let home = tempfile::tempdir().expect("home");
    let (repo_a, repo_b) = (TestRepo::new(), TestRepo::new());
    let a = start_with_home(&repo_a, home.path(), &[]);
    let port = a.addr.rsplit(':').next().expect("port").to_owned();
    // 127.0.0.2 is loopback too (all of 127/8 is, on Linux): the same port, another server.
    let b = start_with_home(
        &repo_b,
        home.path(),
        &["--listen", &format!("127.0.0.2:{port}")],
    );
    assert_ne!(repo_a.admin_token(), repo_b.admin_token());
    for server in [&a, &b] {
        let out = ctl_home(&server.url, home.path(), &["status", "--json"]).json();
        assert_eq!(out["open"], 0, "{} accepts the token noted for it", server.url);
    }
    // The two tokens are not interchangeable, so the successes above used the right one each.
    ctl_home(
        &b.url,
        home.path(),
        &["--token", &repo_a.admin_token(), "status"],
    )
    .refused(6, "the credential is not valid");
    // `localhost` gets a token only for an address it resolves to, and then talks to that one.
    let out = ctl_home(
        &format!("http://localhost:{port}"),
        home.path(),
        &["status", "--json"],
    )
    .json();
    assert_eq!(out["open"], 0);
    assert_eq!(notes(home.path()).len(), 2, "{:?}", notes(home.path()));
    // A graceful stop takes the note away.
    assert!(b.terminate().success());
    assert_eq!(
        notes(home.path()),
        vec![format!("127.0.0.1-{port}")],
        "127.0.0.2's note is gone"
    );
    assert!(a.terminate().success());
    assert!(notes(home.path()).is_empty(), "{:?}", notes(home.path()));
}

/// An address of this host that is not loopback, if it has one.
fn non_loopback_address() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket sends nothing; it only picks the source address of the route.
    ["192.0.2.1:9", "10.255.255.1:9", "8.8.8.8:53"]
        .iter()
        .find_map(|target| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
            socket.connect(target).ok()?;
            let ip = socket.local_addr().ok()?.ip();
            (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
        })
}

#[test]
fn a_non_loopback_url_gets_no_local_token() {
    let home = tempfile::tempdir().expect("home");
    let repo = TestRepo::new();
    let server = start_with_home(
        &repo,
        home.path(),
        &["--listen", "0.0.0.0:0", "--insecure"],
    );
    let port = server.addr.rsplit(':').next().expect("port").to_owned();
    // Loopback reaches a server listening on every address: its note is offered there.
    let out = ctl_home(
        &format!("http://127.0.0.1:{port}"),
        home.path(),
        &["status", "--json"],
    )
    .json();
    assert_eq!(out["open"], 0);
    let Some(ip) = non_loopback_address() else {
        eprintln!("this host has no non-loopback address; the CLI's unit tests cover the rule");
        return;
    };
    // The same server through a non-loopback address: the token is not offered.
    ctl_home(
        &format!("http://{ip}:{port}"),
        home.path(),
        &["status"],
    )
    .refused(6, "no credential: pass --token or set PIPELINE_TOKEN");
}

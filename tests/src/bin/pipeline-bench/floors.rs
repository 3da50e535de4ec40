//! The floors every figure is compared with, measured in the same run on the same machine: a
//! raw TCP round trip over loopback (the same Tokio I/O stack, no HTTP/2, no gRPC), an fsync of
//! a small append in the server's state directory, and one spawn of a trivial git command.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Summary, report};

pub struct Floors {
    pub tcp: Summary,
    pub fsync: Summary,
    pub git_spawn: Summary,
}

pub async fn measure(dir: &Path, repo: &Path, quick: bool) -> Floors {
    let tcp = Summary::of(tcp_round_trips(if quick { 1_000 } else { 20_000 }).await);
    report(
        "floor: raw TCP round trip, 64 bytes each way",
        tcp,
        None,
        "-",
    );
    let fsync = Summary::of(fsyncs(dir, if quick { 50 } else { 500 }));
    report("floor: fsync of a 4 KiB append", fsync, None, "-");
    let mut spawns = Vec::new();
    for _ in 0..if quick { 20 } else { 200 } {
        let start = Instant::now();
        let out = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(repo)
            .output()
            .expect("git");
        assert!(out.status.success(), "git rev-parse failed");
        spawns.push(start.elapsed());
    }
    let git_spawn = Summary::of(spawns);
    report(
        "floor: one git spawn (git rev-parse HEAD)",
        git_spawn,
        None,
        "-",
    );
    Floors {
        tcp,
        fsync,
        git_spawn,
    }
}

async fn tcp_round_trips(n: usize) -> Vec<std::time::Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("accept");
        sock.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; 64];
        while sock.read_exact(&mut buf).await.is_ok() {
            if sock.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.set_nodelay(true).expect("nodelay");
    let mut buf = [7u8; 64];
    let mut xs = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let start = Instant::now();
        sock.write_all(&buf).await.expect("write");
        sock.read_exact(&mut buf).await.expect("read");
        if i >= 100 {
            xs.push(start.elapsed());
        }
    }
    xs
}

fn fsyncs(dir: &Path, n: usize) -> Vec<std::time::Duration> {
    let path = dir.join("bench-fsync");
    let mut file = std::fs::File::create(&path).expect("create");
    let block = [1u8; 4096];
    let mut xs = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        file.write_all(&block).expect("write");
        file.sync_data().expect("fsync");
        xs.push(start.elapsed());
    }
    let _ = std::fs::remove_file(path);
    xs
}

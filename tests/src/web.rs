//! The web side of the harness: the server's HTTP address, an HTTP client that keeps what it is
//! told (no redirects followed, cookies by hand), server-sent events read off a socket, and a
//! headless Chromium driven through WebDriver ([`Browser`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{DEADLINE, Proc, Server, TestRepo, wait_for};

/// The URL of the server's web page (`--http 127.0.0.1:0`), from its `http listening on` line.
pub fn http_url(server: &Server) -> String {
    let line = server
        .proc
        .wait_for_line("http listening on ")
        .unwrap_or_else(|log| panic!("the server did not serve http:\n{log}"));
    let addr = line
        .split("http listening on ")
        .nth(1)
        .expect("address")
        .trim();
    format!("http://{addr}")
}

/// The viewer token (from the state dir).
pub fn viewer_token(repo: &TestRepo) -> String {
    std::fs::read_to_string(repo.state_dir().join("viewer.token"))
        .expect("viewer.token")
        .trim()
        .to_owned()
}

/// An HTTP client that follows no redirect (a test sees each answer as it is).
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(DEADLINE)
        .build()
        .expect("http client")
}

/// An answer: its status, headers and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends `req` and reads the whole answer.
pub fn send(req: reqwest::blocking::RequestBuilder) -> Answer {
    let resp = req.send().expect("http request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().expect("body");
    Answer {
        status,
        headers,
        body,
    }
}

/// `GET url` with `token` as a bearer token.
pub fn get(url: &str, token: &str) -> Answer {
    send(client().get(url).bearer_auth(token))
}

/// Signs in with `token`; returns the session cookie (`name=value`).
pub fn login(base: &str, token: &str) -> String {
    let a = send(
        client()
            .post(format!("{base}/login"))
            .header("sec-fetch-site", "same-origin")
            .form(&[("token", token), ("next", "/")]),
    );
    assert_eq!(a.status, 303, "login: {a:?}");
    let cookie = a.header("set-cookie");
    cookie.split(';').next().expect("cookie").trim().to_owned()
}

/// Server-sent events read off a plain socket (HTTP/1.1), so that a test decides when (and
/// whether) it reads.
pub struct EventStream {
    pub reader: BufReader<TcpStream>,
    pub status: u16,
}

/// One server-sent event.
#[derive(Debug, Clone, Default)]
pub struct Sse {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

impl EventStream {
    /// Opens `path` on `base` (`http://host:port`) with `Accept: text/event-stream`, `token`
    /// and the extra `headers`; `recv_buffer` sets the socket's receive buffer (small, for a
    /// reader that stops reading).
    pub fn open(
        base: &str,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        recv_buffer: Option<u32>,
    ) -> Self {
        let addr = base.trim_start_matches("http://");
        let sock = match recv_buffer {
            None => TcpStream::connect(addr).expect("connect"),
            Some(size) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let s = tokio::net::TcpSocket::new_v4().expect("socket");
                    s.set_recv_buffer_size(size).expect("rcvbuf");
                    s.connect(addr.parse().expect("addr"))
                        .await
                        .expect("connect")
                        .into_std()
                        .expect("std")
                })
            }
        };
        sock.set_nonblocking(false).expect("blocking");
        sock.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
             Connection: close\r\nAuthorization: Bearer {token}\r\n"
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        (&sock).write_all(request.as_bytes()).expect("send");
        let mut reader = BufReader::new(sock);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).expect("status line");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // The headers.
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
        }
        Self { reader, status }
    }

    /// The next event (`None` at the end of the stream: the server ended it or closed the
    /// connection). Chunked encoding's size lines and comments are skipped. A stream that
    /// neither ends nor sends anything for [`DEADLINE`] fails the test.
    pub fn next_event(&mut self) -> Option<Sse> {
        let mut event = Sse::default();
        let mut any = false;
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ) =>
                {
                    panic!("the event stream neither ended nor sent anything for {DEADLINE:?}")
                }
                Err(_) => return None,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if any {
                    return Some(event);
                }
                continue;
            }
            if let Some(v) = line.strip_prefix("event: ") {
                event.event = v.to_owned();
                any = true;
            } else if let Some(v) = line.strip_prefix("id: ") {
                event.id = Some(v.to_owned());
                any = true;
            } else if let Some(v) = line.strip_prefix("data: ") {
                event.data.push_str(v);
                any = true;
            }
        }
    }

    /// Events until one satisfies `want`; fails the test past the deadline or at the end.
    pub fn until(&mut self, what: &str, want: impl Fn(&Sse) -> bool) -> Vec<Sse> {
        let start = Instant::now();
        let mut seen = Vec::new();
        while start.elapsed() < DEADLINE {
            let Some(e) = self.next_event() else {
                panic!("the stream ended before {what}; saw {seen:?}")
            };
            let done = want(&e);
            seen.push(e);
            if done {
                return seen;
            }
        }
        panic!("timed out waiting for {what}; saw {seen:?}")
    }

    /// Reads everything until the server closes the stream; how many bytes came.
    pub fn drain(&mut self) -> usize {
        let mut buf = [0u8; 64 * 1024];
        let mut total = 0;
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    }
}

/// The server's resident memory, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Where screenshots go: `<target>/screenshots/`.
pub fn screenshots_dir() -> PathBuf {
    let dir = crate::bin_dir()
        .parent()
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
        .join("screenshots");
    std::fs::create_dir_all(&dir).expect("screenshots dir");
    dir
}

/// Why the browser tests cannot run here, when they cannot: `None` when `chromium` and
/// `chromedriver` are installed. With `PIPELINE_SKIP_BROWSER=1` a missing browser skips the
/// tests (saying so); otherwise it fails them (CI installs both).
pub fn browser_missing() -> Option<String> {
    let missing: Vec<&str> = ["chromium", "chromedriver"]
        .into_iter()
        .filter(|p| {
            !Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {p}"))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return None;
    }
    let why = format!(
        "{} not installed (apt-get install chromium chromium-driver)",
        missing.join(" and ")
    );
    if std::env::var("PIPELINE_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        Some(why)
    } else {
        panic!("the browser tests need {why}; set PIPELINE_SKIP_BROWSER=1 to skip them");
    }
}

/// A headless Chromium driven through `chromedriver` (WebDriver), with a fresh profile.
pub struct Browser {
    pub rt: tokio::runtime::Runtime,
    pub client: fantoccini::Client,
    _driver: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let driver = Proc::spawn(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1"),
        );
        wait_for("chromedriver to listen", || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let profile = tempfile::tempdir().expect("profile");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    "--window-size=1360,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let caps = caps.as_object().expect("object").clone();
        let client = rt.block_on(async {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            fantoccini::ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
                .expect("a WebDriver session")
        });
        Self {
            rt,
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    pub fn goto(&self, url: &str) {
        self.rt
            .block_on(self.client.goto(url))
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// The text of the element `css`, once there is one.
    pub fn text(&self, css: &str) -> String {
        self.rt.block_on(async {
            let e = self
                .client
                .wait()
                .at_most(DEADLINE)
                .for_element(fantoccini::Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no {css}: {e}"));
            e.text().await.expect("text")
        })
    }

    /// Waits until the text of `css` satisfies `want` (the page updating itself: no reload).
    pub fn wait_text(&self, css: &str, what: &str, want: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let text = self.rt.block_on(async {
                match self.client.find(fantoccini::Locator::Css(css)).await {
                    Ok(e) => e.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                }
            });
            if want(&text) {
                return text;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what} in {css}; it says {text:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn click(&self, css: &str) {
        self.rt.block_on(async {
            let e = self
                .client
                .wait()
                .at_most(DEADLINE)
                .for_element(fantoccini::Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no {css}: {e}"));
            e.click()
                .await
                .unwrap_or_else(|e| panic!("click {css}: {e}"));
        });
    }

    pub fn type_into(&self, css: &str, text: &str) {
        self.rt.block_on(async {
            let e = self
                .client
                .find(fantoccini::Locator::Css(css))
                .await
                .unwrap_or_else(|e| panic!("no {css}: {e}"));
            e.send_keys(text).await.expect("type");
        });
    }

    /// Evaluates `script` in the page.
    pub fn eval(&self, script: &str) -> serde_json::Value {
        self.rt
            .block_on(self.client.execute(script, vec![]))
            .unwrap_or_else(|e| panic!("execute {script}: {e}"))
    }

    pub fn url(&self) -> String {
        self.rt
            .block_on(self.client.current_url())
            .expect("url")
            .to_string()
    }

    /// Saves a screenshot as `<target>/screenshots/<name>.png`; returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .rt
            .block_on(self.client.screenshot())
            .expect("screenshot");
        let path = screenshots_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// Signs in on the login page with `token`.
    pub fn sign_in(&self, base: &str, token: &str) {
        self.goto(&format!("{base}/login"));
        self.type_into("#token", token);
        self.click("#sign-in");
        wait_for("the page after signing in", || {
            (!self.url().contains("/login")).then_some(())
        });
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let client = self.client.clone();
        let _ = self.rt.block_on(client.close());
    }
}

//! Several servers, one leader (issue 28): a client (runner, `pipelinectl`) given
//! `--server URL1,URL2` talks to one of them at a time and moves on when that one is away or
//! answers `UNAVAILABLE`, going first to the leader the refusal names ([`LEADER_METADATA`]).
//! One URL behaves as before: there is nowhere else to go.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The response metadata key a standby puts on its `UNAVAILABLE` refusals: the leader's
/// `--advertise` URL, where the client should go instead.
pub const LEADER_METADATA: &str = "pipeline-leader";

/// The URLs of a `--server` value: separated by commas, blanks around each ignored, `host:port`
/// meaning `http://host:port`. Empty when there is none.
pub fn split(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(normalize)
        .collect()
}

/// `url` with a scheme (`http://` when it has none) and without a trailing slash, so that the
/// same server is written one way.
pub fn normalize(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// The leader's URL a refusal names, if any.
pub fn leader_named(status: &tonic::Status) -> Option<String> {
    let value = status.metadata().get(LEADER_METADATA)?.to_str().ok()?;
    let value = value.trim();
    (!value.is_empty()).then(|| normalize(value))
}

/// An `UNAVAILABLE` refusal naming the leader at `leader` (its `--advertise` URL; none when
/// no leader is known), for a server that is not the leader.
pub fn not_the_leader(leader: Option<&str>) -> tonic::Status {
    let mut status = tonic::Status::unavailable(match leader {
        Some(url) => format!("this server is a standby; the leader is at {url}"),
        None => "this server is a standby and no leader is known yet; try again".to_owned(),
    });
    if let Some(value) = leader.and_then(|url| url.parse().ok()) {
        status.metadata_mut().insert(LEADER_METADATA, value);
    }
    status
}

/// The servers a client may talk to, and the one it talks to now.
#[derive(Debug)]
pub struct Servers {
    urls: Vec<String>,
    current: AtomicUsize,
}

impl Servers {
    /// The servers of `urls`, starting with the first; `None` when there is none.
    pub fn new(urls: Vec<String>) -> Option<Self> {
        (!urls.is_empty()).then(|| Self {
            urls,
            current: AtomicUsize::new(0),
        })
    }

    /// Every URL, in the order given.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The index of the server to talk to now.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    /// The URL of the server to talk to now.
    pub fn current_url(&self) -> &str {
        &self.urls[self.current()]
    }

    /// After a call to server `tried` failed with `status`: on `UNAVAILABLE` (nothing
    /// listening, a connection lost, a standby), the next call goes to the leader the refusal
    /// names when it is one of these servers, else to the one after `tried`. Returns whether
    /// the server to talk to changed. A failure already acted on (another call moved on since
    /// `tried`) moves nothing again.
    pub fn failed(&self, tried: usize, status: &tonic::Status) -> bool {
        if status.code() != tonic::Code::Unavailable || self.urls.len() < 2 {
            return false;
        }
        let named = leader_named(status).and_then(|leader| {
            self.urls
                .iter()
                .position(|u| normalize(u) == leader)
                .filter(|&i| i != tried)
        });
        let next = named.unwrap_or((tried + 1) % self.urls.len());
        self.current
            .compare_exchange(tried, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    #[test]
    fn a_server_list_is_split_on_commas_and_each_url_gets_a_scheme() {
        assert_eq!(
            split(" http://a:1/ ,b:2,,https://c:3"),
            ["http://a:1", "http://b:2", "https://c:3"]
        );
        assert_eq!(split("http://a:1"), ["http://a:1"]);
        assert!(split(" , ").is_empty());
    }

    #[test]
    fn unavailable_moves_to_the_next_server_and_round_again() {
        let s = Servers::new(split("a:1,b:2,c:3")).unwrap();
        assert_eq!(s.current_url(), "http://a:1");
        assert!(s.failed(0, &Status::unavailable("connection refused")));
        assert_eq!(s.current_url(), "http://b:2");
        // Another call that failed on the first server meanwhile moves nothing again.
        assert!(!s.failed(0, &Status::unavailable("connection refused")));
        assert_eq!(s.current(), 1);
        assert!(s.failed(1, &Status::unavailable("x")));
        assert!(s.failed(2, &Status::unavailable("x")));
        assert_eq!(s.current_url(), "http://a:1");
    }

    #[test]
    fn a_refusal_naming_the_leader_goes_there_first() {
        let s = Servers::new(split("a:1,b:2,c:3")).unwrap();
        assert!(s.failed(0, &not_the_leader(Some("http://c:3/"))));
        assert_eq!(s.current_url(), "http://c:3");
        // A leader that is not one of the servers given: the next one.
        assert!(s.failed(2, &not_the_leader(Some("http://elsewhere:9"))));
        assert_eq!(s.current_url(), "http://a:1");
        assert!(s.failed(0, &not_the_leader(None)));
        assert_eq!(s.current_url(), "http://b:2");
    }

    #[test]
    fn other_failures_and_a_single_server_stay_where_they_are() {
        let s = Servers::new(split("a:1,b:2")).unwrap();
        for code in [
            Code::Internal,
            Code::NotFound,
            Code::Unknown,
            Code::Cancelled,
        ] {
            assert!(!s.failed(0, &Status::new(code, "x")), "{code:?}");
        }
        assert_eq!(s.current(), 0);
        let one = Servers::new(split("a:1")).unwrap();
        assert!(!one.failed(0, &not_the_leader(Some("http://b:2"))));
        assert_eq!(one.current_url(), "http://a:1");
    }

    #[test]
    fn the_refusal_names_the_leader_in_its_metadata() {
        let status = not_the_leader(Some("http://10.0.0.2:50051"));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            leader_named(&status).as_deref(),
            Some("http://10.0.0.2:50051")
        );
        assert!(status.message().contains("http://10.0.0.2:50051"));
        assert_eq!(leader_named(&not_the_leader(None)), None);
    }
}

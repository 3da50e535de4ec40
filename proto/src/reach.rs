//! Why a client could not talk to the server, told apart: what waiting can heal (nothing
//! listens yet, the server restarts or is at its connection limit, a name server that is away)
//! from a mistake a person must fix (a host that does not resolve, a certificate the client
//! does not trust, TLS on one side only, an address that is not a pipeline server). The one
//! reading the runner (which exits on a mistake before it first registers) and `pipelinectl`
//! (which says what to do) share.
//!
//! The reading walks the failure's chain of causes for the I/O error and the TLS error
//! (`rustls::Error`) at its root. One case needs a question to the server: plain HTTP/2 that
//! got no HTTP/2 answer is either a TLS port or something that is not a gRPC server at all,
//! and a TLS handshake with the same address ([`diagnose`]) tells which.

use std::error::Error;
use std::time::Duration;

/// How long the TLS question may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A failure to reach the server, read: what failed and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreachable {
    /// What failed, in a few words.
    pub cause: String,
    /// What to do about it.
    pub fix: String,
    /// Whether waiting cannot help: the URL, the certificate or the CA must change.
    pub permanent: bool,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {}", self.cause, self.fix)
    }
}

impl Unreachable {
    fn permanent(cause: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            cause: cause.into(),
            fix: fix.into(),
            permanent: true,
        }
    }

    fn transient(cause: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            cause: cause.into(),
            fix: fix.into(),
            permanent: false,
        }
    }
}

/// Reads a failed connection to `url`, or a failed call on it. `None` when the failure is not
/// the transport's: the server answered, with a status of its own.
pub async fn diagnose(url: &str, err: &(dyn Error + Send + Sync + 'static)) -> Option<Unreachable> {
    let err: &(dyn Error + 'static) = err;
    if !causes(err).any(|e| e.is::<tonic::transport::Error>()) {
        return None;
    }
    let reading = read(url, err);
    let cause = innermost(err);
    Some(match reading {
        Reading::Known(unreachable) => unreachable,
        Reading::MaybeTls => match speaks_tls(url).await {
            Some(true) => Unreachable::permanent(
                "the server speaks TLS, not plain HTTP/2",
                format!(
                    "use an https:// URL ({}), with --tls-ca for a private CA",
                    url.replacen("http://", "https://", 1)
                ),
            ),
            Some(false) => Unreachable::permanent(
                format!("the server does not answer as a pipeline server ({cause})"),
                "check that the URL (--server) is the pipeline server's gRPC address",
            ),
            None => Unreachable::transient(
                cause,
                "the server may be restarting or at its connection limit",
            ),
        },
    })
}

/// What the chain of causes says by itself.
#[derive(Debug, PartialEq)]
enum Reading {
    Known(Unreachable),
    /// Plain HTTP/2 got no HTTP/2 answer: a TLS port, or not a gRPC server, or a connection
    /// closed early (a server going down, or at its connection limit).
    MaybeTls,
}

fn read(url: &str, err: &(dyn Error + 'static)) -> Reading {
    if let Some(tls) = tls_error(err) {
        return Reading::Known(read_tls(url, tls));
    }
    if let Some(known) = io_error(err).and_then(|io| read_io(url, io)) {
        return Reading::Known(known);
    }
    if url.starts_with("https://") {
        return Reading::Known(Unreachable::transient(
            innermost(err),
            "the server may be restarting or at its connection limit",
        ));
    }
    Reading::MaybeTls
}

fn read_tls(url: &str, e: &rustls::Error) -> Unreachable {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => Unreachable::permanent(
            format!("the server's certificate is not signed by a CA this client trusts ({e})"),
            "pass --tls-ca with the CA certificate (PEM) that signed it",
        ),
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => Unreachable::permanent(
            format!(
                "the server's certificate is not valid for {} ({e})",
                host(url)
            ),
            "use in the URL a host name or address the certificate names",
        ),
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => Unreachable::permanent(
            format!("the server's certificate is expired or not yet valid ({e})"),
            "renew it, or check this machine's clock",
        ),
        rustls::Error::InvalidCertificate(_) => Unreachable::permanent(
            format!("the server's certificate is refused ({e})"),
            "check the server's certificate and --tls-ca",
        ),
        rustls::Error::InvalidMessage(_) => Unreachable::permanent(
            format!("the server does not speak TLS ({e})"),
            format!(
                "use an http:// URL ({}) if it is a pipeline server without TLS, else check \
                 the URL (--server)",
                url.replacen("https://", "http://", 1)
            ),
        ),
        _ => Unreachable::permanent(
            format!("the TLS handshake failed ({e})"),
            "check the server's TLS settings and --tls-ca",
        ),
    }
}

fn read_io(url: &str, io: &std::io::Error) -> Option<Unreachable> {
    use std::io::ErrorKind as K;
    let text = io.to_string();
    if text.contains("failed to lookup address information") {
        // getaddrinfo's EAI_AGAIN: the name server did not answer, which can heal.
        return Some(
            if text.contains("Temporary failure") || text.contains("try again") {
                Unreachable::transient(
                    format!("cannot resolve {} ({text})", host(url)),
                    "the name server may be away",
                )
            } else {
                Unreachable::permanent(
                    format!("the host {} does not resolve ({text})", host(url)),
                    "check the host name in the URL (--server)",
                )
            },
        );
    }
    match io.kind() {
        K::ConnectionRefused => Some(Unreachable::transient(
            "connection refused",
            "is pipeline-server running? (check --server or PIPELINE_SERVER)",
        )),
        K::TimedOut
        | K::HostUnreachable
        | K::NetworkUnreachable
        | K::NetworkDown
        | K::AddrNotAvailable => Some(Unreachable::transient(
            text,
            "check that the server's host is up and reachable",
        )),
        _ => None,
    }
}

/// Whether the address of the plain `http://` `url` answers a TLS handshake: `Some(true)` if
/// it does (whatever its certificate), `Some(false)` if it answers something that is not TLS,
/// `None` if it does not say (closed, refused, silent).
async fn speaks_tls(url: &str) -> Option<bool> {
    let https = format!("https://{}", url.strip_prefix("http://")?);
    let tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
    let endpoint = tonic::transport::Endpoint::from_shared(https)
        .ok()?
        .tls_config(tls)
        .ok()?
        .connect_timeout(PROBE_TIMEOUT);
    match tokio::time::timeout(PROBE_TIMEOUT, endpoint.connect()).await {
        Err(_) => None,
        Ok(Ok(_)) => Some(true),
        Ok(Err(e)) => match tls_error(&e) {
            Some(rustls::Error::InvalidMessage(_)) => Some(false),
            Some(_) => Some(true),
            None => None,
        },
    }
}

/// `err` and its causes, outermost first.
fn causes<'a>(err: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |e: &&'a (dyn Error + 'static)| (*e).source())
}

fn io_error<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a std::io::Error> {
    causes(err).find_map(|e| e.downcast_ref::<std::io::Error>())
}

/// The TLS error among the causes (an I/O error carries it inside, not as its source).
fn tls_error<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    causes(err).find_map(|e| {
        e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        })
    })
}

/// The innermost cause, on one line: the useful part of a transport error.
fn innermost(err: &(dyn Error + 'static)) -> String {
    let last = causes(err)
        .last()
        .map_or_else(String::new, ToString::to_string);
    last.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The host of `url`, for messages.
fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn io_err(kind: io::ErrorKind, inner: impl Into<Box<dyn Error + Send + Sync>>) -> io::Error {
        io::Error::new(kind, inner)
    }

    fn known(url: &str, err: &io::Error) -> Unreachable {
        match read(url, err) {
            Reading::Known(u) => u,
            Reading::MaybeTls => panic!("{err} read as a question"),
        }
    }

    #[test]
    fn an_untrusted_certificate_names_the_ca_flag() {
        let e = io_err(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let u = known("https://build:50051", &e);
        assert!(u.permanent);
        assert!(u.to_string().contains("--tls-ca"), "{u}");
        assert!(u.to_string().contains("UnknownIssuer"), "{u}");
        let e = io_err(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName),
        );
        let u = known("https://[::1]:50051", &e);
        assert!(u.permanent && u.cause.contains("not valid for ::1"), "{u}");
    }

    #[test]
    fn tls_to_a_plain_server_says_to_use_http() {
        let e = io_err(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        );
        let u = known("https://h:7", &e);
        assert!(u.permanent);
        assert!(u.fix.contains("http://h:7"), "{u}");
    }

    #[test]
    fn names_that_do_not_resolve_are_mistakes_unless_the_resolver_is_away() {
        let gone = io_err(
            io::ErrorKind::Other,
            "failed to lookup address information: Name or service not known",
        );
        let u = known("http://nowhere.invalid:1", &gone);
        assert!(u.permanent && u.cause.contains("nowhere.invalid"), "{u}");
        let away = io_err(
            io::ErrorKind::Other,
            "failed to lookup address information: Temporary failure in name resolution",
        );
        assert!(!known("http://h:1", &away).permanent);
    }

    #[test]
    fn nothing_listening_can_heal() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let u = known("http://127.0.0.1:1", &refused);
        assert!(!u.permanent);
        assert!(u.fix.contains("is pipeline-server running?"), "{u}");
        let unreachable = io::Error::from(io::ErrorKind::HostUnreachable);
        assert!(!known("https://h:1", &unreachable).permanent);
    }

    #[test]
    fn plain_http_without_an_answer_asks_about_tls() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(read("http://h:1", &reset), Reading::MaybeTls);
        assert!(!known("https://h:1", &reset).permanent);
    }

    #[test]
    fn hosts_are_read_from_urls() {
        assert_eq!(host("https://build-7:50051"), "build-7");
        assert_eq!(host("http://[::1]:7/x"), "::1");
        assert_eq!(host("http://h"), "h");
    }
}

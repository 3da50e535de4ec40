//! Accepting connections, with bounds a client cannot talk its way around:
//!
//! - at most `--max-connections` at once: each accepted connection carries a semaphore permit,
//!   released when the connection is dropped; past the limit a new connection is closed at once
//!   (one log line per burst, not one per connection), so idle sockets cannot use up the
//!   server's file descriptors (git and SQLite need some too);
//! - a handshake deadline: a connection must finish its TLS and HTTP/2 handshake and send its
//!   first request within `--handshake-timeout`, or it is closed ([`ConnInfo::spoke`] is called
//!   by [`crate::grpc::edge::Edge`] when a request arrives). A connection whose request is
//!   refused as unauthenticated ([`ConnInfo::refused`]) is closed a handshake timeout later,
//!   whatever it sends next, so that peers without a credential cannot hold the connection
//!   slots. After that, HTTP/2 keepalive pings (set on the tonic server) find peers that went
//!   away;
//! - Nagle's algorithm off on every accepted connection: a message pushed on a stream right
//!   after another must not wait ~40 ms for the peer's delayed ACK (tonic's `tcp_nodelay`
//!   applies only to listeners it binds itself).
//!
//! An accept error that is about the process, not the peer (out of file descriptors), pauses
//! accepting for a moment instead of spinning on it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long accepting pauses after an accept error of the process (e.g. no file descriptor).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The bounds on accepted connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Time from accept to the first request.
    pub handshake_timeout: Duration,
}

/// The listener's connections, within [`Limits`].
pub struct Incoming {
    /// Shared: a server that changes role serves its phases one after the other on one
    /// socket, so a connection made between them waits in the backlog, never refused.
    listener: Arc<TcpListener>,
    limits: Limits,
    permits: Arc<Semaphore>,
    /// Connections closed at the limit since it was last below it (the burst so far).
    refused: u64,
    /// Accept errors since the last accepted connection.
    accept_errors: u64,
    pause: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    pub fn new(listener: impl Into<Arc<TcpListener>>, limits: Limits) -> Self {
        Self {
            listener: listener.into(),
            limits,
            permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            refused: 0,
            accept_errors: 0,
            pause: None,
        }
    }

    fn accepted(&mut self, stream: TcpStream) -> Option<Conn> {
        if self.accept_errors > 0 {
            tracing::info!(errors = self.accept_errors, "accepting connections again");
            self.accept_errors = 0;
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            if self.refused == 0 {
                tracing::warn!(
                    max_connections = self.limits.max_connections,
                    "connection limit reached (--max-connections): closing new connections \
                     until some close"
                );
            }
            self.refused += 1;
            return None;
        };
        if self.refused > 0 {
            tracing::info!(
                refused = self.refused,
                "below the connection limit again; connections closed at the limit meanwhile"
            );
            self.refused = 0;
        }
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot turn Nagle's algorithm off");
        }
        Some(Conn::new(stream, permit, self.limits.handshake_timeout))
    }
}

/// An error of one connection (the peer gave up before the accept), not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = this.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, _peer)) => {
                    if let Some(conn) = this.accepted(stream) {
                        return Poll::Ready(Some(Ok(conn)));
                    }
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    if this.accept_errors == 0 {
                        tracing::error!(error = %e, "cannot accept connections; pausing briefly");
                    }
                    this.accept_errors += 1;
                    this.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                }
            }
        }
    }
}

/// What a request knows of its connection (in its extensions, as tonic puts a connection's
/// [`Connected::ConnectInfo`] there).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub tcp: TcpConnectInfo,
    spoken: Arc<AtomicBool>,
    refused: Arc<AtomicBool>,
}

impl ConnInfo {
    /// A request arrived on the connection: the handshake deadline no longer applies (unless
    /// the connection was refused).
    pub fn spoke(&self) {
        if !self.refused.load(Ordering::Relaxed) {
            self.spoken.store(true, Ordering::Relaxed);
        }
    }

    /// A request on the connection was refused as unauthenticated: the connection is closed a
    /// handshake timeout from now (time for the refusal to reach the peer), whatever follows.
    pub fn refused(&self) {
        self.refused.store(true, Ordering::Relaxed);
        self.spoken.store(false, Ordering::Relaxed);
    }
}

/// An accepted connection: closed when its handshake deadline passes before its first request;
/// holds its slot under the connection limit until dropped.
pub struct Conn {
    inner: TcpStream,
    info: ConnInfo,
    deadline: Option<Pin<Box<Sleep>>>,
    handshake_timeout: Duration,
    /// Whether the deadline after a refusal is set.
    closing: bool,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    fn new(inner: TcpStream, permit: OwnedSemaphorePermit, handshake_timeout: Duration) -> Self {
        let info = ConnInfo {
            tcp: inner.connect_info(),
            spoken: Arc::new(AtomicBool::new(false)),
            refused: Arc::new(AtomicBool::new(false)),
        };
        Self {
            inner,
            info,
            deadline: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
            handshake_timeout,
            closing: false,
            _permit: permit,
        }
    }

    /// Fails once the handshake deadline has passed without a request; registers the deadline
    /// with `cx` otherwise, so that an idle connection is woken (and closed) when it passes.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.closing && self.info.refused.load(Ordering::Relaxed) {
            self.closing = true;
            self.deadline = Some(Box::pin(tokio::time::sleep(self.handshake_timeout)));
        }
        let Some(deadline) = self.deadline.as_mut() else {
            return Ok(());
        };
        if self.info.spoken.load(Ordering::Relaxed) {
            self.deadline = None;
            return Ok(());
        }
        if deadline.as_mut().poll(cx).is_ready() {
            tracing::debug!(
                peer = ?self.info.tcp.remote_addr(),
                "closing a connection that sent no request within the handshake timeout"
            );
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within the handshake timeout",
            ));
        }
        Ok(())
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_deadline(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_deadline(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_deadline(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio_stream::StreamExt;

    use super::*;

    fn limits(max_connections: usize, handshake_ms: u64) -> Limits {
        Limits {
            max_connections,
            handshake_timeout: Duration::from_millis(handshake_ms),
        }
    }

    async fn listen(limits: Limits) -> (Pin<Box<Incoming>>, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (Box::pin(Incoming::new(listener, limits)), addr)
    }

    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let (mut incoming, addr) = listen(limits(8, 60_000)).await;
        let client = TcpStream::connect(addr).await.expect("connect");
        let conn = incoming.next().await.expect("conn").expect("ok");
        assert!(conn.inner.nodelay().expect("nodelay"));
        // A plain accept leaves it on, so the check above means something.
        assert!(!client.nodelay().expect("nodelay"));
    }

    #[tokio::test]
    async fn past_the_limit_connections_are_closed_until_a_slot_frees() {
        let (mut incoming, addr) = listen(limits(1, 60_000)).await;
        let _first_client = TcpStream::connect(addr).await.expect("connect");
        let first = incoming.next().await.expect("first").expect("ok");
        let mut second = TcpStream::connect(addr).await.expect("connect");
        let mut third = TcpStream::connect(addr).await.expect("connect");
        // Accepting goes on (closing both) until a connection fits again.
        let next = tokio::spawn(async move { incoming.next().await.map(|c| c.is_ok()) });
        let mut buf = [0u8; 1];
        assert_eq!(second.read(&mut buf).await.expect("eof"), 0, "closed");
        assert_eq!(third.read(&mut buf).await.expect("eof"), 0, "closed");
        drop(first);
        let _fourth = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(
            next.await.expect("join"),
            Some(true),
            "accepted after a slot freed"
        );
    }

    #[tokio::test]
    async fn a_connection_without_a_request_fails_at_its_deadline() {
        let (mut incoming, addr) = listen(limits(8, 50)).await;
        let _client = TcpStream::connect(addr).await.expect("connect");
        let mut conn = incoming.next().await.expect("conn").expect("ok");
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // One that spoke in time is left alone.
        let _client2 = TcpStream::connect(addr).await.expect("connect");
        let mut spoken = incoming.next().await.expect("conn").expect("ok");
        spoken.connect_info().spoke();
        let read = tokio::time::timeout(Duration::from_millis(200), spoken.read(&mut buf)).await;
        assert!(read.is_err(), "still waiting for data, not failed");
    }
}

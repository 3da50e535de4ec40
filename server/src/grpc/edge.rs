//! What every gRPC call goes through first, around both services (a plain `tower` service
//! wrapper, so tonic needs no extra layer types):
//!
//! it tells the connection a request arrived ([`ConnInfo::spoke`]), which lifts the
//! connection's handshake deadline, and puts the connection's [`TcpConnectInfo`] where
//! `Request::remote_addr` finds it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::listener::ConnInfo;

/// A service with the edge's bookkeeping around it.
#[derive(Clone, Debug)]
pub struct Edge<S> {
    inner: S,
}

impl<S> Edge<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for Edge<S> {
    const NAME: &'static str = S::NAME;
}

/// The connection a request came in on, with or without TLS.
fn conn_info<B>(req: &http::Request<B>) -> Option<&ConnInfo> {
    let ext = req.extensions();
    ext.get::<ConnInfo>()
        .or_else(|| ext.get::<TlsConnectInfo<ConnInfo>>().map(|t| t.get_ref()))
}

impl<S, B, RB> Service<http::Request<B>> for Edge<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some(info) = conn_info(&req).cloned() {
            info.spoke();
            req.extensions_mut().insert::<TcpConnectInfo>(info.tcp);
        }
        Box::pin(self.inner.call(req))
    }
}


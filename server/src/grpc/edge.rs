//! What every gRPC call goes through first, around both services (a plain `tower` service
//! wrapper, so tonic needs no extra layer types):
//!
//! - it names the call in the request's extensions ([`CallPath`]), for the authentication
//!   interceptor's allow-list of what the viewer token may call;
//! - it tells the connection a request arrived ([`ConnInfo::spoke`]), which lifts the
//!   connection's handshake deadline, and puts the connection's [`TcpConnectInfo`] where
//!   `Request::remote_addr` finds it;
//! - it answers a request message over the size limit with `RESOURCE_EXHAUSTED` and a message a
//!   person can act on. tonic's decoder says `OUT_OF_RANGE` ("decoded message length too
//!   large"), but gRPC's code for a message over the receiver's limit is `RESOURCE_EXHAUSTED`.
//!   This covers every refusal that ends a call before its answer starts (a unary request, or
//!   a handler returning its stream's error); the heartbeat stream, whose refusal travels in
//!   the trailers of an answer under way, maps what it reads with [`oversized`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::grpc::listener::ConnInfo;

/// The path of the call a request makes (`/pipeline.v1.ControlService/GetTask`), put in the
/// request's extensions for the authentication interceptor, which sees no URI.
#[derive(Clone, Debug)]
pub struct CallPath(pub String);

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

/// tonic's own refusal of a request message over the limit (`OUT_OF_RANGE`) as
/// `RESOURCE_EXHAUSTED`, keeping its numbers; any other status unchanged.
pub fn oversized(status: Status) -> Status {
    if status.code() != tonic::Code::OutOfRange {
        return status;
    }
    match status
        .message()
        .strip_prefix("Error, decoded message length too large: ")
    {
        Some(rest) => Status::resource_exhausted(format!(
            "the request message is too large: {rest}; send less in one request"
        )),
        None => status,
    }
}

/// The connection a request came in on, with or without TLS.
fn conn_info<B>(req: &http::Request<B>) -> Option<&ConnInfo> {
    let ext = req.extensions();
    ext.get::<ConnInfo>()
        .or_else(|| ext.get::<TlsConnectInfo<ConnInfo>>().map(|t| t.get_ref()))
}

/// Rewrites a trailers-only answer (a refusal before any message) that is tonic's decoder
/// refusing an oversized message.
fn map_oversized<B>(resp: &mut http::Response<B>) {
    if resp.headers().get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
        return;
    }
    let Some(status) = Status::from_header_map(resp.headers()) else {
        return;
    };
    let mapped = oversized(status);
    if mapped.code() == tonic::Code::ResourceExhausted {
        let headers = resp.headers_mut();
        headers.remove("grpc-status");
        headers.remove("grpc-message");
        headers.remove("grpc-status-details-bin");
        if let Err(e) = mapped.add_header(headers) {
            tracing::warn!(error = %e, "cannot rewrite an oversized-message status");
        }
    }
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
        let path = CallPath(req.uri().path().to_owned());
        req.extensions_mut().insert(path);
        let info = conn_info(&req).cloned();
        if let Some(info) = &info {
            info.spoke();
            req.extensions_mut()
                .insert::<TcpConnectInfo>(info.tcp.clone());
        }
        let call = self.inner.call(req);
        Box::pin(async move {
            let mut resp = call.await?;
            if let Some(info) = info
                && unauthenticated(&resp)
            {
                info.refused();
            }
            map_oversized(&mut resp);
            Ok(resp)
        })
    }
}

/// Whether an answer refuses its call as unauthenticated (a trailers-only answer, as every
/// refusal before a handler's answer starts is).
fn unauthenticated<RB>(resp: &http::Response<RB>) -> bool {
    resp.headers()
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"16")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decoders_refusal_becomes_resource_exhausted_with_its_numbers() {
        let tonic_says = Status::out_of_range(
            "Error, decoded message length too large: found 5242885 bytes, the limit is: \
             4194304 bytes",
        );
        let mapped = oversized(tonic_says);
        assert_eq!(mapped.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            mapped.message(),
            "the request message is too large: found 5242885 bytes, the limit is: 4194304 \
             bytes; send less in one request"
        );
        let other = oversized(Status::out_of_range("seq 9 is out of range"));
        assert_eq!(other.code(), tonic::Code::OutOfRange, "only that refusal");
    }

    #[test]
    fn a_trailers_only_answer_is_rewritten() {
        let mut resp: http::Response<()> = Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes",
        )
        .into_http();
        map_oversized(&mut resp);
        let status = Status::from_header_map(resp.headers()).expect("status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("found 9 bytes"),
            "{}",
            status.message()
        );
        let mut ok: http::Response<()> = Status::not_found("no task t-9").into_http();
        map_oversized(&mut ok);
        let status = Status::from_header_map(ok.headers()).expect("status");
        assert_eq!(status.code(), tonic::Code::NotFound);
    }
}

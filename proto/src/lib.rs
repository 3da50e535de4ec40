//! The wire protocol of pipeline: the `pipeline.v1` gRPC package, generated at build time from
//! `proto/pipeline/v1/pipeline.proto`.
//!
//! Only this crate and the `grpc` modules of the binaries know these types; the domain converts
//! them at the edge with validating `TryFrom` implementations. [`client_tls`] is the one place
//! clients (runner, `pipelinectl`) set up TLS; [`reach`] is their one reading of a server they
//! cannot reach (a mistake to fix, or something waiting heals).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod codec;
pub mod reach;
pub mod servers;

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("pipeline.v1");

    /// The encoded `FileDescriptorSet` of `pipeline.v1` (with what it imports), for the
    /// server's gRPC reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/pipeline_descriptor.bin"));

    /// The full names of the services, as gRPC health and reflection name them.
    pub const SERVICE_NAMES: [&str; 2] =
        ["pipeline.v1.ControlService", "pipeline.v1.RunnerService"];
}

/// TLS settings for a client of `url`: with an `https://` URL, trust `ca` (or the system's
/// roots); `--tls-ca` with a plain `http://` URL is a mistake worth saying.
pub fn client_tls(
    url: &str,
    ca: Option<&std::path::Path>,
) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
    if !url.starts_with("https://") {
        return match ca {
            Some(_) => Err(format!(
                "--tls-ca is set but the server URL {url} is not https://; use https://"
            )),
            None => Ok(None),
        };
    }
    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
    if let Some(ca) = ca {
        let pem =
            std::fs::read(ca).map_err(|e| format!("cannot read --tls-ca {}: {e}", ca.display()))?;
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
    }
    Ok(Some(tls))
}

/// The response metadata a server that takes no early offers (`--early-builds` off) puts on
/// its `FAILED_PRECONDITION` answer to `OfferCommit`, telling it apart from a lease that is no
/// longer the runner's: the runner stops offering to that server.
pub const OFFERS_OFF_METADATA: &str = "pipeline-offers";

/// `OfferCommit`'s answer from a server that takes no early offers.
pub fn offers_off() -> tonic::Status {
    let mut status = tonic::Status::failed_precondition(
        "this server does not take early offers (--early-builds is off)",
    );
    status.metadata_mut().insert(
        OFFERS_OFF_METADATA,
        tonic::metadata::MetadataValue::from_static("off"),
    );
    status
}

/// Whether `status` is [`offers_off`]'s.
pub fn is_offers_off(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && status
            .metadata()
            .get(OFFERS_OFF_METADATA)
            .is_some_and(|v| v.as_bytes() == b"off")
}

/// The protocol version a runner must announce at registration; bumped on breaking changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// What a client should do about a call that failed: the one reading of a gRPC status that
/// runners and `pipelinectl` share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The server is away, busy or failed inside: try again later (with back-off).
    Retry,
    /// The server does not know the caller (it restarted): register again, then retry.
    Unregistered,
    /// The request cannot succeed as it is (a lease that is no longer the caller's, a malformed
    /// or oversized request, a state that does not allow it): drop it.
    Refused,
    /// The caller may not do this at all (no or a revoked credential, the wrong role, a server
    /// that lacks the call): stop.
    Fatal,
}

/// How to take a failed call's status.
pub fn classify(status: &tonic::Status) -> Disposition {
    use tonic::Code;
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::ResourceExhausted
        | Code::Ok => Disposition::Retry,
        Code::NotFound => Disposition::Unregistered,
        Code::FailedPrecondition
        | Code::InvalidArgument
        | Code::AlreadyExists
        | Code::OutOfRange => Disposition::Refused,
        Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented | Code::DataLoss => {
            Disposition::Fatal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_one_reading() {
        use tonic::{Code, Status};
        for (code, want) in [
            (Code::Unavailable, Disposition::Retry),
            (Code::Internal, Disposition::Retry),
            (Code::ResourceExhausted, Disposition::Retry),
            (Code::NotFound, Disposition::Unregistered),
            (Code::FailedPrecondition, Disposition::Refused),
            (Code::InvalidArgument, Disposition::Refused),
            (Code::Unauthenticated, Disposition::Fatal),
            (Code::PermissionDenied, Disposition::Fatal),
        ] {
            assert_eq!(classify(&Status::new(code, "x")), want, "{code:?}");
        }
    }
}

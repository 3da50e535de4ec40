//! The wire protocol of pipeline: the `pipeline.v1` gRPC package, generated at build time from
//! `proto/pipeline/v1/pipeline.proto`.
//!
//! Only this crate and the `grpc` modules of the binaries know these types; the domain converts
//! them at the edge with validating `TryFrom` implementations. [`client_tls`] is the one place
//! clients (runner, `pipelinectl`) set up TLS.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("pipeline.v1");
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

/// The protocol version a runner must announce at registration; bumped on breaking changes.
pub const PROTOCOL_VERSION: u32 = 1;

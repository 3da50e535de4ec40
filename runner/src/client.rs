//! The runner's gRPC client: every call carries `authorization: Bearer <token>`, the
//! registration token until the server issues the runner its own credential.

use std::sync::{Arc, RwLock};

use pipeline_proto::v1::runner_service_client::RunnerServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The credential every call presents; shared by the session and its jobs.
#[derive(Clone, Default)]
pub struct Bearer(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl Bearer {
    /// Presents `token` from now on (a token that is not valid header text is dropped).
    pub fn set(&self, token: &str) {
        let value = format!("Bearer {}", token.trim()).parse().ok();
        if let Ok(mut current) = self.0.write() {
            *current = value;
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = self.0.read().ok().and_then(|v| v.clone()) {
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

/// The runner's client of the runner API.
pub type Client = RunnerServiceClient<InterceptedService<Channel, Bearer>>;

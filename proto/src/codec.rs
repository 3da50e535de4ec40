//! The protobuf codec of every RPC: prost's, with small per-call buffers.
//!
//! tonic allocates an encode and a decode buffer for every call up front, 8 KiB each by default,
//! and keeps them for the call's life. A runner holds two calls open all the time (its work
//! stream and its heartbeat stream), whose messages are a few dozen bytes but for the odd
//! prompt; with 10,000 runners their streams took 30 KiB a runner of the server's memory,
//! 8.5 KiB with these buffers (and the work stream's channel gone; `pipeline-bench fleet`). A
//! call starts with [`BUFFER_SIZE`] and grows in steps of it when a message is larger (a
//! prompt, a bundle chunk), which costs a few more allocations for those and nothing for the
//! rest.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// A call's buffers start at this size and grow in steps of it.
pub const BUFFER_SIZE: usize = 1024;

/// How much a stream gathers from ready messages before it sends them (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost's codec with [`BUFFER_SIZE`] buffers (named by the generated code, `codec_path`).
#[derive(Debug)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}

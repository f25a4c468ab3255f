//! The protobuf codec of the KMS services: prost's, except that a request body that
//! does not decode as the method's message is the caller's malformed input,
//! INVALID_ARGUMENT, instead of prost's INTERNAL (which would page an operator for a
//! client's bug). The answer names neither the message nor the field prost choked on.

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// What a caller hears about an undecodable body.
pub const MALFORMED_BODY: &str = "the request body is not a valid protobuf message for this method";

#[derive(Debug, Clone)]
pub struct StrictCodec<T, U> {
    _pd: std::marker::PhantomData<(T, U)>,
}

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self {
            _pd: std::marker::PhantomData,
        }
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(ProstDecoder::new(BufferSettings::default()))
    }
}

pub struct StrictDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // prost's only failure is a body that does not decode; its detail stays here.
        self.0
            .decode(buf)
            .map_err(|_| Status::invalid_argument(MALFORMED_BODY))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

//! How a Tether connection is carried: QUIC, or TLS 1.3 over TCP with yamux streams.
//!
//! Both transports give the broker and the agent the same thing: one mutual-TLS
//! connection (ALPN `tether/1`, the same certificates and verifiers) carrying
//! bidirectional streams, which either side may reset with a code, and a connection close
//! with an application code and reason. [`Connection`], [`SendStream`] and [`RecvStream`]
//! are that shape with QUIC's vocabulary: the errors are quinn's own types, so code above
//! this crate reads the same whichever transport the session took.
//!
//! - [`Transport::Quic`] is quinn, unchanged.
//! - [`Transport::Tcp`] is TLS over TCP (tokio-rustls) with yamux (the multiplexer; its
//!   flow control and windows) and a thin record layer on each stream for what yamux has
//!   no words for: reset and stop-sending codes, an explicit end of stream, and the
//!   connection close code (`docs/PROTOCOL.md` §13; [`tcp`]).

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod muxio;
pub mod tcp;

pub use quinn::{
    ApplicationClose, Chunk, ConnectionError, ReadError, ReadExactError, StoppedError, VarInt,
    WriteError,
};

/// The transport a connection uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// QUIC over UDP.
    Quic,
    /// TLS 1.3 over TCP with yamux streams.
    Tcp,
}

impl Transport {
    /// Its name in APIs, metrics and configuration: `quic` or `tcp`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Transport, String> {
        match s {
            "quic" => Ok(Transport::Quic),
            "tcp" => Ok(Transport::Tcp),
            other => Err(format!("unknown transport {other:?} (quic or tcp)")),
        }
    }
}

/// The stream was already finished, reset or stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClosedStream;

impl fmt::Display for ClosedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("closed stream")
    }
}

impl std::error::Error for ClosedStream {}

impl From<quinn::ClosedStream> for ClosedStream {
    fn from(_: quinn::ClosedStream) -> ClosedStream {
        ClosedStream
    }
}

/// A connection on either transport. Cloning it clones the handle.
#[derive(Clone, Debug)]
pub enum Connection {
    /// QUIC.
    Quic(quinn::Connection),
    /// TLS over TCP with yamux.
    Tcp(tcp::Connection),
}

impl From<quinn::Connection> for Connection {
    fn from(c: quinn::Connection) -> Connection {
        Connection::Quic(c)
    }
}

impl From<tcp::Connection> for Connection {
    fn from(c: tcp::Connection) -> Connection {
        Connection::Tcp(c)
    }
}

impl Connection {
    /// The transport.
    pub fn transport(&self) -> Transport {
        match self {
            Connection::Quic(_) => Transport::Quic,
            Connection::Tcp(_) => Transport::Tcp,
        }
    }

    /// Open a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Connection::Quic(c) => c
                .open_bi()
                .await
                .map(|(s, r)| (SendStream::Quic(s), RecvStream::Quic(r))),
            Connection::Tcp(c) => c
                .open_bi()
                .await
                .map(|(s, r)| (SendStream::Tcp(Box::new(s)), RecvStream::Tcp(Box::new(r)))),
        }
    }

    /// The next bidirectional stream the peer opens. A future no larger than quinn's own
    /// (a session driver waits in it for the connection's whole life).
    pub fn accept_bi(&self) -> AcceptBi<'_> {
        match self {
            Connection::Quic(c) => AcceptBi::Quic {
                inner: c.accept_bi(),
            },
            Connection::Tcp(c) => AcceptBi::Tcp {
                inner: c.accept_bi(),
            },
        }
    }

    /// Close with an application `code` and `reason`; a no-op once closed.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        match self {
            Connection::Quic(c) => c.close(code, reason),
            Connection::Tcp(c) => c.close(code, reason),
        }
    }

    /// Why the connection closed, if it did.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        match self {
            Connection::Quic(c) => c.close_reason(),
            Connection::Tcp(c) => c.close_reason(),
        }
    }

    /// Wait for the connection to close; why it did.
    pub async fn closed(&self) -> ConnectionError {
        match self {
            Connection::Quic(c) => c.closed().await,
            Connection::Tcp(c) => c.closed().await,
        }
    }

    /// An id unique among live connections of this process.
    pub fn stable_id(&self) -> usize {
        match self {
            Connection::Quic(c) => c.stable_id(),
            Connection::Tcp(c) => c.stable_id(),
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Connection::Quic(c) => c.remote_address(),
            Connection::Tcp(c) => c.remote_address(),
        }
    }

    /// The certificate chain the peer presented (leaf first), if any. Over TCP only the
    /// client side keeps it: a server reads it from the TLS stream before wrapping it
    /// ([`tcp::Connection::server`]).
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        match self {
            Connection::Quic(c) => c
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                .map(|b| *b),
            Connection::Tcp(c) => c.peer_certificates().map(<[_]>::to_vec),
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Connection::accept_bi`]'s future.
    #[project = AcceptBiProj]
    pub enum AcceptBi<'a> {
        /// QUIC.
        Quic { #[pin] inner: quinn::AcceptBi<'a> },
        /// TLS over TCP.
        Tcp { inner: tcp::AcceptBi<'a> },
    }
}

impl std::future::Future for AcceptBi<'_> {
    type Output = Result<(SendStream, RecvStream), ConnectionError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AcceptBiProj::Quic { inner } => inner
                .poll(cx)
                .map(|r| r.map(|(s, r)| (SendStream::Quic(s), RecvStream::Quic(r)))),
            AcceptBiProj::Tcp { inner } => Pin::new(inner).poll(cx).map(|r| {
                r.map(|(s, r)| (SendStream::Tcp(Box::new(s)), RecvStream::Tcp(Box::new(r))))
            }),
        }
    }
}

/// The sending half of a stream.
#[derive(Debug)]
pub enum SendStream {
    /// QUIC.
    Quic(quinn::SendStream),
    /// TLS over TCP (boxed: an idle session's driver holds its streams, and this keeps
    /// them QUIC's size).
    Tcp(Box<tcp::SendStream>),
}

impl SendStream {
    /// The stream's id on its connection (QUIC's stream id, yamux's on TCP).
    pub fn id(&self) -> u64 {
        match self {
            SendStream::Quic(s) => VarInt::from(s.id()).into_inner(),
            SendStream::Tcp(s) => s.id(),
        }
    }

    /// Write all of `buf`.
    pub async fn write_all(&mut self, buf: &[u8]) -> Result<(), WriteError> {
        match self {
            SendStream::Quic(s) => s.write_all(buf).await,
            SendStream::Tcp(s) => s.write_all(buf).await,
        }
    }

    /// End the stream after what was written.
    pub fn finish(&mut self) -> Result<(), ClosedStream> {
        match self {
            SendStream::Quic(s) => s.finish().map_err(Into::into),
            SendStream::Tcp(s) => s.finish(),
        }
    }

    /// Abandon the stream with `code`.
    pub fn reset(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        match self {
            SendStream::Quic(s) => s.reset(code).map_err(Into::into),
            SendStream::Tcp(s) => s.reset(code),
        }
    }

    /// Resolves when the peer stopped the stream (`Some(code)`) or, after
    /// [`SendStream::finish`], received everything (`None`).
    pub fn stopped(
        &self,
    ) -> impl std::future::Future<Output = Result<Option<VarInt>, StoppedError>> + Send + 'static
    {
        enum Either<A, B> {
            A(A),
            B(B),
        }
        let fut = match self {
            SendStream::Quic(s) => Either::A(s.stopped()),
            SendStream::Tcp(s) => Either::B(s.stopped()),
        };
        async move {
            match fut {
                Either::A(f) => f.await,
                Either::B(f) => f.await,
            }
        }
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            SendStream::Quic(s) => AsyncWrite::poll_write(Pin::new(s), cx, buf),
            SendStream::Tcp(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_flush(cx),
            SendStream::Tcp(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_shutdown(cx),
            SendStream::Tcp(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// The receiving half of a stream.
#[derive(Debug)]
pub enum RecvStream {
    /// QUIC.
    Quic(quinn::RecvStream),
    /// TLS over TCP (boxed, as [`SendStream::Tcp`]).
    Tcp(Box<tcp::RecvStream>),
}

impl RecvStream {
    /// Read into `buf`; `None` at the end of the stream.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ReadError> {
        match self {
            RecvStream::Quic(s) => s.read(buf).await,
            RecvStream::Tcp(s) => s.read(buf).await,
        }
    }

    /// Fill `buf` exactly.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadExactError> {
        match self {
            RecvStream::Quic(s) => s.read_exact(buf).await,
            RecvStream::Tcp(s) => s.read_exact(buf).await,
        }
    }

    /// At most `max` bytes, in order; `None` at the end of the stream.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, ReadError> {
        match self {
            RecvStream::Quic(s) => s
                .read_chunk(max, true)
                .await
                .map(|c| c.map(|c: Chunk| c.bytes)),
            RecvStream::Tcp(s) => s.read_chunk(max).await,
        }
    }

    /// Ask the peer to stop sending, with `code`.
    pub fn stop(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        match self {
            RecvStream::Quic(s) => s.stop(code).map_err(Into::into),
            RecvStream::Tcp(s) => s.stop(code),
        }
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RecvStream::Quic(s) => AsyncRead::poll_read(Pin::new(s), cx, buf),
            RecvStream::Tcp(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

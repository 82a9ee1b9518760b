//! The TCP transport: TLS 1.3 over TCP, yamux streams, and a record layer per stream.
//!
//! # Wire format (`docs/PROTOCOL.md` §13)
//!
//! After the TLS handshake (ALPN `tether/1`, the same certificates as QUIC) both sides
//! speak yamux: the agent is the yamux client, the broker the server. Every yamux stream
//! starts with one byte written by the side that opened it (with its first record):
//!
//! - [`KIND_STREAM`] (`0x00`): an application stream, the QUIC bidirectional stream's
//!   equivalent. Each direction is then a sequence of records `type (u8) | length (u32,
//!   big-endian) | payload`:
//!   - `DATA` (`0x00`): stream bytes (1 to [`MAX_RECORD`] bytes);
//!   - `FIN` (`0x01`, empty): the end of this direction (QUIC's FIN);
//!   - `RESET` (`0x02`, 8-byte code): this direction abandoned (QUIC's `RESET_STREAM`).
//!
//!   A side closes its yamux half once it has sent `FIN` or `RESET` and has read the
//!   peer's `FIN` or `RESET`. A yamux half closed without either record is the connection
//!   lost.
//! - [`KIND_CONTROL`] (`0x02`): what must reach a stream's sender even while nobody reads
//!   the stream, each side's at most one such stream, opened when first needed, a sequence
//!   of 13-byte messages `type (u8) | yamux stream id (u32) | code (u64)`:
//!   - `STOP` (`0x03`): stop sending on that stream (QUIC's `STOP_SENDING`); the sender
//!     answers with `RESET` carrying the code;
//!   - `ACK` (`0x04`, code 0): that stream's `FIN` was read, so every byte before it
//!     arrived (what QUIC's acknowledgements tell `stopped()`).
//! - [`KIND_CLOSE`] (`0x01`): the connection closes; the payload is the application code
//!   (u64, big-endian) and a UTF-8 reason (at most [`MAX_REASON`] bytes), then the
//!   stream's end. QUIC's `CONNECTION_CLOSE` (application) with the same code and reason.
//!   The closing side then sends yamux `GoAway`, TLS `close_notify` and closes TCP.
//!
//! A TCP connection that ends without a close stream is reported as
//! [`ConnectionError::Reset`], or [`ConnectionError::TimedOut`] when the kernel gave up
//! on unacknowledged data (`TCP_USER_TIMEOUT`, the QUIC idle timeout's equivalent).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_channel::mpsc;
use futures_util::io::AsyncReadExt as _;
use futures_util::StreamExt as _;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::muxio::MuxIo;
use crate::{ApplicationClose, ClosedStream, ConnectionError, ReadError, ReadExactError};
use crate::{StoppedError, VarInt, WriteError};

/// First byte of an application stream.
pub const KIND_STREAM: u8 = 0x00;
/// First byte of the connection-close stream.
pub const KIND_CLOSE: u8 = 0x01;
/// First byte of a control stream.
pub const KIND_CONTROL: u8 = 0x02;
/// A control message's length.
const CONTROL_LEN: usize = 13;
/// Largest record payload.
pub const MAX_RECORD: usize = 1 << 20;
/// Largest close reason.
pub const MAX_REASON: usize = 1024;
/// The payload size the sender writes at most per `DATA` record.
const WRITE_CHUNK: usize = 16 * 1024;
/// Bytes a stream may have queued for its writer beyond yamux's window.
const SEND_BUDGET: usize = 64 * 1024;
/// How long the closing side tries to deliver its close before dropping the connection.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// How long an opened stream may take to say what it is.
const KIND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream that lost its connection waits for the connection's close reason.
const REASON_WAIT: Duration = Duration::from_millis(500);

const REC_DATA: u8 = 0x00;
const REC_FIN: u8 = 0x01;
const REC_RESET: u8 = 0x02;
const REC_STOP: u8 = 0x03;
const REC_ACK: u8 = 0x04;
const HEADER: usize = 5;

/// The TLS stream under yamux, either side.
type Tls = tokio_rustls::TlsStream<TcpStream>;
type Mux = yamux::Connection<Compat<MuxIo<Tls>>>;
type Io = Compat<yamux::Stream>;

/// Settings of one side's yamux connection.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Streams the peer may have open at once; more are refused by yamux.
    pub max_streams: usize,
    /// The close code used when the peer breaks this mapping (an unknown stream kind or
    /// record).
    pub protocol_error: u64,
}

/// A TCP connection's handle. Cloning it clones the handle.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<ConnShared>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("tcp::Connection")
            .field("remote", &self.shared.remote)
            .field("closed", &self.close_reason())
            .finish()
    }
}

/// Accepted-but-not-taken streams and the task waiting in `accept_bi`.
type Inbound = (VecDeque<(SendStream, RecvStream)>, Option<std::task::Waker>);

struct ConnShared {
    remote: SocketAddr,
    certs: Option<Vec<CertificateDer<'static>>>,
    reason: Mutex<Option<ConnectionError>>,
    closed: Notify,
    cmds: mpsc::UnboundedSender<Cmd>,
    /// Classified inbound streams not yet accepted, and who waits for one. A queue under
    /// the lock rather than a channel: a channel keeps an allocation or two per connection
    /// even while empty.
    inbound: Mutex<Inbound>,
    protocol_error: u64,
    /// Inbound streams whose kind byte is still being read: the driver waits for them
    /// before deciding the connection merely dropped (a close stream may be among them).
    classifying: AtomicUsize,
    classified: Notify,
    /// Live streams by yamux id, for the peer's control messages.
    streams: Mutex<std::collections::HashMap<u32, std::sync::Weak<StreamShared>>>,
    /// Our control stream's queue, once opened.
    control: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    /// Streams that saw the connection go and wait for its reason.
    lost: Mutex<Vec<std::task::Waker>>,
}

enum Cmd {
    Open(oneshot::Sender<Result<yamux::Stream, ConnectionError>>),
    Close(VarInt, Bytes),
    PeerClosed,
}

impl ConnShared {
    /// Record why the connection ended, unless that is known already.
    fn set_reason(&self, reason: ConnectionError) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
            drop(r);
            self.closed.notify_waiters();
            // Streams nobody accepted never will be (and they hold this connection).
            let unaccepted =
                std::mem::take(&mut self.inbound.lock().unwrap_or_else(|e| e.into_inner()).0);
            drop(unaccepted);
            let lost = std::mem::take(&mut *self.lost.lock().unwrap_or_else(|e| e.into_inner()));
            for w in lost {
                w.wake();
            }
        }
    }

    /// Why the connection ended, or `None` with `cx` woken once that is known.
    fn reason_or_wait(&self, cx: &Context<'_>) -> Option<ConnectionError> {
        let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock `set_reason` takes after setting: no wake-up is missed.
        if let Some(r) = self.reason() {
            return Some(r);
        }
        if !lost.iter().any(|w| w.will_wake(cx.waker())) {
            lost.push(cx.waker().clone());
        }
        None
    }

    fn reason(&self) -> Option<ConnectionError> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Send a control message about stream `id`, opening the control stream first if
    /// needed.
    fn control(self: &Arc<Self>, kind: u8, id: u32, code: u64) {
        let mut msg = BytesMut::with_capacity(CONTROL_LEN);
        msg.put_u8(kind);
        msg.put_u32(id);
        msg.put_u64(code);
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        if control.is_none() {
            let Ok(handle) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let (tx, mut rx) = mpsc::unbounded::<Bytes>();
            let cmds = self.cmds.clone();
            handle.spawn(async move {
                use futures_util::io::AsyncWriteExt as _;
                let (open, opened) = oneshot::channel();
                if cmds.unbounded_send(Cmd::Open(open)).is_err() {
                    return;
                }
                drop(cmds);
                let Ok(Ok(mut stream)) = opened.await else {
                    return;
                };
                if stream.write_all(&[KIND_CONTROL]).await.is_err() {
                    return;
                }
                while let Some(msg) = rx.next().await {
                    if stream.write_all(&msg).await.is_err() {
                        return;
                    }
                }
            });
            *control = Some(tx);
        }
        if let Some(tx) = control.as_ref() {
            let _ = tx.unbounded_send(msg.freeze());
        }
    }

    fn stream(&self, id: u32) -> Option<Arc<StreamShared>> {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .and_then(std::sync::Weak::upgrade)
    }

    async fn closed(&self) -> ConnectionError {
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.reason() {
                return r;
            }
            notified.await;
        }
    }
}

impl Connection {
    /// Run the client side (the agent) over an established TLS connection.
    pub fn client(tls: tokio_rustls::client::TlsStream<TcpStream>, settings: Settings) -> Self {
        let certs = tls.get_ref().1.peer_certificates().map(|c| c.to_vec());
        let remote = tls
            .get_ref()
            .0
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        Connection::start(
            Tls::Client(tls),
            remote,
            certs,
            yamux::Mode::Client,
            settings,
        )
    }

    /// Run the server side (the broker) over an accepted TLS connection.
    ///
    /// The server keeps no copy of the client's certificates (rustls holds them for the
    /// connection's life already, and a copy costs about 1 KB a connection): read them
    /// from `tls` before calling this; [`Connection::peer_certificates`] is `None` here.
    pub fn server(
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        remote: SocketAddr,
        settings: Settings,
    ) -> Self {
        Connection::start(
            Tls::Server(tls),
            remote,
            None,
            yamux::Mode::Server,
            settings,
        )
    }

    fn start(
        tls: Tls,
        remote: SocketAddr,
        certs: Option<Vec<CertificateDer<'static>>>,
        mode: yamux::Mode,
        settings: Settings,
    ) -> Self {
        let mut cfg = yamux::Config::default();
        cfg.set_max_num_streams(settings.max_streams.max(1));
        cfg.set_max_connection_receive_window(Some(256 * 1024 * settings.max_streams.max(1)));
        // Coalesced writes and no periodic yamux pings: see `muxio`.
        let first_ping = matches!(mode, yamux::Mode::Client);
        let mux = yamux::Connection::new(MuxIo::new(tls, first_ping).compat(), cfg, mode);
        // futures' channels, not tokio's: tokio's allocates a block of 32 slots up front,
        // 7 KB a connection for these two (heaptrack), where futures' allocates a node per
        // message in flight.
        let (cmds, cmd_rx) = mpsc::unbounded();

        let shared = Arc::new(ConnShared {
            remote,
            certs,
            reason: Mutex::new(None),
            closed: Notify::new(),
            cmds,
            inbound: Mutex::default(),
            protocol_error: settings.protocol_error,
            classifying: AtomicUsize::new(0),
            classified: Notify::new(),
            streams: Mutex::default(),
            control: Mutex::new(None),
            lost: Mutex::default(),
        });
        tokio::spawn(drive(mux, Arc::downgrade(&shared), cmd_rx));
        Connection { shared }
    }

    /// Open a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        if let Some(r) = self.shared.reason() {
            return Err(r);
        }
        let (tx, rx) = oneshot::channel();
        if self.shared.cmds.unbounded_send(Cmd::Open(tx)).is_err() {
            return Err(self.lost().await);
        }
        let stream = match rx.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(self.lost().await),
        };
        let (send, recv) = split(stream, self.shared.clone());
        // The kind byte goes with the stream's first record (or its end, or a `STOP`),
        // not on its own: as a QUIC stream, it reaches the peer with the opener's first
        // write, and the two share one yamux flush, one TLS record and one system call.
        send.shared.outbox().opening = true;
        Ok((send, recv))
    }

    /// The next stream the peer opens. A small future (a session driver waits in it for
    /// the connection's whole life); one caller at a time.
    pub fn accept_bi(&self) -> AcceptBi<'_> {
        AcceptBi { conn: self }
    }

    async fn lost(&self) -> ConnectionError {
        tokio::time::timeout(REASON_WAIT, self.shared.closed())
            .await
            .unwrap_or(ConnectionError::Reset)
    }

    /// Close with `code` and `reason`: the close stream, then yamux `GoAway` and TLS
    /// `close_notify`. A no-op once closed.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        if self.shared.reason().is_some() {
            return;
        }
        self.shared.set_reason(ConnectionError::LocallyClosed);
        let reason = Bytes::copy_from_slice(&reason[..reason.len().min(MAX_REASON)]);
        let _ = self.shared.cmds.unbounded_send(Cmd::Close(code, reason));
    }

    /// Why the connection closed, if it did.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.shared.reason()
    }

    /// Wait until the connection closes.
    pub async fn closed(&self) -> ConnectionError {
        self.shared.closed().await
    }

    /// An id unique among live connections.
    pub fn stable_id(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.shared.remote
    }

    /// The peer's certificate chain, leaf first; `None` on the server side (see
    /// [`Connection::server`]).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.shared.certs.as_deref()
    }
}

/// [`Connection::accept_bi`]'s future.
pub struct AcceptBi<'a> {
    conn: &'a Connection,
}

impl Future for AcceptBi<'_> {
    type Output = Result<(SendStream, RecvStream), ConnectionError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let shared = &self.conn.shared;
        if let Some(r) = shared.reason() {
            return Poll::Ready(Err(r));
        }
        {
            let mut inbound = shared.inbound.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(pair) = inbound.0.pop_front() {
                if inbound.0.is_empty() {
                    inbound.0 = VecDeque::new();
                }
                return Poll::Ready(Ok(pair));
            }
            inbound.1 = Some(cx.waker().clone());
        }
        // No stream yet: woken by the next one, or when the connection ends.
        {
            match shared.reason_or_wait(cx) {
                Some(r) => Poll::Ready(Err(r)),
                None => Poll::Pending,
            }
        }
    }
}

/// How the driver's loop ended.
enum End {
    /// The close stream went out (or the linger ran out).
    Closed,
    /// The peer's close stream arrived.
    PeerClosed,
    /// The connection ended without a close.
    Lost(ConnectionError),
    /// Every handle is gone.
    Dropped,
}

/// The local close in progress.
struct Closing {
    code: VarInt,
    reason: Bytes,
    stream: Option<yamux::Stream>,
    record: Option<Bytes>,
    sent: bool,
}

/// Own the yamux connection: open streams on request, classify inbound ones, close.
#[allow(clippy::manual_async_fn)] // deliberate: see the comment on the `async move` block
fn drive(
    mut mux: Mux,
    shared: std::sync::Weak<ConnShared>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) -> impl Future<Output = ()> + Send {
    // An `async` block using the arguments where they are, not an `async fn`: an async
    // fn moves its arguments into locals and keeps both copies in its state, and the
    // yamux connection (with the TLS stream in it) is 1.5 KB: 3.7 KB a connection as an
    // `async fn`, against 2.1 KB like this.
    async move {
        let mut opens: VecDeque<oneshot::Sender<Result<yamux::Stream, ConnectionError>>> =
            VecDeque::new();
        // Boxed: only a closing connection needs it, and the driver lives as long as it.
        let mut closing: Option<Box<Closing>> = None;
        let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let end = std::future::poll_fn(|cx| {
            // Commands.
            loop {
                match cmds.poll_next_unpin(cx) {
                    Poll::Ready(Some(Cmd::Open(tx))) => opens.push_back(tx),
                    Poll::Ready(Some(Cmd::Close(code, reason))) => {
                        if closing.is_none() {
                            closing = Some(Box::new(Closing {
                                code,
                                reason,
                                stream: None,
                                record: None,
                                sent: false,
                            }));
                            linger = Some(Box::pin(tokio::time::sleep(CLOSE_LINGER)));
                        }
                    }
                    Poll::Ready(Some(Cmd::PeerClosed)) => return Poll::Ready(End::PeerClosed),
                    Poll::Ready(None) => {
                        if closing.is_none() {
                            return Poll::Ready(End::Dropped);
                        }
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if let Some(l) = linger.as_mut() {
                if l.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(End::Closed);
                }
            }
            if let Some(c) = closing.as_mut() {
                for tx in opens.drain(..) {
                    let _ = tx.send(Err(ConnectionError::LocallyClosed));
                }
                match poll_close_stream(&mut mux, c, cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(End::Closed),
                    Poll::Ready(Err(_)) => return Poll::Ready(End::Closed),
                    Poll::Pending => {}
                }
                if c.sent {
                    return Poll::Pending;
                }
            } else {
                while !opens.is_empty() {
                    match mux.poll_new_outbound(cx) {
                        Poll::Ready(r) => {
                            let tx = opens.pop_front().expect("not empty");
                            let _ = tx.send(r.map_err(|e| lost(&e)));
                        }
                        Poll::Pending => break,
                    }
                }
            }
            loop {
                match mux.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(stream))) => {
                        if closing.is_some() {
                            continue;
                        }
                        let Some(shared) = shared.upgrade() else {
                            return Poll::Ready(End::Dropped);
                        };
                        shared.classifying.fetch_add(1, Ordering::AcqRel);
                        tokio::spawn(classify(stream, shared));
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(End::Lost(lost(&e))),
                    Poll::Ready(None) => return Poll::Ready(End::Lost(ConnectionError::Reset)),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match end {
            End::Lost(e) => {
                // A close stream may still be being read: its reason wins over "lost".
                let wait = async {
                    loop {
                        let n = shared.classified.notified();
                        tokio::pin!(n);
                        n.as_mut().enable();
                        if shared.classifying.load(Ordering::Acquire) == 0 {
                            break;
                        }
                        n.await;
                    }
                };
                let _ = tokio::time::timeout(REASON_WAIT, wait).await;
                shared.set_reason(e);
            }
            End::Closed | End::Dropped => shared.set_reason(ConnectionError::LocallyClosed),
            End::PeerClosed => {}
        }
        for tx in opens.drain(..) {
            let _ = tx.send(Err(shared.reason().unwrap_or(ConnectionError::Reset)));
        }
        drop(shared);
        // yamux's GoAway, then TLS close_notify and the TCP FIN, within the linger.
        let _ =
            tokio::time::timeout(CLOSE_LINGER, std::future::poll_fn(|cx| mux.poll_close(cx))).await;
    }
}

/// Send the close stream, then close yamux (`GoAway`, then the socket).
fn poll_close_stream(
    mux: &mut Mux,
    c: &mut Closing,
    cx: &mut Context<'_>,
) -> Poll<Result<(), yamux::ConnectionError>> {
    if c.stream.is_none() && !c.sent {
        match mux.poll_new_outbound(cx) {
            Poll::Ready(Ok(s)) => {
                let mut rec = BytesMut::with_capacity(9 + c.reason.len());
                rec.put_u8(KIND_CLOSE);
                rec.put_u64(c.code.into_inner());
                rec.put_slice(&c.reason);
                c.stream = Some(s);
                c.record = Some(rec.freeze());
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
    if let Some(s) = c.stream.as_mut() {
        use futures_util::io::AsyncWrite as _;
        while let Some(rec) = c.record.as_mut().filter(|r| !r.is_empty()) {
            match Pin::new(&mut *s).poll_write(cx, rec) {
                Poll::Ready(Ok(n)) => {
                    let _ = rec.split_to(n);
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return drive_pending(mux, cx),
            }
        }
        match Pin::new(&mut *s).poll_close(cx) {
            Poll::Ready(_) => {
                c.stream = None;
                c.sent = true;
            }
            Poll::Pending => return drive_pending(mux, cx),
        }
    }
    mux.poll_close(cx)
}

/// Keep yamux moving (it only writes while polled) while a close waits for it.
fn drive_pending(mux: &mut Mux, cx: &mut Context<'_>) -> Poll<Result<(), yamux::ConnectionError>> {
    loop {
        match mux.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(_))) => continue,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
            Poll::Ready(None) => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    }
}

fn lost(e: &yamux::ConnectionError) -> ConnectionError {
    match e {
        yamux::ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            ConnectionError::TimedOut
        }
        yamux::ConnectionError::Io(io) => alert_received(io).unwrap_or(ConnectionError::Reset),
        yamux::ConnectionError::Closed => ConnectionError::LocallyClosed,
        _ => ConnectionError::Reset,
    }
}

/// The peer's TLS alert in an I/O error (a broker refusing the client certificate, during
/// the handshake or, as TLS 1.3 lets it, on the first read after): what QUIC reports as a
/// `CONNECTION_CLOSE` with the crypto error code `0x100 + alert`.
pub fn alert_received(e: &std::io::Error) -> Option<ConnectionError> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => {
            Some(ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: quinn::TransportErrorCode::crypto(u8::from(*alert)),
                frame_type: None,
                reason: Bytes::from(format!("TLS alert {alert:?}")),
            }))
        }
        _ => None,
    }
}

/// Read an inbound stream's kind: an application stream goes to `accept_bi`, a close
/// stream closes the connection with the peer's code.
async fn classify(mut stream: yamux::Stream, shared: Arc<ConnShared>) {
    let mut kind = [0u8; 1];
    let read = tokio::time::timeout(KIND_TIMEOUT, stream.read_exact(&mut kind)).await;
    match (read, kind[0]) {
        (Ok(Ok(())), KIND_STREAM) => {
            let pair = split(stream, shared.clone());
            let mut inbound = shared.inbound.lock().unwrap_or_else(|e| e.into_inner());
            inbound.0.push_back(pair);
            if let Some(w) = inbound.1.take() {
                w.wake();
            }
        }
        (Ok(Ok(())), KIND_CLOSE) => {
            let mut body = Vec::new();
            let limit = (8 + MAX_REASON) as u64;
            let read = tokio::time::timeout(
                KIND_TIMEOUT,
                futures_util::AsyncReadExt::take(&mut stream, limit).read_to_end(&mut body),
            )
            .await;
            if matches!(read, Ok(Ok(_))) && body.len() >= 8 {
                let code = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
                let reason = Bytes::copy_from_slice(&body[8..]);
                tracing::debug!(code, "peer closed the connection");
                shared.set_reason(ConnectionError::ApplicationClosed(ApplicationClose {
                    error_code: VarInt::from_u64(code).unwrap_or(VarInt::MAX),
                    reason,
                }));
                let _ = shared.cmds.unbounded_send(Cmd::PeerClosed);
            }
        }
        (Ok(Ok(())), KIND_CONTROL) => {
            done_classifying(&shared);
            let mut msg = [0u8; CONTROL_LEN];
            while stream.read_exact(&mut msg).await.is_ok() {
                let id = u32::from_be_bytes(msg[1..5].try_into().expect("4 bytes"));
                let code = u64::from_be_bytes(msg[5..].try_into().expect("8 bytes"));
                // The type first: an unknown message breaks the mapping whatever stream it
                // names (one that ended already, or none at all).
                match msg[0] {
                    REC_ACK => {
                        if let Some(s) = shared.stream(id) {
                            s.update(|st| st.acked = true);
                        }
                    }
                    REC_STOP => {
                        if let Some(s) = shared.stream(id) {
                            s.stop(code);
                        }
                    }
                    _ => {
                        Connection {
                            shared: shared.clone(),
                        }
                        .close(
                            VarInt::from_u64(shared.protocol_error).unwrap_or(VarInt::MAX),
                            b"unknown control message",
                        );
                        return;
                    }
                }
            }
            return;
        }
        (Ok(Ok(())), other) => {
            tracing::debug!(kind = other, "unknown stream kind: closing the connection");
            Connection {
                shared: shared.clone(),
            }
            .close(
                VarInt::from_u64(shared.protocol_error).unwrap_or(VarInt::MAX),
                b"unknown stream kind",
            );
        }
        _ => {}
    }
    done_classifying(&shared);
}

fn done_classifying(shared: &ConnShared) {
    if shared.classifying.fetch_sub(1, Ordering::AcqRel) == 1 {
        shared.classified.notify_waiters();
    }
}

// ---- streams ----

/// One stream's state both halves see.
struct StreamShared {
    conn: Arc<ConnShared>,
    /// The yamux stream id.
    id: u32,
    /// Our direction: the records yamux has not taken yet.
    out: Mutex<Outbox>,
    state: Mutex<StreamState>,
    changed: Notify,
}

impl Drop for StreamShared {
    fn drop(&mut self) {
        self.conn
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[derive(Default)]
struct StreamState {
    /// The peer asked us to stop (its code).
    stopped: Option<u64>,
    /// The peer read our `FIN`.
    acked: bool,
    /// The writer failed: the stream (or connection) is gone.
    broken: bool,
    /// Our direction ended (`FIN` or `RESET` queued).
    send_done: bool,
}

impl StreamShared {
    fn update(&self, f: impl FnOnce(&mut StreamState)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_waiters();
    }

    fn get<T>(&self, f: impl FnOnce(&StreamState) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Send the kind byte of a stream we opened and have not written to, so that the
    /// peer learns the stream a control message names. Best effort: the message goes on
    /// the control stream, which the peer may read before it has classified this one (it
    /// then ignores the message, as one for a stream that ended). Every opener in Tether
    /// writes first.
    fn open_now(self: &Arc<Self>) {
        let mut out = self.outbox();
        if out.opening && !out.ending && out.io.is_some() {
            let kind = out.open(Bytes::new());
            out.queued += kind.len();
            out.queue.push_back(kind);
            self.kick(out);
        }
    }

    /// Queue `rec`, and end our direction after it if `last`; false once our direction
    /// ended or the stream broke.
    fn push(self: &Arc<Self>, rec: Bytes, last: bool) -> bool {
        let mut out = self.outbox();
        if out.ending || out.io.is_none() {
            return false;
        }
        let rec = out.open(rec);
        out.queued += rec.len();
        out.queue.push_back(rec);
        out.ending = last;
        self.kick(out);
        true
    }

    /// End our direction: queue `last` (if any), then shut the yamux half down.
    fn end(self: &Arc<Self>, last: Option<Bytes>) {
        let mut out = self.outbox();
        if out.ending {
            return;
        }
        out.ending = true;
        let last = match (last, out.opening) {
            (Some(rec), _) => Some(out.open(rec)),
            (None, true) => Some(out.open(Bytes::new())),
            (None, false) => None,
        };
        // A writer waiting for room learns that the direction ended (a `STOP`).
        if let Some(w) = out.waiting.take() {
            w.wake();
        }
        if let Some(rec) = last {
            out.queued += rec.len();
            out.queue.push_back(rec);
        }
        self.kick(out);
    }

    /// Write what yamux takes now; a task writes the rest. An idle stream thus has no
    /// task of its own: a writer task and its queue per stream cost 0.7 KB a connection.
    fn kick(self: &Arc<Self>, mut out: std::sync::MutexGuard<'_, Outbox>) {
        if out.flushing {
            return;
        }
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        if self.poll_out(&mut out, &mut cx).is_ready() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        out.flushing = true;
        drop(out);
        let shared = self.clone();
        handle.spawn(std::future::poll_fn(move |cx| {
            let mut out = shared.outbox();
            let done = shared.poll_out(&mut out, cx);
            if done.is_ready() {
                out.flushing = false;
            }
            done
        }));
    }

    /// Write queued records into yamux, then shut our half down once the direction
    /// ended. Ready when nothing is left to do for now.
    fn poll_out(&self, out: &mut Outbox, cx: &mut Context<'_>) -> Poll<()> {
        use tokio::io::AsyncWrite as _;
        loop {
            // The connection closed: what was queued is discarded, as QUIC discards it.
            if self.conn.reason().is_some() {
                out.fail();
                return Poll::Ready(());
            }
            let Some(io) = out.io.as_mut() else {
                return Poll::Ready(());
            };
            if let Some(front) = out.queue.front_mut() {
                match Pin::new(io).poll_write(cx, front) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        bytes::Buf::advance(front, n);
                        if front.is_empty() {
                            out.queue.pop_front();
                        }
                        out.queued -= n;
                        if let Some(w) = out.waiting.take() {
                            w.wake();
                        }
                    }
                    Poll::Ready(_) => {
                        out.fail();
                        self.update(|s| s.broken = true);
                        return Poll::Ready(());
                    }
                    Poll::Pending => return Poll::Pending,
                }
            } else if out.ending {
                ready!(Pin::new(io).poll_shutdown(cx)).ok();
                out.io = None;
                return Poll::Ready(());
            } else {
                if out.queue.capacity() != 0 {
                    out.queue = VecDeque::new();
                }
                return Poll::Ready(());
            }
        }
    }

    /// The peer's `STOP`: writes fail with `code` from now on, and our direction ends with
    /// `RESET` (unless it already ended).
    fn stop(self: &Arc<Self>, code: u64) {
        let mut was_done = true;
        self.update(|s| {
            s.stopped = Some(code);
            was_done = std::mem::replace(&mut s.send_done, true);
        });
        if !was_done {
            self.end(Some(record(REC_RESET, &code.to_be_bytes())));
        }
    }
}

/// One direction of a stream: records on their way into yamux.
struct Outbox {
    /// The yamux half; `None` once shut down or broken.
    io: Option<WriteHalf<Io>>,
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`, held to [`SEND_BUDGET`].
    queued: usize,
    /// Our direction ended: shut the half down once `queue` is written.
    ending: bool,
    /// A task is writing `queue`.
    flushing: bool,
    /// A writer waiting for room in the budget.
    waiting: Option<std::task::Waker>,
    /// We opened the stream and its kind byte is not queued yet.
    opening: bool,
}

impl Outbox {
    /// `rec`, preceded by the kind byte if this is the first thing written on a stream we
    /// opened: one buffer, so that yamux sends them as one frame, in one flush.
    fn open(&mut self, rec: Bytes) -> Bytes {
        if !std::mem::take(&mut self.opening) {
            return rec;
        }
        let mut b = BytesMut::with_capacity(1 + rec.len());
        b.put_u8(KIND_STREAM);
        b.extend_from_slice(&rec);
        b.freeze()
    }

    /// Nothing more goes out: drop what was queued and wake a waiting writer (it then
    /// learns why).
    fn fail(&mut self) {
        self.io = None;
        self.queue = VecDeque::new();
        self.queued = 0;
        if let Some(w) = self.waiting.take() {
            w.wake();
        }
    }
}

fn split(stream: yamux::Stream, conn: Arc<ConnShared>) -> (SendStream, RecvStream) {
    let id = stream.id().val();
    let (r, w) = tokio::io::split(stream.compat());
    let shared = Arc::new(StreamShared {
        conn: conn.clone(),
        id,
        out: Mutex::new(Outbox {
            io: Some(w),
            queue: VecDeque::new(),
            queued: 0,
            ending: false,
            flushing: false,
            waiting: None,
            opening: false,
        }),
        state: Mutex::new(StreamState::default()),
        changed: Notify::new(),
    });
    conn.streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, Arc::downgrade(&shared));
    let send = SendStream {
        shared: shared.clone(),
        done: false,
    };
    let recv = RecvStream {
        reader: Some(Reader::new(r)),
        shared,
        offset: 0,
    };
    (send, recv)
}

fn record(kind: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER + payload.len());
    b.put_u8(kind);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// The sending half of a TCP stream.
pub struct SendStream {
    shared: Arc<StreamShared>,
    /// Finished or reset by us.
    done: bool,
}

impl fmt::Debug for SendStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("tcp::SendStream")
            .field("done", &self.done)
            .finish()
    }
}

impl SendStream {
    /// Why a write cannot go on, if it cannot.
    fn write_error(&self) -> Option<WriteError> {
        if let Some(code) = self.shared.get(|s| s.stopped) {
            return Some(WriteError::Stopped(
                VarInt::from_u64(code).unwrap_or(VarInt::MAX),
            ));
        }
        if self.done {
            return Some(WriteError::ClosedStream);
        }
        if let Some(r) = self.shared.conn.reason() {
            return Some(WriteError::ConnectionLost(r));
        }
        if self.shared.get(|s| s.broken) {
            return Some(WriteError::ConnectionLost(ConnectionError::Reset));
        }
        None
    }

    fn poll_write_inner(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<Result<usize, WriteError>> {
        if let Some(e) = self.write_error() {
            return Poll::Ready(Err(e));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(WRITE_CHUNK);
        {
            let mut out = self.shared.outbox();
            if out.queued > 0 && out.queued + n > SEND_BUDGET && out.io.is_some() {
                // A task is writing the queue (`kick`), and wakes us as it goes.
                out.waiting = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        if !self.shared.push(record(REC_DATA, &buf[..n]), false) {
            return Poll::Ready(Err(self
                .write_error()
                .unwrap_or(WriteError::ConnectionLost(ConnectionError::Reset))));
        }
        Poll::Ready(Ok(n))
    }

    /// The yamux stream id.
    pub fn id(&self) -> u64 {
        u64::from(self.shared.id)
    }

    /// Write all of `buf`.
    pub async fn write_all(&mut self, mut buf: &[u8]) -> Result<(), WriteError> {
        while !buf.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_write_inner(cx, buf)).await?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// End the stream after what was written.
    pub fn finish(&mut self) -> Result<(), ClosedStream> {
        self.end_with(record(REC_FIN, &[]))
    }

    /// Abandon the stream with `code`.
    pub fn reset(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        self.end_with(record(REC_RESET, &code.into_inner().to_be_bytes()))
    }

    /// End our direction with `last` (`FIN` or `RESET`), unless it already ended (by us,
    /// or by the peer's `STOP`, answered with `RESET` already).
    fn end_with(&mut self, last: Bytes) -> Result<(), ClosedStream> {
        if self.done {
            return Err(ClosedStream);
        }
        self.done = true;
        let mut was_done = false;
        self.shared
            .update(|s| was_done = std::mem::replace(&mut s.send_done, true));
        // As in QUIC, nothing of a stream is sent once its connection closed: a FIN written
        // after the close (a driver dropping its stream once it closed the connection)
        // could reach the peer before the close stream, and read as the stream ending.
        let open = self.shared.conn.reason().is_none();
        self.shared.end((!was_done && open).then_some(last));
        Ok(())
    }

    /// Resolves when the peer stopped the stream (`Some(code)`), or read our `FIN`
    /// (`None`).
    pub fn stopped(
        &self,
    ) -> impl Future<Output = Result<Option<VarInt>, StoppedError>> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            loop {
                let changed = shared.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let closed = shared.conn.closed.notified();
                tokio::pin!(closed);
                closed.as_mut().enable();
                let (stopped, acked, broken) = shared.get(|s| (s.stopped, s.acked, s.broken));
                if let Some(code) = stopped {
                    return Ok(Some(VarInt::from_u64(code).unwrap_or(VarInt::MAX)));
                }
                if acked {
                    return Ok(None);
                }
                if let Some(r) = shared.conn.reason() {
                    return Err(StoppedError::ConnectionLost(r));
                }
                if broken {
                    return Err(StoppedError::ConnectionLost(ConnectionError::Reset));
                }
                tokio::select! {
                    _ = changed => {}
                    _ = closed => {}
                }
            }
        }
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        // As in quinn: a stream dropped without finish or reset is finished.
        if !self.done {
            let _ = self.finish();
        }
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().poll_write_inner(cx, buf).map_err(Into::into)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = self.get_mut().finish();
        Poll::Ready(Ok(()))
    }
}

/// What a record read left for the caller.
enum Got {
    /// `n` data bytes were copied.
    Data(usize),
    /// The peer's `FIN`.
    Fin,
    /// The peer's `RESET` with its code.
    Reset(u64),
}

/// The record parser over a yamux stream's read half.
struct Reader {
    io: ReadHalf<Io>,
    header: [u8; HEADER],
    filled: usize,
    /// Data bytes left in the current `DATA` record.
    remaining: usize,
    /// A control record's payload being read: (type, bytes, filled).
    control: Option<(u8, [u8; 8], usize)>,
}

impl Reader {
    fn new(io: ReadHalf<Io>) -> Reader {
        Reader {
            io,
            header: [0; HEADER],
            filled: 0,
            remaining: 0,
            control: None,
        }
    }

    /// The next data bytes into `buf`, or the end of the stream. `Err(None)`: the yamux
    /// stream ended or failed without a `FIN`/`RESET` (the connection is going); `Err(Some)`
    /// a broken record.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        shared: &StreamShared,
    ) -> Poll<Result<Got, Option<&'static str>>> {
        loop {
            if self.remaining > 0 {
                let want = self.remaining.min(buf.remaining());
                if want == 0 {
                    return Poll::Ready(Ok(Got::Data(0)));
                }
                let mut sub = ReadBuf::new(buf.initialize_unfilled_to(want));
                ready!(Pin::new(&mut self.io).poll_read(cx, &mut sub)).map_err(|_| None)?;
                let n = sub.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(None));
                }
                buf.advance(n);
                self.remaining -= n;
                return Poll::Ready(Ok(Got::Data(n)));
            }
            if let Some((kind, bytes, filled)) = self.control.as_mut() {
                while *filled < 8 {
                    let mut rb = ReadBuf::new(&mut bytes[*filled..]);
                    ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb)).map_err(|_| None)?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(None));
                    }
                    *filled += n;
                }
                let code = u64::from_be_bytes(*bytes);
                let kind = *kind;
                self.control = None;
                debug_assert_eq!(kind, REC_RESET);
                return Poll::Ready(Ok(Got::Reset(code)));
            }
            while self.filled < HEADER {
                let mut rb = ReadBuf::new(&mut self.header[self.filled..]);
                ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb)).map_err(|_| None)?;
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(None));
                }
                self.filled += n;
            }
            self.filled = 0;
            let kind = self.header[0];
            let len = u32::from_be_bytes(self.header[1..].try_into().expect("4 bytes")) as usize;
            match (kind, len) {
                (REC_DATA, 1..=MAX_RECORD) => self.remaining = len,
                (REC_FIN, 0) => {
                    shared.conn.control(REC_ACK, shared.id, 0);
                    return Poll::Ready(Ok(Got::Fin));
                }
                (REC_RESET, 8) => self.control = Some((kind, [0; 8], 0)),
                _ => return Poll::Ready(Err(Some("bad record"))),
            }
        }
    }
}

/// [`RecvStream::read_chunk`]'s future.
pub struct ReadChunk<'a> {
    stream: &'a mut RecvStream,
    max: usize,
}

impl Future for ReadChunk<'_> {
    type Output = Result<Option<Bytes>, ReadError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.stream.poll_chunk(cx, this.max)
    }
}

/// The receiving half of a TCP stream.
pub struct RecvStream {
    /// `None` once the stream ended (FIN, RESET, stop or lost).
    reader: Option<Reader>,
    shared: Arc<StreamShared>,
    offset: u64,
}

impl fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("tcp::RecvStream")
            .field("ended", &self.reader.is_none())
            .finish()
    }
}

/// A finished read: data, the end, or an error.
type ReadResult = Result<Option<usize>, ReadError>;

impl RecvStream {
    fn poll_read_inner(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<ReadResult> {
        let Some(reader) = self.reader.as_mut() else {
            return Poll::Ready(Err(ReadError::ClosedStream));
        };
        match ready!(reader.poll(cx, buf, &self.shared)) {
            Ok(Got::Data(n)) => {
                self.offset += n as u64;
                Poll::Ready(Ok(Some(n)))
            }
            Ok(Got::Fin) => {
                self.end();
                Poll::Ready(Ok(None))
            }
            Ok(Got::Reset(code)) => {
                self.end();
                Poll::Ready(Err(ReadError::Reset(
                    VarInt::from_u64(code).unwrap_or(VarInt::MAX),
                )))
            }
            Err(Some(what)) => {
                tracing::debug!(what, "broken stream record: closing the connection");
                let conn = Connection {
                    shared: self.shared.conn.clone(),
                };
                conn.close(
                    VarInt::from_u64(self.shared.conn.protocol_error).unwrap_or(VarInt::MAX),
                    what.as_bytes(),
                );
                self.end();
                Poll::Ready(Err(ReadError::ConnectionLost(
                    ConnectionError::LocallyClosed,
                )))
            }
            Err(None) => {
                // The yamux stream ended without FIN or RESET: the connection is going. Its
                // reason (a close stream still being read, say) is set by its driver, which
                // wakes us; until then the stream stays as it is.
                match self.shared.conn.reason_or_wait(cx) {
                    Some(reason) => {
                        self.end();
                        Poll::Ready(Err(ReadError::ConnectionLost(reason)))
                    }
                    None => Poll::Pending,
                }
            }
        }
    }

    /// The next chunk (at most `max` bytes): a buffer is allocated only once a `DATA`
    /// record's bytes are next, so a stream waiting for data holds none.
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<Result<Option<Bytes>, ReadError>> {
        let mut nothing = ReadBuf::new(&mut []);
        match ready!(self.poll_read_inner(cx, &mut nothing)) {
            Ok(Some(_)) => {}
            Ok(None) => return Poll::Ready(Ok(None)),
            Err(e) => return Poll::Ready(Err(e)),
        }
        let len = self
            .reader
            .as_ref()
            .map_or(0, |r| r.remaining)
            .min(max.max(1));
        let mut buf = vec![0u8; len];
        let mut rb = ReadBuf::new(&mut buf);
        match ready!(self.poll_read_inner(cx, &mut rb)) {
            Ok(Some(n)) => {
                buf.truncate(n);
                Poll::Ready(Ok(Some(Bytes::from(buf))))
            }
            Ok(None) => Poll::Ready(Ok(None)),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn end(&mut self) {
        self.reader = None;
    }

    /// Read into `buf`; `None` at the end of the stream.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ReadError> {
        std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(buf);
            self.poll_read_inner(cx, &mut rb)
        })
        .await
    }

    /// At most `max` bytes; `None` at the end. A small future: a session driver waits in
    /// it for the connection's whole life.
    pub fn read_chunk(&mut self, max: usize) -> ReadChunk<'_> {
        ReadChunk { stream: self, max }
    }

    /// Fill `buf` exactly.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadExactError> {
        let mut at = 0;
        while at < buf.len() {
            match self.read(&mut buf[at..]).await? {
                Some(n) => at += n,
                None => return Err(ReadExactError::FinishedEarly(at)),
            }
        }
        Ok(())
    }

    /// Ask the peer to stop sending (`STOP` with `code`); what it still sends is dropped.
    pub fn stop(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        let Some(reader) = self.reader.take() else {
            return Err(ClosedStream);
        };
        self.shared.open_now();
        self.shared
            .conn
            .control(REC_STOP, self.shared.id, code.into_inner());
        drain(reader, self.shared.clone());
        Ok(())
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            drain(reader, self.shared.clone());
        }
    }
}

/// Keep reading a stream nobody reads any more, for its `FIN`/`RESET`, `ACK` and `STOP`
/// records (QUIC processes those whether or not the application reads).
fn drain(mut reader: Reader, shared: Arc<StreamShared>) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        let mut sink = [0u8; 4096];
        loop {
            let r = std::future::poll_fn(|cx| {
                let mut rb = ReadBuf::new(&mut sink);
                reader.poll(cx, &mut rb, &shared)
            })
            .await;
            if !matches!(r, Ok(Got::Data(_))) {
                break;
            }
        }
    });
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match ready!(self.get_mut().poll_read_inner(cx, buf)) {
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }
}

/// Set the socket options the TCP transport relies on: no Nagle delay, keep-alive probes,
/// and `TCP_USER_TIMEOUT` so a peer that stopped acknowledging is declared gone (QUIC's
/// idle timeout).
pub fn tune(stream: &TcpStream, idle: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle / 2)
        .with_interval(idle / 6);
    sock.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(idle))?;
    Ok(())
}

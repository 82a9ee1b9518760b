//! Break-glass tunnels through a standalone broker (docs/PROTOCOL.md §12): the admin
//! API's `POST /v1/sessions/{appliance}/tunnels` opens a session-control stream to the
//! agent (`TunnelOpen`), and once the agent answers `TunnelReady` the broker listens on
//! a loopback port of its own; each TCP connection there becomes one connection stream
//! (`TunnelConnect`, then raw bytes both ways). The broker decides nothing: the agent
//! verifies the customer's approval, pins the target, keeps the clock and says why every
//! connection and the session ended; the broker records those reasons
//! (`GET /v1/tunnels`) and counts them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tether_proto::cluster::{TunnelAnswer, TUNNEL_DETACHED};
use tether_proto::relay::{self, Chunk, ChunkCodec};
use tether_proto::{
    Frame, TunnelCloseReason, TunnelConnect, TunnelOpen, TunnelReady, FRAME_HEADER_LEN,
};
use tether_transport::{RecvStream, SendStream};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::sessions::SessionInfo;

/// What became of a tunnel, for `GET /v1/tunnels`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TunnelView {
    /// The agent's session id.
    pub session_id: u64,
    /// The appliance.
    pub appliance_id: String,
    /// Where the broker listens for it (loopback).
    pub listen: String,
    /// When the agent's timer ends it (agent's clock, ms since the epoch).
    pub expires_at_ms: i64,
    /// Why it ended (`None` while it lives).
    pub ended: Option<String>,
    /// Why each connection closed, in order (`finished`, `expired`, `idle`, ...).
    pub connections: Vec<String>,
    /// The credential, sealed by the agent to the operator's one-time key (standard
    /// base64 of the `age` ciphertext; empty when none). Relayed, never opened.
    #[serde(skip)]
    pub sealed_credential: String,
}

/// The broker's tunnels, live and ended (bounded: the oldest ended ones go first).
#[derive(Debug, Default)]
pub struct TunnelTable {
    tunnels: Mutex<Vec<Arc<Mutex<TunnelView>>>>,
    /// Control mode: the live sessions opened for control, by control's id; cancelling
    /// the token closes one.
    control: Mutex<std::collections::HashMap<String, CancellationToken>>,
}

/// Ended tunnels kept for `GET /v1/tunnels`.
const KEEP_ENDED: usize = 256;

impl TunnelTable {
    /// Every tunnel, live first.
    pub fn list(&self) -> Vec<TunnelView> {
        let t = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        t.iter()
            .map(|v| v.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// Close control's session `id` (the vendor's close): `false` when this broker holds
    /// no such live session.
    pub fn close_control(&self, id: &str) -> bool {
        let t = self.control.lock().unwrap_or_else(|e| e.into_inner());
        t.get(id).map(CancellationToken::cancel).is_some()
    }

    fn insert(&self, view: TunnelView) -> Arc<Mutex<TunnelView>> {
        let v = Arc::new(Mutex::new(view));
        let mut t = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        t.push(v.clone());
        let ended = t
            .iter()
            .filter(|v| v.lock().unwrap_or_else(|e| e.into_inner()).ended.is_some())
            .count();
        if ended > KEEP_ENDED {
            if let Some(i) = t
                .iter()
                .position(|v| v.lock().unwrap_or_else(|e| e.into_inner()).ended.is_some())
            {
                t.remove(i);
            }
        }
        v
    }
}

/// What the agent answered a `TunnelOpen`.
#[derive(Debug)]
pub enum Opened {
    /// Active: the broker listens at `listen`.
    Ready(TunnelView),
    /// The approval document to sign.
    Plan(Vec<u8>),
    /// Refused or ended at once: reason name, code (the failure for `refused`), message.
    Ended(String, String, String),
}

/// Why opening a tunnel failed on the broker's side.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The stream or connection failed.
    #[error("the appliance's connection failed: {0}")]
    Stream(String),
    /// The agent answered something else.
    #[error("the agent answered with an unexpected frame: {0}")]
    Protocol(String),
    /// No local port.
    #[error("cannot listen for the tunnel: {0}")]
    Listen(String),
}

/// What the agent answered first on a session-control stream.
enum Started {
    /// Active; the stream stays open for its `TunnelEnded`.
    Ready(TunnelReady, SendStream, RecvStream),
    /// The approval document to sign.
    Plan(Vec<u8>),
    /// Refused or ended at once: reason name, code, message.
    Ended(String, String, String),
}

/// Send `open` on a new session-control stream of `session`'s connection and read the
/// agent's first answer.
async fn start(
    session: &SessionInfo,
    open: TunnelOpen,
    metrics: &Metrics,
    max_frame_len: usize,
) -> Result<Started, TunnelError> {
    let (mut send, mut recv) = session
        .connection
        .open_bi()
        .await
        .map_err(|e| TunnelError::Stream(e.to_string()))?;
    write_frame(&mut send, &Frame::TunnelOpen(open), max_frame_len).await?;
    match read_frame(&mut recv, max_frame_len).await? {
        Frame::TunnelReady(r) => Ok(Started::Ready(r, send, recv)),
        Frame::TunnelPlan(p) => {
            let _ = send.finish();
            Ok(Started::Plan(p.document.to_vec()))
        }
        Frame::TunnelEnded(e) => {
            metrics.tunnel("refused");
            Ok(Started::Ended(
                e.reason.as_str().to_owned(),
                e.code,
                e.message,
            ))
        }
        other => Err(TunnelError::Protocol(format!("{:?}", other.frame_type()))),
    }
}

/// Open a tunnel session on `session`'s connection with `open`.
pub async fn open(
    session: Arc<SessionInfo>,
    open: TunnelOpen,
    table: Arc<TunnelTable>,
    metrics: Arc<Metrics>,
    max_frame_len: usize,
) -> Result<Opened, TunnelError> {
    let (ready, send, recv) = match start(&session, open, &metrics, max_frame_len).await? {
        Started::Ready(r, send, recv) => (r, send, recv),
        Started::Plan(p) => return Ok(Opened::Plan(p)),
        Started::Ended(r, c, m) => return Ok(Opened::Ended(r, c, m)),
    };
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| TunnelError::Listen(e.to_string()))?;
    let listen = listener
        .local_addr()
        .map_err(|e| TunnelError::Listen(e.to_string()))?;
    let view = TunnelView {
        session_id: ready.session_id,
        appliance_id: session.appliance.to_string(),
        listen: listen.to_string(),
        expires_at_ms: ready.expires_at_ms,
        ended: None,
        connections: Vec::new(),
        sealed_credential: {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&ready.sealed_credential)
        },
    };
    metrics.tunnel("opened");
    info!(session_id = ready.session_id, %listen, "tunnel active");
    let entry = table.insert(TunnelView {
        // Handed to the caller once; not kept.
        sealed_credential: String::new(),
        ..view.clone()
    });
    tokio::spawn(serve(
        session,
        ready.session_id,
        listener,
        send,
        recv,
        entry,
        metrics,
        max_frame_len,
    ));
    Ok(Opened::Ready(view))
}

/// Accept local connections until the agent ends the session (its `TunnelEnded` on the
/// session-control stream) or the connection goes.
#[allow(clippy::too_many_arguments)]
async fn serve(
    session: Arc<SessionInfo>,
    session_id: u64,
    listener: TcpListener,
    _send: SendStream,
    mut recv: RecvStream,
    entry: Arc<Mutex<TunnelView>>,
    metrics: Arc<Metrics>,
    max_frame_len: usize,
) {
    let done = CancellationToken::new();
    let reason = loop {
        tokio::select! {
            frame = read_frame(&mut recv, max_frame_len) => {
                break match frame {
                    Ok(Frame::TunnelEnded(e)) => e.reason.as_str().to_owned(),
                    Ok(other) => format!("protocol_error ({:?})", other.frame_type()),
                    Err(_) => TunnelCloseReason::Disconnected.as_str().to_owned(),
                };
            }
            accepted = listener.accept() => {
                let Ok((tcp, peer)) = accepted else { continue };
                debug!(%peer, session_id, "tunnel connection");
                let conn = session.connection.clone();
                let (entry, metrics, done) = (entry.clone(), metrics.clone(), done.clone());
                tokio::spawn(async move {
                    let reason = tokio::select! {
                        r = connect(conn, session_id, tcp, max_frame_len) => r,
                        _ = done.cancelled() => "ended".to_owned(),
                    };
                    metrics.tunnel_connection(&reason);
                    entry
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .connections
                        .push(reason);
                });
            }
        }
    };
    info!(session_id, %reason, "tunnel ended");
    metrics.tunnel("ended");
    entry.lock().unwrap_or_else(|e| e.into_inner()).ended = Some(reason);
    // The agent reset every connection stream with its reason; local sockets still
    // waiting on one close with it.
    drop(listener);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    done.cancel();
}

/// One local connection: a connection stream to the agent, then bytes both ways.
/// Returns why it closed (`finished`, or the agent's reset reason).
async fn connect(
    conn: tether_transport::Connection,
    session_id: u64,
    mut tcp: tokio::net::TcpStream,
    max_frame_len: usize,
) -> String {
    let reason_of = |e: &quinn::ReadError| match e {
        quinn::ReadError::Reset(code) => TunnelCloseReason::from_code(code.into_inner())
            .map_or_else(|| format!("reset {code}"), |r| r.as_str().to_owned()),
        _ => TunnelCloseReason::Disconnected.as_str().to_owned(),
    };
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return TunnelCloseReason::Disconnected.as_str().to_owned();
    };
    if write_frame(
        &mut send,
        &Frame::TunnelConnect(TunnelConnect { session_id }),
        max_frame_len,
    )
    .await
    .is_err()
    {
        return TunnelCloseReason::Disconnected.as_str().to_owned();
    }
    match read_frame_raw(&mut recv, max_frame_len).await {
        Ok(Frame::TunnelConnected(_)) => {}
        Ok(other) => return format!("protocol_error ({:?})", other.frame_type()),
        Err(Some(e)) => return reason_of(&e),
        Err(None) => return TunnelCloseReason::Disconnected.as_str().to_owned(),
    }
    let mut stream = tokio::io::join(&mut recv, &mut send);
    match tokio::io::copy_bidirectional(&mut tcp, &mut stream).await {
        Ok(_) => "finished".to_owned(),
        Err(e) => {
            let inner = e.get_ref();
            if let Some(r) = inner.and_then(|i| i.downcast_ref::<quinn::ReadError>()) {
                reason_of(r)
            } else if let Some(quinn::WriteError::Stopped(code)) =
                inner.and_then(|i| i.downcast_ref::<quinn::WriteError>())
            {
                // The agent stopped our side with its reason.
                TunnelCloseReason::from_code(code.into_inner())
                    .map_or_else(|| format!("stopped {code}"), |r| r.as_str().to_owned())
            } else {
                warn!(error = %e, "tunnel connection failed");
                TunnelCloseReason::Disconnected.as_str().to_owned()
            }
        }
    }
}

/// Control mode: open (or plan) control's tunnel session `id` on `session`'s
/// connection, and answer for control. A session that became ready is watched until it
/// ends (the agent's `TunnelEnded`, the connection's loss, or control's close through
/// [`TunnelTable::close_control`]); its end goes to control through `presence`.
pub async fn open_for_control(
    session: Arc<SessionInfo>,
    id: String,
    open: TunnelOpen,
    table: Arc<TunnelTable>,
    metrics: Arc<Metrics>,
    presence: crate::presence::Presence,
    max_frame_len: usize,
) -> TunnelAnswer {
    let started = match start(&session, open, &metrics, max_frame_len).await {
        Ok(s) => s,
        Err(e) => {
            warn!(tunnel = %id, error = %e, "tunnel open failed");
            return TunnelAnswer::Ended {
                reason: TunnelCloseReason::Disconnected.as_str().to_owned(),
                code: String::new(),
                message: e.to_string(),
            };
        }
    };
    let (ready, mut send, mut recv) = match started {
        Started::Ready(r, send, recv) => (r, send, recv),
        Started::Plan(document) => {
            return TunnelAnswer::Plan {
                document: String::from_utf8_lossy(&document).into_owned(),
            }
        }
        Started::Ended(reason, code, message) => {
            return TunnelAnswer::Ended {
                reason,
                code,
                message,
            }
        }
    };
    metrics.tunnel("opened");
    info!(tunnel = %id, session_id = ready.session_id, "tunnel active for control");
    let entry = table.insert(TunnelView {
        session_id: ready.session_id,
        appliance_id: session.appliance.to_string(),
        listen: "control".into(),
        expires_at_ms: ready.expires_at_ms,
        ..TunnelView::default()
    });
    let close = CancellationToken::new();
    table
        .control
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), close.clone());
    let sid = id.clone();
    tokio::spawn(async move {
        let ended = tokio::select! {
            f = read_frame(&mut recv, max_frame_len) => Some(f),
            _ = close.cancelled() => None,
        };
        let ended = match ended {
            Some(f) => f,
            None => {
                // The vendor's close: finish our side; the agent ends the session as
                // `closed` and says so.
                let _ = send.finish();
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    read_frame(&mut recv, max_frame_len),
                )
                .await
                {
                    Ok(f) => f,
                    Err(_) => Err(TunnelError::Stream("no TunnelEnded after the close".into())),
                }
            }
        };
        let (reason, message, signed) = ended_of(ended);
        info!(tunnel = %sid, %reason, "tunnel ended");
        metrics.tunnel("ended");
        entry.lock().unwrap_or_else(|e| e.into_inner()).ended = Some(reason.clone());
        table
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&sid);
        presence.tunnel_ended(sid, reason, message, signed);
    });
    TunnelAnswer::Ready {
        session_id: ready.session_id,
        expires_at_ms: ready.expires_at_ms,
        sealed_credential: {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&ready.sealed_credential)
        },
    }
}

/// What a session-control stream's last frame says for control: the reason (or
/// [`TUNNEL_DETACHED`] when the stream was lost without one), the message, and the signed
/// manifest (UTF-8: canonical JSON and armor).
fn ended_of(ended: Result<Frame, TunnelError>) -> (String, String, (String, String)) {
    match ended {
        Ok(Frame::TunnelEnded(e)) => (
            e.reason.as_str().to_owned(),
            e.message,
            (
                String::from_utf8_lossy(&e.manifest).into_owned(),
                String::from_utf8_lossy(&e.manifest_sig).into_owned(),
            ),
        ),
        Ok(other) => (
            TUNNEL_DETACHED.to_owned(),
            format!("protocol error: {:?}", other.frame_type()),
            Default::default(),
        ),
        Err(e) => (
            TUNNEL_DETACHED.to_owned(),
            e.to_string(),
            Default::default(),
        ),
    }
}

/// Control mode: close control's session `id` (the agent's `session_id`) whose
/// session-control stream this broker does not hold, with a `TunnelClose` on a new
/// stream; report the agent's `TunnelEnded` (with the signed manifest) to control.
pub async fn close_detached(
    session: Arc<SessionInfo>,
    id: String,
    session_id: u64,
    metrics: Arc<Metrics>,
    presence: crate::presence::Presence,
    max_frame_len: usize,
) {
    let asked = async {
        let (mut send, mut recv) = session
            .connection
            .open_bi()
            .await
            .map_err(|e| TunnelError::Stream(e.to_string()))?;
        write_frame(
            &mut send,
            &Frame::TunnelClose(tether_proto::TunnelClose { session_id }),
            max_frame_len,
        )
        .await?;
        let _ = send.finish();
        tokio::time::timeout(
            std::time::Duration::from_secs(45),
            read_frame(&mut recv, max_frame_len),
        )
        .await
        .map_err(|_| TunnelError::Stream("no TunnelEnded in time".into()))?
    };
    let (reason, message, signed) = ended_of(asked.await);
    info!(tunnel = %id, %reason, "detached tunnel closed");
    if reason != TUNNEL_DETACHED {
        metrics.tunnel("ended");
    }
    presence.tunnel_ended(id, reason, message, signed);
}

/// Control mode: relay one tunnel connection between `io` (the dial-back to control,
/// upgraded to `tether-tunnel/1`, carrying [`Chunk`]s from the operator's CLI) and a new
/// connection stream to the agent for `session_id`. Returns why it closed.
pub async fn relay<T>(
    session: Arc<SessionInfo>,
    session_id: u64,
    io: T,
    metrics: Arc<Metrics>,
    max_frame_len: usize,
) -> String
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin,
{
    let (rd, wr) = tokio::io::split(io);
    let mut wr = tokio_util::codec::FramedWrite::new(wr, ChunkCodec);
    let ended = |reason: TunnelCloseReason, message: String| Chunk::Ended { reason, message };
    let opened = async {
        let (mut send, mut recv) = session
            .connection
            .open_bi()
            .await
            .map_err(|e| ended(TunnelCloseReason::Disconnected, e.to_string()))?;
        write_frame(
            &mut send,
            &Frame::TunnelConnect(TunnelConnect { session_id }),
            max_frame_len,
        )
        .await
        .map_err(|e| ended(TunnelCloseReason::Disconnected, e.to_string()))?;
        match read_frame_raw(&mut recv, max_frame_len).await {
            Ok(Frame::TunnelConnected(_)) => Ok((send, recv)),
            Ok(other) => Err(ended(
                TunnelCloseReason::Disconnected,
                format!("protocol error: {:?}", other.frame_type()),
            )),
            Err(Some(quinn::ReadError::Reset(code))) => {
                let reason = TunnelCloseReason::from_code(code.into_inner())
                    .unwrap_or(TunnelCloseReason::Disconnected);
                Err(ended(
                    reason,
                    format!("the appliance refused the connection: {reason}"),
                ))
            }
            Err(_) => Err(ended(
                TunnelCloseReason::Disconnected,
                "the appliance's connection went away".into(),
            )),
        }
    };
    let (mut send, mut recv) = match opened.await {
        Ok(s) => s,
        Err(chunk) => {
            let reason = match &chunk {
                Chunk::Ended { reason, .. } => reason.as_str().to_owned(),
                _ => String::new(),
            };
            let _ = wr.send(chunk).await;
            let _ = wr.close().await;
            return reason;
        }
    };
    if wr.send(Chunk::Connected).await.is_err() {
        let _ = send.reset(quinn::VarInt::from_u32(TunnelCloseReason::Closed as u32));
        return TunnelCloseReason::Closed.as_str().to_owned();
    }
    // Operator → agent: chunks to stream bytes. `true` when the operator half-closed.
    let metrics_up = metrics.clone();
    let up = async move {
        let mut rd = tokio_util::codec::FramedRead::new(rd, ChunkCodec);
        while let Some(c) = rd.next().await {
            match c {
                Ok(Chunk::Data(d)) => {
                    metrics_up.tunnel_bytes("up", d.len() as u64);
                    if send.write_all(&d).await.is_err() {
                        return (send, false);
                    }
                }
                Ok(Chunk::Fin) => {
                    let _ = send.finish();
                    return (send, true);
                }
                Ok(_) | Err(_) => break,
            }
        }
        (send, false)
    };
    // Agent → operator: stream bytes to chunks; the last is `Fin` or `Ended`.
    let down = async {
        let mut buf = vec![0u8; relay::MAX_DATA];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => {
                    metrics.tunnel_bytes("down", n as u64);
                    let data = Chunk::Data(bytes::Bytes::copy_from_slice(&buf[..n]));
                    if wr.send(data).await.is_err() {
                        let _ =
                            recv.stop(quinn::VarInt::from_u32(TunnelCloseReason::Closed as u32));
                        return None;
                    }
                }
                Ok(None) => {
                    let _ = wr.send(Chunk::Fin).await;
                    return Some((wr, None));
                }
                Err(e) => {
                    let reason = match e {
                        quinn::ReadError::Reset(code) => {
                            TunnelCloseReason::from_code(code.into_inner())
                                .unwrap_or(TunnelCloseReason::Disconnected)
                        }
                        _ => TunnelCloseReason::Disconnected,
                    };
                    let _ = wr.send(ended(reason, String::new())).await;
                    return Some((wr, Some(reason)));
                }
            }
        }
    };
    tokio::pin!(up, down);
    let reason = tokio::select! {
        (mut send, fin) = &mut up => {
            if !fin {
                // The operator went away without a half-close: abort.
                let _ = send.reset(quinn::VarInt::from_u32(TunnelCloseReason::Closed as u32));
                TunnelCloseReason::Closed.as_str().to_owned()
            } else {
                match down.await {
                    Some((mut wr, r)) => {
                        let _ = wr.close().await;
                        r.map_or_else(|| "finished".to_owned(), |r| r.as_str().to_owned())
                    }
                    None => TunnelCloseReason::Closed.as_str().to_owned(),
                }
            }
        }
        d = &mut down => match d {
            Some((mut wr, Some(r))) => {
                let _ = wr.close().await;
                r.as_str().to_owned()
            }
            Some((mut wr, None)) => {
                // The agent's side finished; the operator may still send.
                let (_, fin) = up.await;
                let _ = wr.close().await;
                if fin { "finished".to_owned() } else { TunnelCloseReason::Closed.as_str().to_owned() }
            }
            None => TunnelCloseReason::Closed.as_str().to_owned(),
        },
    };
    metrics.tunnel_connection(&reason);
    reason
}

/// Control mode: a dial-back for a connection this broker cannot serve: say why and
/// close. Returns the reason.
pub async fn refuse_relay<T>(io: T, message: String) -> String
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin,
{
    let (_, wr) = tokio::io::split(io);
    let mut wr = tokio_util::codec::FramedWrite::new(wr, ChunkCodec);
    let reason = TunnelCloseReason::Disconnected;
    let _ = wr.send(Chunk::Ended { reason, message }).await;
    let _ = wr.close().await;
    reason.as_str().to_owned()
}

async fn write_frame(
    send: &mut SendStream,
    frame: &Frame,
    max_frame_len: usize,
) -> Result<(), TunnelError> {
    let mut buf = BytesMut::new();
    tether_proto::encode_frame(frame, &mut buf, max_frame_len)
        .map_err(|e| TunnelError::Protocol(e.to_string()))?;
    send.write_all(&buf)
        .await
        .map_err(|e| TunnelError::Stream(e.to_string()))
}

async fn read_frame(recv: &mut RecvStream, max_frame_len: usize) -> Result<Frame, TunnelError> {
    read_frame_raw(recv, max_frame_len).await.map_err(|e| {
        TunnelError::Stream(e.map_or_else(|| "stream ended".to_owned(), |e| e.to_string()))
    })
}

/// Exactly one frame and not a byte more (raw bytes may follow it). `Err(Some)`: the
/// stream failed (a reset carries the agent's reason); `Err(None)`: it ended or held
/// something that is not a frame.
async fn read_frame_raw(
    recv: &mut RecvStream,
    max_frame_len: usize,
) -> Result<Frame, Option<quinn::ReadError>> {
    let mut buf = BytesMut::zeroed(FRAME_HEADER_LEN);
    let exact = |e: quinn::ReadExactError| match e {
        quinn::ReadExactError::ReadError(e) => Some(e),
        quinn::ReadExactError::FinishedEarly(_) => None,
    };
    recv.read_exact(&mut buf).await.map_err(exact)?;
    if tether_proto::decode_frame(&mut buf.clone(), max_frame_len).is_err() {
        return Err(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    buf.resize(FRAME_HEADER_LEN + len, 0);
    recv.read_exact(&mut buf[FRAME_HEADER_LEN..])
        .await
        .map_err(exact)?;
    match tether_proto::decode_frame(&mut buf, max_frame_len) {
        Ok(Some(f)) => Ok(f),
        _ => Err(None),
    }
}

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
use quinn::{RecvStream, SendStream};
use serde::Serialize;
use tether_proto::{Frame, TunnelCloseReason, TunnelConnect, TunnelOpen, FRAME_HEADER_LEN};
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

/// Open a tunnel session on `session`'s connection with `open`.
pub async fn open(
    session: Arc<SessionInfo>,
    open: TunnelOpen,
    table: Arc<TunnelTable>,
    metrics: Arc<Metrics>,
    max_frame_len: usize,
) -> Result<Opened, TunnelError> {
    let (mut send, mut recv) = session
        .connection
        .open_bi()
        .await
        .map_err(|e| TunnelError::Stream(e.to_string()))?;
    write_frame(&mut send, &Frame::TunnelOpen(open), max_frame_len).await?;
    let ready = match read_frame(&mut recv, max_frame_len).await? {
        Frame::TunnelReady(r) => r,
        Frame::TunnelPlan(p) => {
            let _ = send.finish();
            return Ok(Opened::Plan(p.document.to_vec()));
        }
        Frame::TunnelEnded(e) => {
            metrics.tunnel("refused");
            return Ok(Opened::Ended(
                e.reason.as_str().to_owned(),
                e.code,
                e.message,
            ));
        }
        other => return Err(TunnelError::Protocol(format!("{:?}", other.frame_type()))),
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
    conn: quinn::Connection,
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

//! The console's HTTPS listener: server-only TLS (no client-certificate request, so a
//! browser never shows a certificate picker), TLS 1.2/1.3, ALPN `h2` and `http/1.1` (so
//! many open tabs with live streams share one connection). Its certificate is
//! `[console] tls_cert`/`tls_key`, or control's own server certificate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::{router, ConsoleSettings, ConsoleState};
use crate::http::rate_limit::RemoteAddr;
use crate::http::server::{next_connection, TLS_HANDSHAKE_TIMEOUT};

/// Most connections the console serves at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long open streams get to finish when control stops.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long an HTTP/1 connection may take to send a request head (idle keep-alive
/// included).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2: a ping after this long without frames, and the connection ends when its answer
/// takes as long.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// HTTP/2: streams at once per connection (a page, its assets and a live stream or two).
const H2_MAX_STREAMS: u32 = 32;

/// The rustls config of the console: `chain_pem`/`key_pem`, no client certificates.
pub fn tls_config(chain_pem: &str, key_pem: &str) -> anyhow::Result<rustls::ServerConfig> {
    let chain = rustls_pemfile::certs(&mut chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())?
        .ok_or_else(|| anyhow::anyhow!("no private key for the console certificate"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// The console's certificate and key: the configured files, or control's own.
pub fn certificate(
    settings: &ConsoleSettings,
    state: &crate::http::AppState,
) -> anyhow::Result<(String, String)> {
    match (&settings.tls_cert, &settings.tls_key) {
        (Some(c), Some(k)) => Ok((
            std::fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?,
            std::fs::read_to_string(k).with_context(|| format!("reading {}", k.display()))?,
        )),
        _ => Ok((
            state.domain.ca.control_chain_pem(),
            state.domain.ca.control_key_pem(),
        )),
    }
}

/// Serve the console on `listener` until `shutdown`.
pub async fn serve(
    state: ConsoleState,
    tls: rustls::ServerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let app = router(state.clone());
    info!(listen = %listener.local_addr()?, origin = %state.origin, "console listening (HTTPS)");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    let drain = CancellationToken::new();
    while let Some((slot, tcp, remote)) = next_connection(&listener, &slots, &shutdown).await? {
        let acceptor = acceptor.clone();
        let app = app.clone();
        let drain = drain.clone();
        connections.spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return debug!(%remote, error = %e, "console TLS handshake failed"),
                Err(_) => return debug!(%remote, "console TLS handshake timed out"),
            };
            let service = TowerToHyperService::new(tower::ServiceExt::map_request(
                app,
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(RemoteAddr(remote));
                    req
                },
            ));
            // The protocol the TLS handshake chose, never hyper-util's auto builder,
            // whose version sniffing waits for a first byte with no timeout: HTTP/1
            // with a deadline on every request head, HTTP/2 with keep-alive pings so a
            // silent peer is dropped, and a bound on its streams.
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            let io = TokioIo::new(tls);
            let result = if h2 {
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder
                    .timer(TokioTimer::new())
                    .keep_alive_interval(H2_KEEP_ALIVE)
                    .keep_alive_timeout(H2_KEEP_ALIVE)
                    .max_concurrent_streams(H2_MAX_STREAMS);
                let conn = builder.serve_connection(io, service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = drain.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.as_mut().await
                    }
                }
            } else {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                let conn = builder.serve_connection(io, service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = drain.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.as_mut().await
                    }
                }
            };
            if let Err(e) = result {
                debug!(%remote, error = %e, "console connection ended with an error");
            }
        });
    }
    drop(listener);
    drain.cancel();
    connections.close();
    if tokio::time::timeout(DRAIN_GRACE, connections.wait())
        .await
        .is_err()
    {
        debug!(left = connections.len(), "console streams cut at shutdown");
    }
    info!("console stopped");
    Ok(())
}

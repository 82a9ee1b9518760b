//! The HTTPS listener: rustls (ring, TLS 1.3) in front of the axum router, with the
//! control leaf issued by our own CA (`spiffe://<td>/control` plus its DNS names and IPs).
//!
//! Limits, so that clients without credentials cannot hold connections (tasks, file
//! descriptors) without end: at most `http.max_connections` at once (further ones wait
//! in the kernel's accept queue); [`TLS_HANDSHAKE_TIMEOUT`] for the handshake; HTTP/1.1
//! only; `http.header_read_timeout` to send a request's header, which also closes a
//! keep-alive connection idle that long; `http.request_timeout` for a whole request (a
//! body dribbled byte by byte included). See [`crate::http::HttpSettings`].

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::http::rate_limit::RemoteAddr;
use crate::http::{router, AppState};
use crate::metrics::Reason;

/// Longest TLS handshake a client gets.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The rustls server config for the control API.
///
/// A client certificate is optional (enrollment has none) but, when presented, must chain
/// to `root_der` through the intermediate the client sends, be within its validity and
/// carry clientAuth; rustls (webpki) checks that at every handshake (sessions are never
/// resumed), before any handler runs. Handlers then decide what the verified identity
/// may do ([`PeerCertificate`]); a keep-alive connection can outlive its certificate, so
/// those that care check the validity again (renewal does).
pub fn tls_config(
    chain_pem: &str,
    key_pem: &str,
    root_der: &[u8],
) -> anyhow::Result<rustls::ServerConfig> {
    let chain = rustls_pemfile::certs(&mut chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())?
        .ok_or_else(|| anyhow::anyhow!("no private key for the control certificate"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(root_der.to_vec()))?;
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No session resumption: a resumed session skips the client certificate's checks (an
    // expired certificate would still get in); every connection verifies it afresh.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(tls)
}

/// The leaf certificate the client presented, DER, already verified by rustls to chain
/// to our root; `None` when the client sent none.
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub Option<Arc<[u8]>>);

impl PeerCertificate {
    /// The certificate's DER, if the client sent one.
    pub fn der(&self) -> Option<&[u8]> {
        self.0.as_deref()
    }
}

/// Serve the API on `listener` until `shutdown`, then drain: stop accepting, let
/// in-flight requests and command streams finish for up to `shutdown.grace` (keep-alive
/// connections close after their current request), tell every broker channel control is
/// going away, and return. Logs whether the drain finished in time.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = tls_config(
        &state.domain.ca.control_chain_pem(),
        &state.domain.ca.control_key_pem(),
        state.domain.ca.root_der(),
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let metrics = state.metrics.clone();
    let limits = state.http.clone();
    let grace = state.shutdown.grace;
    let cluster = state.cluster.clone();
    let app = router(state);
    info!(listen = %listener.local_addr()?, "control API listening (HTTPS)");
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let drain = CancellationToken::new();
    while let Some((slot, tcp, remote)) = next_connection(&listener, &slots, &shutdown).await? {
        // Small writes (NDJSON command output, channel frames) go out at once instead of
        // waiting out Nagle against the peer's delayed ACK (~40 ms each).
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(%remote, error = %e, "cannot set TCP_NODELAY");
        }
        let conn = Connection {
            acceptor: acceptor.clone(),
            app: app.clone(),
            metrics: metrics.clone(),
            header_read_timeout: limits.header_read_timeout,
            drain: drain.clone(),
        };
        connections.spawn(async move {
            let _slot = slot;
            conn.serve(tcp, remote).await
        });
    }
    drop(listener);
    info!(in_flight = connections.len(), grace = ?grace, "control API stopped accepting; draining");
    drain.cancel();
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_ok()
    {
        info!("every in-flight request finished");
    } else {
        warn!(
            left = connections.len(),
            grace = ?grace,
            "shutdown grace over: dropping the connections still in flight"
        );
    }
    if cluster.go_away(BROKER_GOODBYE_TIMEOUT).await {
        info!("every broker channel was told control is going away");
    } else {
        warn!("some broker channels did not close in time");
    }
    info!("control API stopped");
    Ok(())
}

/// Take a connection slot, then the next connection (the permit moves into its task):
/// `None` once `shutdown` fires. Accept errors (out of file descriptors) are logged and
/// retried after a short pause.
pub async fn next_connection(
    listener: &TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
    shutdown: &CancellationToken,
) -> anyhow::Result<
    Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::net::TcpStream,
        std::net::SocketAddr,
    )>,
> {
    let slot = tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        s = slots.clone().acquire_owned() => s?,
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = listener.accept() => match r {
                Ok((tcp, remote)) => return Ok(Some((slot, tcp, remote))),
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// How long shutdown waits for the broker channels to send `GoingAway` and close.
pub const BROKER_GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// What serving one accepted connection needs.
struct Connection {
    acceptor: tokio_rustls::TlsAcceptor,
    app: axum::Router,
    metrics: Arc<crate::metrics::Metrics>,
    header_read_timeout: Duration,
    drain: CancellationToken,
}

impl Connection {
    /// TLS handshake (bounded by [`TLS_HANDSHAKE_TIMEOUT`]), then HTTP/1.1 with upgrades
    /// until the client closes; when control drains, the connection finishes the request
    /// in progress (a command stream included) and closes.
    async fn serve(self, tcp: tokio::net::TcpStream, remote: std::net::SocketAddr) {
        let Connection {
            acceptor,
            app,
            metrics,
            header_read_timeout,
            drain,
        } = self;
        let failed = |reason: &'static str| {
            metrics.tls_failures.get_or_create(&Reason { reason }).inc();
        };
        let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                failed("handshake_failed");
                return debug!(%remote, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                failed("handshake_timeout");
                return debug!(%remote, "TLS handshake timed out");
            }
        };
        // The verified client certificate (if any) and the peer's address (for the rate
        // limit, see `crate::http::rate_limit`) travel with every request of this connection.
        let peer = PeerCertificate(
            tls.get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::<[u8]>::from(c.as_ref())),
        );
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            app,
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req.extensions_mut().insert(RemoteAddr(remote));
                req
            },
        ));
        // hyper's HTTP/1 server directly (not hyper-util's auto builder, whose version
        // sniffing waits for a first byte with no timeout), with upgrades: brokers switch
        // their connection to the cluster channel.
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        let conn = builder
            .serve_connection(TokioIo::new(tls), service)
            .with_upgrades();
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        };
        if let Err(e) = result {
            debug!(%remote, error = %e, "connection ended with an error");
        }
    }
}

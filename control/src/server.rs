//! The HTTPS listener: rustls (ring, TLS 1.3) in front of the axum router, with the
//! control leaf issued by our own CA (`spiffe://<td>/control` plus its DNS names and IPs).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::{router, AppState};

/// Longest TLS handshake a client gets.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The rustls server config for the control API.
pub fn tls_config(chain_pem: &str, key_pem: &str) -> anyhow::Result<rustls::ServerConfig> {
    let chain = rustls_pemfile::certs(&mut chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())?
        .ok_or_else(|| anyhow::anyhow!("no private key for the control certificate"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// Serve the API on `listener` until `shutdown`.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = tls_config(&state.ca.control_chain_pem(), &state.ca.control_key_pem())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let service = TowerToHyperService::new(router(state));
    info!(listen = %listener.local_addr()?, "control API listening (HTTPS)");
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return debug!(%remote, error = %e, "TLS handshake failed"),
                Err(_) => return debug!(%remote, "TLS handshake timed out"),
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    info!("control API stopped");
    Ok(())
}

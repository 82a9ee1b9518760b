//! `--baseline`: the same scenario against a bare quinn mutual-TLS echo server, so the
//! report can say what Tether costs over QUIC + TLS alone.
//!
//! The server ([`serve`], run as the hidden `baseline-server` subcommand in a child
//! process so its memory and CPU are measured alone) uses what the broker uses for
//! everything but Tether itself: the broker's crypto provider
//! ([`tether_broker::tls::provider`]), its transport settings
//! ([`tether_broker::tls::transport_config`] with default settings), its UDP socket
//! ([`tether_broker::tls::bind_udp`]), a broker certificate from the pool, ALPN
//! `tether/1`, no resumption. Clients are verified by rustls' stock WebPKI verifier
//! against the root CA — no allowlist, no session table, no admission control. Each
//! connection's streams are echoed.
//!
//! The clients ([`start_fleet`]) use the agents' own QUIC client configuration
//! ([`tether_agent::client_config`]) and credentials; "connected" means the handshake
//! finished and one 16-byte message came back on a bidirectional stream (the analogue of
//! `Hello`/`Welcome`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tether_agent::{AgentConfig, Credentials};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Endpoints, Fleet, FleetEvent};

/// What the server logs (as a JSON line on stdout) once it listens.
pub const READY_MESSAGE: &str = "baseline listening";
/// Delay before a client retries a failed attempt (plus up to as much jitter): the
/// agents' initial backoff.
const RETRY_AFTER: Duration = tether_agent::config::DEFAULT_BACKOFF_INITIAL;
/// Bytes echoed once per connection.
const PING: &[u8; 16] = b"tether-baseline!";

/// `tether-loadtest baseline-server` (internal).
#[derive(Clone, Debug, Args)]
pub struct ServerArgs {
    /// The server's certificate chain (PEM, leaf first).
    #[arg(long)]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// The root CA client certificates must chain to (PEM).
    #[arg(long)]
    pub ca: PathBuf,
}

/// Serve until killed.
pub async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    let provider = tether_broker::tls::provider();
    let chain = tether_broker::tls::load_certs(&args.cert)?;
    let key = tether_broker::tls::load_key(&args.key)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in tether_broker::tls::load_certs(&args.ca)? {
        roots.add(ca).context("adding the root CA")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("building the client verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![tether_proto::ALPN.to_vec()];
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let broker_cfg = tether_broker::config::Config::default();
    server.transport_config(Arc::new(tether_broker::tls::transport_config(&broker_cfg)));
    let (socket, granted) = tether_broker::tls::bind_udp(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        broker_cfg.transport.udp_recv_buffer,
    )?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    println!(
        "{}",
        serde_json::json!({ "fields": {
            "message": READY_MESSAGE,
            "quic": endpoint.local_addr()?.to_string(),
            "udp_recv_buffer_bytes": granted,
        }})
    );
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(Some(n)) = recv.read(&mut buf).await {
                        if send.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    let _ = send.finish();
                });
            }
        });
    }
    Ok(())
}

/// Start one bare client per credential against `server`; they report through the same
/// [`FleetEvent`]s as the agents.
pub fn start_fleet(
    creds: Vec<Credentials>,
    endpoints: &Endpoints,
    server: SocketAddr,
    concurrency: Option<usize>,
) -> anyhow::Result<Fleet> {
    let stop = CancellationToken::new();
    let (tx, events) = mpsc::unbounded_channel();
    let permits = concurrency.map(|n| Arc::new(Semaphore::new(n)));
    let agent = AgentConfig::default();
    let mut tasks = JoinSet::new();
    for (index, creds) in creds.into_iter().enumerate() {
        let config = tether_agent::client_config(&creds, &agent)
            .with_context(|| format!("client config of {}", creds.appliance_id()))?;
        let endpoint = endpoints.endpoints[index % endpoints.endpoints.len()].clone();
        let (permits, tx, stop) = (permits.clone(), tx.clone(), stop.child_token());
        tasks.spawn(async move {
            let mut permit = match permits {
                Some(p) => tokio::select! {
                    p = p.acquire_owned() => p.ok(),
                    _ = stop.cancelled() => return,
                },
                None => None,
            };
            let started = Instant::now();
            let mut first = true;
            loop {
                let attempt = tokio::select! {
                    r = connect(&endpoint, config.clone(), server) => r,
                    _ = stop.cancelled() => return,
                };
                match attempt {
                    Ok(conn) => {
                        permit.take();
                        let first_connect = first.then(|| started.elapsed());
                        first = false;
                        let _ = tx.send(FleetEvent::Connected {
                            index,
                            first_connect,
                            since_start: started.elapsed(),
                            broker: server,
                            at: Instant::now(),
                        });
                        tokio::select! {
                            e = conn.closed() => {
                                if !stop.is_cancelled() {
                                    let _ = tx.send(FleetEvent::Disconnected {
                                        index,
                                        was_connected: true,
                                        kind: error_kind(&e),
                                        at: Instant::now(),
                                    });
                                }
                            }
                            _ = stop.cancelled() => {
                                conn.close(0u32.into(), b"done");
                                return;
                            }
                        }
                    }
                    Err(kind) => {
                        let _ = tx.send(FleetEvent::Disconnected {
                            index,
                            was_connected: false,
                            kind,
                            at: Instant::now(),
                        });
                    }
                }
                let delay = RETRY_AFTER.mul_f64(1.0 + fastrand::f64());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    Ok(Fleet::from_parts(stop, tasks, events))
}

/// Handshake, then one echo round trip. Errors are report kinds.
async fn connect(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    server: SocketAddr,
) -> Result<quinn::Connection, String> {
    let timeout = tether_agent::config::DEFAULT_CONNECT_TIMEOUT;
    let work = async {
        let conn = endpoint
            .connect_with(config, server, &server.ip().to_string())
            .map_err(|e| format!("connect_{}", snake_error(&e.to_string())))?
            .await
            .map_err(|e| error_kind(&e))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| error_kind(&e))?;
        send.write_all(PING)
            .await
            .map_err(|_| "echo_write".to_owned())?;
        let mut back = [0u8; PING.len()];
        recv.read_exact(&mut back)
            .await
            .map_err(|_| "echo_read".to_owned())?;
        Ok(conn)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err("timed_out".into()))
}

/// Report kind of a QUIC connection error, in the agents' words where they overlap.
fn error_kind(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    match e {
        E::TimedOut => "timed_out".into(),
        E::ConnectionClosed(c) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED => {
            "connection_refused".into()
        }
        E::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            if (0x100..0x200).contains(&code) {
                format!("tls_alert_{}_from_broker", code - 0x100)
            } else {
                "closed_by_server".into()
            }
        }
        E::ApplicationClosed(_) => "closed_by_server".into(),
        E::Reset => "reset".into(),
        E::TransportError(_) => "transport".into(),
        E::LocallyClosed => "closed_locally".into(),
        _ => "other".into(),
    }
}

fn snake_error(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

//! `--baseline`: the same scenario against a bare mutual-TLS echo server on the run's
//! transport, so the report can say what Tether costs over the transport and TLS alone.
//!
//! The server ([`serve`], run as the hidden `baseline-server` subcommand in a child
//! process so its memory and CPU are measured alone) uses what the broker uses for
//! everything but Tether itself: the broker's crypto provider
//! ([`tether_broker::tls::provider`]), a broker certificate from the pool, ALPN
//! `tether/1`, no resumption. Clients are verified by rustls' stock WebPKI verifier
//! against the root CA — no allowlist, no session table, no admission control.
//!
//! - `--transport quic`: quinn with the broker's transport settings
//!   ([`tether_broker::tls::transport_config`] with default settings) on its UDP socket
//!   ([`tether_broker::tls::bind_udp`]). Each connection's streams are echoed.
//! - `--transport tcp`: tokio-rustls over a tokio TCP listener with the broker's backlog
//!   and socket options ([`tether_transport::tcp::tune`]), no yamux. Each connection: the
//!   TLS handshake, the 16-byte message echoed once, then held idle until the client
//!   closes it.
//!
//! The clients ([`start_fleet`]) use the agents' own client configuration and
//! credentials ([`tether_agent::client_config`] over QUIC, [`tether_agent::tls::tls_config`]
//! with a tokio-rustls connector over TCP); "connected" means the handshake finished and
//! one 16-byte message came back (on a bidirectional stream over QUIC, on the TLS stream
//! over TCP: the analogue of `Hello`/`Welcome`).

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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::cli::Transport;
use crate::fleet::{Endpoints, Fleet, FleetEvent};

/// What the server logs (as a JSON line on stdout) once it listens.
pub const READY_MESSAGE: &str = "baseline listening";
/// Delay before a client retries a failed attempt (plus up to as much jitter): the
/// agents' initial backoff.
const RETRY_AFTER: Duration = tether_agent::config::DEFAULT_BACKOFF_INITIAL;
/// Bytes echoed once per connection.
const PING: &[u8; 16] = b"tether-baseline!";
/// The TCP listener's backlog: the broker's (deep enough for a reconnect storm; the kernel
/// caps it at `net.core.somaxconn`).
const TCP_BACKLOG: i32 = 4096;

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
    /// QUIC (quinn) or TLS over TCP (tokio-rustls).
    #[arg(long, value_enum, default_value_t = Transport::Quic)]
    pub transport: Transport,
}

/// Serve until killed.
pub async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    let tls = server_tls(&args)?;
    match args.transport {
        Transport::Quic => serve_quic(tls).await,
        Transport::Tcp => serve_tcp(tls).await,
    }
}

/// The TLS configuration of both transports: the broker's provider, TLS 1.3, the stock
/// WebPKI client verifier against the root CA, ALPN `tether/1`, no resumption.
fn server_tls(args: &ServerArgs) -> anyhow::Result<rustls::ServerConfig> {
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
    Ok(tls)
}

/// The quinn server: every bidirectional stream echoed.
async fn serve_quic(tls: rustls::ServerConfig) -> anyhow::Result<()> {
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

/// The TLS-over-TCP server: per connection the handshake, the 16-byte message echoed
/// once, then reading until the client closes.
async fn serve_tcp(tls: rustls::ServerConfig) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = bind_tcp(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let idle = tether_broker::config::Config::default()
        .transport
        .idle_timeout;
    println!(
        "{}",
        serde_json::json!({ "fields": {
            "message": READY_MESSAGE,
            "tcp": listener.local_addr()?.to_string(),
        }})
    );
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: as the broker, let some finish.
                eprintln!("cannot accept a TCP connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tether_transport::tcp::tune(&stream, idle);
            let Ok(mut tls) = acceptor.accept(stream).await else {
                return;
            };
            let mut buf = [0u8; 1024];
            if tls.read_exact(&mut buf[..PING.len()]).await.is_err()
                || tls.write_all(&buf[..PING.len()]).await.is_err()
                || tls.flush().await.is_err()
            {
                return;
            }
            while let Ok(n) = tls.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
    }
}

/// A TCP listener on `addr` as the broker binds its own: non-blocking, `SO_REUSEADDR`,
/// the broker's backlog.
fn bind_tcp(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("creating a TCP socket")?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding TCP {addr}"))?;
    socket.listen(TCP_BACKLOG)?;
    Ok(tokio::net::TcpListener::from_std(socket.into())?)
}

/// Start one bare client per credential against `server` on `transport`; they report
/// through the same [`FleetEvent`]s as the agents.
pub fn start_fleet(
    creds: Vec<Credentials>,
    transport: Transport,
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
        let dialer = match transport {
            Transport::Quic => Dialer::Quic {
                endpoint: endpoints.endpoints[index % endpoints.endpoints.len()].clone(),
                config: tether_agent::client_config(&creds, &agent)
                    .with_context(|| format!("client config of {}", creds.appliance_id()))?,
            },
            Transport::Tcp => Dialer::Tcp {
                config: tether_agent::tls::tls_config(&creds)
                    .with_context(|| format!("TLS config of {}", creds.appliance_id()))?,
            },
        };
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
                    r = dialer.connect(server) => r,
                    _ = stop.cancelled() => return,
                };
                match attempt {
                    Ok(mut conn) => {
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
                            kind = conn.closed() => {
                                if !stop.is_cancelled() {
                                    let _ = tx.send(FleetEvent::Disconnected {
                                        index,
                                        was_connected: true,
                                        kind,
                                        at: Instant::now(),
                                    });
                                }
                            }
                            _ = stop.cancelled() => {
                                conn.close();
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

/// How one bare client connects.
enum Dialer {
    /// Through a shared quinn endpoint, with the agents' QUIC client configuration.
    Quic {
        endpoint: quinn::Endpoint,
        config: quinn::ClientConfig,
    },
    /// Over its own TCP socket, with the agents' TLS configuration.
    Tcp { config: Arc<rustls::ClientConfig> },
}

/// A bare client's connection.
enum Conn {
    Quic(quinn::Connection),
    // Boxed: a TLS stream holds rustls' state and buffers inline.
    Tcp(Box<TlsStream<TcpStream>>),
}

impl Dialer {
    /// Handshake, then one echo round trip, within the agents' connect timeout. Errors
    /// are report kinds.
    async fn connect(&self, server: SocketAddr) -> Result<Conn, String> {
        let timeout = tether_agent::config::DEFAULT_CONNECT_TIMEOUT;
        let work = async {
            match self {
                Dialer::Quic { endpoint, config } => connect_quic(endpoint, config.clone(), server)
                    .await
                    .map(Conn::Quic),
                Dialer::Tcp { config } => connect_tcp(config.clone(), server)
                    .await
                    .map(|s| Conn::Tcp(Box::new(s))),
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| Err("timed_out".into()))
    }
}

impl Conn {
    /// Wait until the server ends the connection; returns the report kind of why.
    async fn closed(&mut self) -> String {
        match self {
            Conn::Quic(conn) => error_kind(&conn.closed().await),
            Conn::Tcp(tls) => {
                let mut buf = [0u8; 64];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) => return "closed_by_server".into(),
                        Ok(_) => {}
                        Err(e) => return io_kind(&e),
                    }
                }
            }
        }
    }

    /// Close it now (the fleet is stopping).
    fn close(self) {
        match self {
            Conn::Quic(conn) => conn.close(0u32.into(), b"done"),
            // Dropping the socket sends FIN: the server's read ends.
            Conn::Tcp(tls) => drop(tls),
        }
    }
}

/// QUIC handshake, then one echo round trip on a bidirectional stream.
async fn connect_quic(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    server: SocketAddr,
) -> Result<quinn::Connection, String> {
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
}

/// TCP connect with the agents' socket options, TLS handshake, then one echo round trip
/// on the TLS stream.
async fn connect_tcp(
    config: Arc<rustls::ClientConfig>,
    server: SocketAddr,
) -> Result<TlsStream<TcpStream>, String> {
    let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
    let tcp = TcpStream::connect(server).await.map_err(|e| io_kind(&e))?;
    let _ = tether_transport::tcp::tune(&tcp, tether_agent::tls::IDLE_TIMEOUT);
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| tls_kind(&e))?;
    tls.write_all(PING)
        .await
        .map_err(|_| "echo_write".to_owned())?;
    tls.flush().await.map_err(|_| "echo_write".to_owned())?;
    let mut back = [0u8; PING.len()];
    tls.read_exact(&mut back)
        .await
        .map_err(|_| "echo_read".to_owned())?;
    Ok(tls)
}

/// Report kind of a failed TLS handshake over TCP, in the agents' words where they
/// overlap.
fn tls_kind(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("tls_alert_{}_from_broker", u8::from(*alert))
        }
        Some(_) => "tls".into(),
        None => io_kind(e),
    }
}

/// Report kind of a socket error.
fn io_kind(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "connection_refused".into(),
        K::ConnectionReset => "reset".into(),
        K::TimedOut => "timed_out".into(),
        K::UnexpectedEof | K::ConnectionAborted | K::BrokenPipe => "closed_by_server".into(),
        // EMFILE/ENFILE: the open-files limit; EADDRNOTAVAIL: out of local ports.
        _ => match e.raw_os_error() {
            Some(24) | Some(23) => "too_many_open_files".into(),
            Some(99) => "no_local_port".into(),
            _ => "transport".into(),
        },
    }
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

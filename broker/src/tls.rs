//! TLS and QUIC configuration: loading PEM files, the rustls server config, the transport
//! config and the UDP socket.
//!
//! Crypto provider: *ring*. It builds with a C compiler only (no cmake, no Go), compiles in
//! seconds on the 2-core CI machines, and its P-256 and X25519 are assembly-optimised; the
//! handshake cost is dominated by one P-256 signature and two verifications either way.
//! Cipher suites are limited to the SHA-256 ones (AES-128-GCM, ChaCha20-Poly1305), so no
//! handshake pays for SHA-384's transcript hash.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use thiserror::Error;

use crate::config::Config;
use crate::verifier::ApplianceVerifier;

/// Incoming connections quinn may hold beyond our own queue before it starts ignoring
/// Initial packets (see [`server_config`]).
pub const INCOMING_SLACK: usize = 4096;

/// A TLS file that cannot be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no certificate.
    #[error("{0}: no PEM certificate found")]
    NoCertificate(String),
    /// The file holds no private key.
    #[error("{0}: no PEM private key found")]
    NoKey(String),
    /// rustls refused the certificate or key.
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the TLS configuration.
    #[error("TLS configuration not usable for QUIC: {0}")]
    Quic(String),
}

/// Read every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.display().to_string()));
    }
    Ok(certs)
}

/// Read the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey(path.display().to_string()))
}

/// The crypto provider: ring, SHA-256 cipher suites only, X25519 first.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The broker's own certificate and key, swappable while the broker runs: the QUIC server
/// presents it to agents, and in control mode the broker presents it to control. A renewal
/// [`CertStore::swap`]s in the new one; handshakes already under way keep the old one.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    /// A store holding `chain` (leaf first) and its `key`. Fails if the provider cannot use
    /// the key or the key does not match the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: &CryptoProvider,
    ) -> Result<CertStore, TlsError> {
        Ok(CertStore {
            current: ArcSwap::from_pointee(certified_key(chain, key, provider)?),
        })
    }

    /// Read the chain and key from PEM files.
    pub fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertStore, TlsError> {
        CertStore::new(load_certs(cert)?, load_key(key)?, provider)
    }

    /// Replace the certificate; the next handshake uses the new one.
    pub fn swap(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    /// The certificate in force.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

/// A rustls signing key for `chain`, checked against the leaf.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::NoCertificate("certificate chain".into()));
    }
    let signing = provider.key_provider.load_private_key(key)?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()?;
    Ok(ck)
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let ck = self.current();
        ck.key.choose_scheme(sigschemes).is_some().then_some(ck)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The TLS configuration both transports serve: TLS 1.3, ALPN `tether/1`, the appliance
/// verifier, no session resumption (a resumed handshake would skip the verifier). The
/// certificate comes from `cert`, so a renewal takes effect without a restart.
pub fn tls_config(
    verifier: Arc<ApplianceVerifier>,
    cert: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![tether_proto::ALPN.to_vec()];
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// The QUIC server config: [`tls_config`] with a transport tuned for small control
/// traffic.
pub fn server_config(
    cfg: &Config,
    tls: rustls::ServerConfig,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(cfg)));
    // quinn silently ignores Initials beyond `max_incoming` (clients then retransmit for
    // seconds). Keep its bound above ours so the accept loop, not quinn, turns the excess
    // away — explicitly, cheaply and counted; quinn's bound stays as the last resort when
    // the accept loop itself falls behind by INCOMING_SLACK.
    server.max_incoming(
        cfg.limits.max_pending_handshakes + cfg.limits.max_concurrent_handshakes + INCOMING_SLACK,
    );
    Ok(server)
}

/// Transport settings for small control traffic: one session stream opened by the agent
/// (a second is allowed by flow control only so that the broker sees it and closes the
/// connection with a protocol error), no unidirectional streams, no datagrams, modest
/// windows, no MTU discovery timers, and no UDP segmentation offload by default: with GSO
/// every connection keeps a send buffer sized for ten datagrams (measured: 54.5 KB per
/// idle connection with it, 41.2 KB without, at 5,000 connections), while control traffic
/// rarely has more than one datagram to send.
pub fn transport_config(cfg: &Config) -> quinn::TransportConfig {
    let t = &cfg.transport;
    let mut tc = quinn::TransportConfig::default();
    tc.max_concurrent_bidi_streams(2u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(t.stream_receive_window.into())
        .receive_window(t.receive_window.into())
        .send_window(t.send_window)
        .datagram_receive_buffer_size(None)
        .mtu_discovery_config(None)
        .keep_alive_interval(None)
        .enable_segmentation_offload(t.segmentation_offload);
    if let Ok(idle) = quinn::IdleTimeout::try_from(t.idle_timeout) {
        tc.max_idle_timeout(Some(idle));
    }
    tc
}

/// Ask for `recv` bytes of receive and `send` bytes of send buffer on `socket`. The
/// kernel caps `SO_RCVBUF`/`SO_SNDBUF` at `net.core.rmem_max`/`wmem_max`; a process with
/// `CAP_NET_ADMIN` (root, or a container granted it) may go above with
/// `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`, which is tried when the plain request fell short.
/// Returns the receive buffer granted, as the kernel reports it (Linux: twice the usable
/// size), and whether the force option gave it.
pub fn grow_udp_buffers(socket: &socket2::Socket, recv: usize, send: usize) -> (usize, bool) {
    if let Err(e) = socket.set_recv_buffer_size(recv) {
        tracing::warn!(error = %e, requested = recv, "cannot set UDP receive buffer");
    }
    let _ = socket.set_send_buffer_size(send);
    let mut forced = false;
    #[cfg(target_os = "linux")]
    {
        use nix::sys::socket::{setsockopt, sockopt};
        if socket.recv_buffer_size().unwrap_or(0) < recv {
            forced = setsockopt(socket, sockopt::RcvBufForce, &recv).is_ok();
        }
        if socket.send_buffer_size().unwrap_or(0) < send {
            let _ = setsockopt(socket, sockopt::SndBufForce, &send);
        }
    }
    (socket.recv_buffer_size().unwrap_or(0), forced)
}

/// A QUIC client endpoint bound to `bind`, its UDP socket's receive and send buffers
/// grown to `buffer` bytes as [`grow_udp_buffers`] does, and the buffers granted (receive,
/// send; Linux reports twice the usable size). For processes that run many agents on one
/// socket (`tether up`, the fleet simulator): the answers to a burst of handshakes overflow
/// the kernel's default buffer, and a dropped handshake datagram costs its agent quinn's
/// first probe timeout, about a second.
pub fn client_endpoint(
    bind: SocketAddr,
    buffer: usize,
) -> std::io::Result<(quinn::Endpoint, usize, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    let size = buffer.min(i32::MAX as usize);
    grow_udp_buffers(&sock, size, size);
    sock.bind(&bind.into())?;
    sock.set_nonblocking(true)?;
    let (recv, send) = (sock.recv_buffer_size()?, sock.send_buffer_size()?);
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        sock.into(),
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, recv, send))
}

/// Bind the UDP socket, asking the kernel for a large receive buffer; logs what it granted.
pub fn bind_udp(
    addr: SocketAddr,
    recv_buffer: usize,
) -> std::io::Result<(std::net::UdpSocket, usize)> {
    let (socket, granted) = bind_one(addr, recv_buffer, false)?;
    Ok((socket.into(), granted))
}

/// Bind `count` UDP sockets (at least one) to `addr`, each asking for `recv_buffer` bytes
/// of receive buffer; returns them with the receive buffer the first was granted.
///
/// One socket is bound as [`bind_udp`] binds it, without `SO_REUSEPORT`, so a second
/// process on the same port fails to start instead of silently taking half the traffic.
/// Above one, every socket sets `SO_REUSEPORT` before binding (Linux: the kernel then
/// spreads datagrams over them by a hash of the client's address and port, so one
/// client's packets keep reaching the same socket); with port 0 the first socket picks
/// the port and the others bind to it.
pub fn bind_udp_group(
    addr: SocketAddr,
    count: usize,
    recv_buffer: usize,
) -> std::io::Result<(Vec<std::net::UdpSocket>, usize)> {
    let reuse_port = count > 1;
    let (first, granted) = bind_one(addr, recv_buffer, reuse_port)?;
    let bound = first.local_addr()?.as_socket().unwrap_or(addr);
    let mut sockets = Vec::with_capacity(count);
    sockets.push(first.into());
    for _ in 1..count {
        let (socket, _) = bind_one(bound, recv_buffer, reuse_port)?;
        sockets.push(socket.into());
    }
    Ok((sockets, granted))
}

fn bind_one(
    addr: SocketAddr,
    recv_buffer: usize,
    reuse_port: bool,
) -> std::io::Result<(socket2::Socket, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Best effort: dual-stack where the OS allows.
        let _ = socket.set_only_v6(false);
    }
    if reuse_port {
        set_reuse_port(&socket)?;
    }
    let (granted, forced) = grow_udp_buffers(&socket, recv_buffer, 4 * 1024 * 1024);
    socket.bind(&addr.into())?;
    // Linux reports twice the usable size it granted.
    if granted < recv_buffer {
        tracing::warn!(
            requested = recv_buffer,
            granted,
            "UDP receive buffer smaller than requested: raise net.core.rmem_max \
             (sysctl -w net.core.rmem_max={recv_buffer}), or run with CAP_NET_ADMIN, to \
             survive reconnect storms"
        );
    } else {
        tracing::info!(
            requested = recv_buffer,
            granted,
            above_rmem_max = forced,
            "UDP receive buffer"
        );
    }
    Ok((socket, granted))
}

#[cfg(target_os = "linux")]
fn set_reuse_port(socket: &socket2::Socket) -> std::io::Result<()> {
    socket.set_reuse_port(true)
}

/// Elsewhere `SO_REUSEPORT` does not spread UDP datagrams over the sockets (the config
/// refuses `transport.endpoints` above 1 there).
#[cfg(not(target_os = "linux"))]
fn set_reuse_port(_socket: &socket2::Socket) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "several QUIC endpoints on one port need Linux SO_REUSEPORT",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    const BUFFER: usize = 256 * 1024;

    #[test]
    fn a_group_shares_one_port_picked_by_the_first_socket() {
        let (sockets, _) = bind_udp_group("127.0.0.1:0".parse().unwrap(), 3, BUFFER).unwrap();
        assert_eq!(sockets.len(), 3);
        let first = sockets[0].local_addr().unwrap();
        assert_ne!(first.port(), 0);
        for s in &sockets {
            assert_eq!(s.local_addr().unwrap(), first);
        }
    }

    #[test]
    fn a_single_socket_does_not_share_its_port() {
        let (sockets, _) = bind_udp_group("127.0.0.1:0".parse().unwrap(), 1, BUFFER).unwrap();
        let addr = sockets[0].local_addr().unwrap();
        let err = bind_udp_group(addr, 2, BUFFER).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}

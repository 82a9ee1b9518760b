//! QUIC client configuration: TLS 1.3 with the ring provider, the appliance certificate for
//! client authentication, [`BrokerVerifier`] for the broker, ALPN [`tether_proto::ALPN`],
//! and a transport sized for small control traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::config::AgentConfig;
use crate::credentials::{CredentialError, Credentials};
use crate::verifier::broker_verifier;

/// QUIC keep-alive interval: 25 s, what an agent announcing `sparse-heartbeats/1` promises
/// ([`tether_proto::capability::SPARSE_HEARTBEATS_KEEP_ALIVE`]). quinn restarts it on every
/// packet received, so while heartbeats flow every interval (each one acknowledged at once)
/// it does not fire; between sparse heartbeats it is the one exchange per interval that
/// keeps the path and the NAT binding alive, at no cost to the broker's session task.
pub const KEEP_ALIVE_INTERVAL: Duration = tether_proto::capability::SPARSE_HEARTBEATS_KEEP_ALIVE;
/// QUIC idle timeout (and `TCP_USER_TIMEOUT` over TCP): 40 s without any packet ends the
/// connection. With 25 s heartbeats that leaves a heartbeat 15 s to be late (a busy
/// appliance, a retransmission) before either end gives up, as 30 s did with 15 s
/// heartbeats; a broker that died without a word is noticed 40 s after its last packet.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(40);
/// Connection-wide receive window: 256 KiB.
pub const RECEIVE_WINDOW: u32 = 256 * 1024;
/// Send window: 256 KiB.
pub const SEND_WINDOW: u64 = 256 * 1024;
/// Broker-opened bidirectional streams allowed beyond `max_concurrent_commands`, so that
/// a busy agent can still answer `Busy` instead of stalling the broker.
pub const EXTRA_COMMAND_STREAMS: usize = 4;

/// The QUIC client configuration for `creds`.
pub fn client_config(
    creds: &Credentials,
    cfg: &AgentConfig,
) -> Result<quinn::ClientConfig, CredentialError> {
    quic_client_config(tls_config(creds)?, cfg)
}

/// The QUIC client configuration on an existing [`tls_config`] (an agent builds its TLS
/// configuration once, for both transports).
pub fn quic_client_config(
    tls: Arc<rustls::ClientConfig>,
    cfg: &AgentConfig,
) -> Result<quinn::ClientConfig, CredentialError> {
    let quic = QuicClientConfig::try_from(tls).map_err(|e| CredentialError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config(cfg)));
    Ok(config)
}

/// The TLS configuration both transports use: TLS 1.3, the appliance certificate, the
/// broker verifier, ALPN `tether/1`, no resumption.
pub fn tls_config(creds: &Credentials) -> Result<Arc<rustls::ClientConfig>, CredentialError> {
    let verifier = Arc::new(broker_verifier(creds.ca_certs(), creds.trust_domain())?);
    let mut provider = rustls::crypto::ring::default_provider();
    // Prefer AES-128-GCM-SHA256: same security margin for this use, no SHA-384 cost.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CredentialError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(ClientCert(creds.certified_key())));
    tls.alpn_protocols = vec![tether_proto::ALPN.to_vec()];
    // Session tickets would let a revoked certificate's session resume; none needed.
    tls.resumption = rustls::client::Resumption::disabled();
    tls.enable_early_data = false;
    Ok(Arc::new(tls))
}

fn transport_config(cfg: &AgentConfig) -> TransportConfig {
    let mut t = TransportConfig::default();
    let streams = cfg
        .max_concurrent_commands
        .saturating_add(EXTRA_COMMAND_STREAMS);
    t.max_concurrent_bidi_streams(VarInt::from_u32(u32::try_from(streams).unwrap_or(u32::MAX)))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok())
        // One full frame in flight per stream is enough for control traffic.
        .stream_receive_window(VarInt::from_u32(
            u32::try_from(cfg.max_frame_len + tether_proto::FRAME_HEADER_LEN).unwrap_or(u32::MAX),
        ))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .datagram_receive_buffer_size(None)
        .ack_frequency_config(Some(immediate_acks()));
    t
}

/// Ask the broker (QUIC acknowledgement frequency extension, which quinn brokers support)
/// to acknowledge each of our packets at once instead of after its 25 ms delayed-ACK
/// timer. What an idle agent sends is one heartbeat per interval: without this, each one
/// costs the broker a timer and a second pass of its connection task to send the ACK
/// alone. What the agent sends in bulk (command output, tunnels) gets an ACK per packet
/// instead of per two, a small price on links that carry little.
fn immediate_acks() -> quinn::AckFrequencyConfig {
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(VarInt::from_u32(0));
    acks
}

/// A client-only endpoint bound to `bind` (e.g. `0.0.0.0:0`), usable by many agents at
/// once: each connection carries its own client configuration.
pub fn client_endpoint(bind: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::client(bind)
}

/// Always presents the appliance certificate.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // Only offer the certificate if the broker accepts a scheme our key can sign with.
        self.0.key.choose_scheme(sigschemes).map(|_| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

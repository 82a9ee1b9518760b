//! Replica identity: the id a replica keeps in its data directory, the check that the
//! database belongs to this replica's CA (`control_meta`), and the registry heartbeat
//! (`control_replicas`, on the database's clock).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::store::{ControlMeta, ReplicaInfo, Store, StoreError};

/// The file in the data directory holding the replica's id.
pub const REPLICA_ID_FILE: &str = "replica.id";
/// How often a replica refreshes its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A replica is live while its heartbeat is at most this old (seconds, database clock).
pub const LIVE_WITHIN_SECS: i64 = 15;
/// The response header naming the replica that answered.
pub const REPLICA_HEADER: &str = "tether-control-replica";

/// `[replica]` in `control.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicaSettings {
    /// Where brokers and clients reach this replica (`host:port`). Default: the address
    /// the API listener is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// PostgreSQL: listen for the change notifications other replicas send (default
    /// true). False: changes from other replicas arrive by the one-second poll only.
    pub notify: bool,
    /// PostgreSQL: where the change listener connects (default: `database_url`). It
    /// holds one session of its own, so it must bypass a transaction pooler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_database_url: Option<String>,
    /// How often the `abandon_commands` job looks for commands whose replica is lost
    /// (one replica runs it per period). Default 30 s ([`DEFAULT_ABANDON_COMMANDS_EVERY`]).
    #[serde(with = "humantime_serde")]
    pub abandon_commands_every: Duration,
    /// A replica whose heartbeat is older than this is lost: its commands in flight get
    /// the outcome `replica_lost`. Default 30 s ([`DEFAULT_LOST_AFTER`]); longer than
    /// [`HEARTBEAT_EVERY`], whole seconds (the database's clock counts seconds).
    #[serde(with = "humantime_serde")]
    pub lost_after: Duration,
}

/// [`ReplicaSettings::abandon_commands_every`]'s default.
pub const DEFAULT_ABANDON_COMMANDS_EVERY: Duration = Duration::from_secs(30);
/// [`ReplicaSettings::lost_after`]'s default.
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(30);

impl Default for ReplicaSettings {
    fn default() -> Self {
        ReplicaSettings {
            advertise: None,
            notify: true,
            listen_database_url: None,
            abandon_commands_every: DEFAULT_ABANDON_COMMANDS_EVERY,
            lost_after: DEFAULT_LOST_AFTER,
        }
    }
}

/// Whether `advertise` (`host:port`) names a wildcard address (`0.0.0.0`, `::`), which
/// brokers cannot dial: they would never reach this replica directly.
pub fn is_wildcard_advertise(advertise: &str) -> bool {
    match advertise.parse::<std::net::SocketAddr>() {
        Ok(a) => a.ip().is_unspecified(),
        Err(_) => {
            // A bare address (`::`, `0.0.0.0`), then `host:port` with a name or brackets.
            let bare = advertise.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
                return ip.is_unspecified();
            }
            let host = advertise
                .rsplit_once(':')
                .map_or(advertise, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            host.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified())
        }
    }
}

/// Why a replica cannot serve this database.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetaMismatch {
    /// The database was initialised for another trust domain.
    #[error(
        "the database belongs to trust domain {recorded:?}, this replica's is {ours:?}: \
         refusing to serve it"
    )]
    TrustDomain {
        /// The database's.
        recorded: String,
        /// This replica's.
        ours: String,
    },
    /// The database was initialised with another root CA.
    #[error(
        "the database belongs to root CA {recorded} (SHA-256), this replica's root is {ours}: \
         refusing to serve it"
    )]
    RootFingerprint {
        /// The database's.
        recorded: String,
        /// This replica's.
        ours: String,
    },
}

/// Why the replica could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The database belongs to another fleet.
    #[error(transparent)]
    Mismatch(#[from] MetaMismatch),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The id file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// SHA-256 of the root CA certificate's DER, lowercase hex.
pub fn root_fingerprint(root_der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, root_der))
}

/// Compare the database's record with ours.
pub fn check_meta(recorded: &ControlMeta, ours: &ControlMeta) -> Result<(), MetaMismatch> {
    if recorded.trust_domain != ours.trust_domain {
        return Err(MetaMismatch::TrustDomain {
            recorded: recorded.trust_domain.clone(),
            ours: ours.trust_domain.clone(),
        });
    }
    if recorded.root_fingerprint != ours.root_fingerprint {
        return Err(MetaMismatch::RootFingerprint {
            recorded: recorded.root_fingerprint.clone(),
            ours: ours.root_fingerprint.clone(),
        });
    }
    Ok(())
}

/// Record `ours` in a database that has no record yet (a store made before replicas
/// existed), then check that the record in force is ours.
pub async fn claim_database(
    store: &dyn Store,
    ours: &ControlMeta,
    now: i64,
) -> Result<(), ReplicaError> {
    let recorded = store.record_control_meta(ours, now).await?;
    check_meta(&recorded, ours)?;
    Ok(())
}

/// The replica id kept in `data_dir`, generated (16 random bytes, hex) and stored on
/// first use.
pub fn replica_id(data_dir: &Path) -> Result<String, ReplicaError> {
    let path = data_dir.join(REPLICA_ID_FILE);
    let io = |source| ReplicaError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| io(std::io::Error::other("no randomness")))?;
    let id = hex::encode(bytes);
    std::fs::write(&path, format!("{id}\n")).map_err(io)?;
    Ok(id)
}

/// How long `/readyz` waits for the database before answering 503.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the replica can serve: its database answers within [`READY_TIMEOUT`] and
/// takes writes. `Err` carries a short reason for the 503 body (no URL, no secret).
pub async fn readiness(store: &dyn Store) -> Result<(), &'static str> {
    match tokio::time::timeout(READY_TIMEOUT, store.writable()).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err("database is read-only (a standby)"),
        Ok(Err(_)) => Err("database unreachable"),
        Err(_) => Err("database did not answer in time"),
    }
}

/// Refresh `info`'s heartbeat every [`HEARTBEAT_EVERY`] until `shutdown` (the first one
/// is the caller's, at start), and after each one (and at once) hand the live replicas to
/// `fleet`, which tells the brokers. A failed heartbeat or read is logged; the next one
/// retries.
pub async fn heartbeat_forever(
    store: Arc<dyn Store>,
    info: ReplicaInfo,
    fleet: Arc<dyn crate::domain::Fleet>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        match store.live_replicas(LIVE_WITHIN_SECS).await {
            Ok(live) => fleet.replicas_live(
                &info.id,
                live.into_iter()
                    .map(|r| tether_proto::cluster::ReplicaAddr {
                        id: r.info.id,
                        advertise: r.info.advertise,
                    })
                    .collect(),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot read the live replicas"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = store.replica_heartbeat(&info, false).await {
            tracing::warn!(error = %e, replica = %info.id, "replica heartbeat failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_advertise_addresses_are_recognised() {
        for a in ["0.0.0.0:8443", "[::]:8443", "::", "0.0.0.0"] {
            assert!(is_wildcard_advertise(a), "{a}");
        }
        for a in [
            "10.0.0.5:8443",
            "[::1]:8443",
            "control-1.example:8443",
            "localhost",
        ] {
            assert!(!is_wildcard_advertise(a), "{a}");
        }
    }

    fn meta(td: &str, fp: &str) -> ControlMeta {
        ControlMeta {
            trust_domain: td.into(),
            root_fingerprint: fp.into(),
        }
    }

    #[test]
    fn a_database_of_another_fleet_is_refused_naming_both() {
        assert_eq!(
            check_meta(&meta("a.example", "aa"), &meta("a.example", "aa")),
            Ok(())
        );
        let e = check_meta(&meta("a.example", "aa"), &meta("b.example", "aa")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("a.example") && text.contains("b.example"),
            "{text}"
        );
        let e = check_meta(&meta("a.example", "aa"), &meta("a.example", "bb")).unwrap_err();
        assert_eq!(
            e,
            MetaMismatch::RootFingerprint {
                recorded: "aa".into(),
                ours: "bb".into()
            }
        );
    }
}

//! One broker's channel: the `Hello`, then a writer (allowlist versions as soon as the
//! store commits them, renewals, closes, commands, pings) and a reader (presence, command
//! events) until either ends.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tether_proto::cluster::{
    self, SessionReport, ToBroker, ToControl, CHANNEL_IDLE_TIMEOUT_SECS, CHANNEL_PING_SECS,
    MAX_FRAME_LEN, SNAPSHOT_CHUNK,
};
use tether_proto::CommandFailure;
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::{
    lock, Cluster, ExecEvent, InFlight, Link, HELLO_TIMEOUT, LINK_QUEUE, MAX_DELTAS_ON_RESUME,
};
use crate::metrics::{Metrics, Reason};
use crate::store::Store;
use tether_audit::{action, Actor, AuditEvent};

/// What a link needs: the cluster it joins, the store it follows, the metrics it counts.
#[derive(Clone, Debug)]
pub struct LinkState {
    /// The cluster.
    pub cluster: Arc<Cluster>,
    /// The store (allowlist versions, the broker's address).
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

type Channel<T> = Framed<T, LengthDelimitedCodec>;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// Why a link ended with an error.
#[derive(Debug)]
struct LinkError {
    reason: &'static str,
    detail: String,
}

fn link_error(reason: &'static str, detail: impl ToString) -> LinkError {
    LinkError {
        reason,
        detail: detail.to_string(),
    }
}

/// What a broker said in its `Hello`.
struct Hello {
    quic_addr: String,
    tunnel: bool,
    /// It listed [`tether_proto::cluster::FEATURE_REPLICAS`].
    replicas: bool,
    /// It listed [`tether_proto::cluster::FEATURE_DRAIN`].
    drain: bool,
    since: u64,
    /// The digest of `since` as the broker applied it (empty: unknown).
    digest: String,
    sessions: Vec<SessionReport>,
}

/// Serve one broker channel until it ends (or control goes away), in a span naming the
/// broker.
pub async fn run_link<T>(s: LinkState, name: String, io: T)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let span = tracing::info_span!("broker_link", broker = %name);
    let tracker = s.cluster.link_tasks.clone();
    tracker
        .track_future(link(s, name, io))
        .instrument(span)
        .await
}

async fn link<T>(s: LinkState, name: String, io: T)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let framed: Channel<T> = Framed::new(io, codec());
    let (mut sink, mut stream) = framed.split();
    let hello = match read_hello(&mut stream, &name).await {
        Ok(h) => h,
        Err(e) => return end_with(&s, &name, e),
    };
    let now = crate::now_unix();
    if let Err(e) = s.store.broker_seen(&name, &hello.quic_addr, now).await {
        warn!(error = %e, "cannot record the broker's address");
    }
    let (tx, rx) = mpsc::channel::<ToBroker>(LINK_QUEUE);
    let ended = CancellationToken::new();
    let applied = Arc::new(AtomicU64::new(hello.since));
    let replicas_connected = Arc::new(AtomicUsize::new(0));
    let draining = Arc::new(AtomicBool::new(false));
    let takes_replicas = hello.replicas;
    let link_id = s.cluster.register_link(
        &name,
        Link {
            id: 0,
            tx,
            quic_addr: hello.quic_addr,
            connected_at: now.max(0) as u64,
            applied: applied.clone(),
            ended: ended.clone(),
            tunnel: hello.tunnel,
            replicas_connected: replicas_connected.clone(),
            drain: hello.drain,
            draining: draining.clone(),
        },
        hello.sessions,
    );
    s.metrics
        .brokers_connected
        .set(lock(&s.cluster.links).len() as i64);
    s.metrics.sessions.set(s.cluster.session_count());

    let writer = write_loop(
        &s,
        &mut sink,
        (hello.since, hello.digest),
        takes_replicas,
        rx,
        &ended,
    );
    let reader = read_loop(
        &s,
        &name,
        &mut stream,
        link_id,
        Watched {
            applied: &applied,
            replicas_connected: &replicas_connected,
            draining: &draining,
            ended: &ended,
        },
    );
    let result = tokio::select! {
        r = writer => r,
        r = reader => r,
        _ = ended.cancelled() => Ok(()),
    };
    ended.cancel();
    unregister_link(&s, &name, link_id);
    match result {
        Ok(()) => info!("broker channel ended"),
        Err(e) => end_with(&s, &name, e),
    }
}

/// The broker's first frame, which must be a `Hello` naming the broker its certificate
/// names, within [`HELLO_TIMEOUT`].
async fn read_hello<S>(stream: &mut S, name: &str) -> Result<Hello, LinkError>
where
    S: futures_util::Stream<Item = std::io::Result<bytes::BytesMut>> + Unpin,
{
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(frame))) => cluster::decode::<ToControl>(&frame),
        Ok(Some(Err(e))) => Err(cluster::FrameError::Malformed(e.to_string())),
        Ok(None) => Err(cluster::FrameError::Malformed("closed before Hello".into())),
        Err(_) => Err(cluster::FrameError::Malformed("no Hello in time".into())),
    };
    match hello {
        Ok(ToControl::Hello {
            name: said,
            quic_addr,
            allowlist_version,
            allowlist_digest,
            sessions,
            version,
            features,
        }) if said == name => {
            info!(%quic_addr, allowlist_version, sessions = sessions.len(), broker_version = %version, "broker channel up");
            Ok(Hello {
                quic_addr,
                tunnel: features
                    .iter()
                    .any(|f| f == tether_proto::cluster::FEATURE_TUNNEL),
                replicas: features
                    .iter()
                    .any(|f| f == tether_proto::cluster::FEATURE_REPLICAS),
                drain: features
                    .iter()
                    .any(|f| f == tether_proto::cluster::FEATURE_DRAIN),
                since: allowlist_version,
                digest: allowlist_digest,
                sessions,
            })
        }
        Ok(other) => Err(link_error(
            "bad_hello",
            format!("expected Hello naming {name}, got {other:?}"),
        )),
        Err(e) => Err(link_error("bad_hello", e)),
    }
}

/// The writer: the initial sync, then versions as they are committed, queued messages
/// and pings; [`ToBroker::GoingAway`] when control shuts down.
async fn write_loop<S>(
    s: &LinkState,
    sink: &mut S,
    (since, digest): (u64, String),
    takes_replicas: bool,
    mut rx: mpsc::Receiver<ToBroker>,
    ended: &CancellationToken,
) -> Result<(), LinkError>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    let mut sent = sync_from(s, sink, since, &digest).await?;
    send(
        sink,
        &ToBroker::Synced {
            version: sent,
            accepts: vec![
                tether_proto::cluster::ACCEPTS_MANIFEST_BACKLOG.to_owned(),
                tether_proto::cluster::ACCEPTS_DRAINING.to_owned(),
            ],
        },
    )
    .await?;
    let generations = s
        .store
        .renewal_generations()
        .await
        .map_err(|e| link_error("store", e))?;
    let generations = generations
        .into_iter()
        .map(|(id, g)| (id, g.max(0) as u64))
        .collect();
    send(sink, &ToBroker::Renewals { generations }).await?;
    // The replicas, to a broker that holds a channel to each (and again when they change).
    let mut replicas = s.cluster.replicas();
    if takes_replicas {
        let set = replicas.borrow_and_update().clone();
        send_replicas(sink, set).await?;
    }
    let mut watch = s.store.allowlist_watch();
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ping = Duration::from_secs(CHANNEL_PING_SECS);
    let mut last_sent = tokio::time::Instant::now();
    let going_away = s.cluster.going_away.clone();
    loop {
        tokio::select! {
            _ = ended.cancelled() => return Ok(()),
            _ = going_away.cancelled() => {
                send(sink, &ToBroker::GoingAway).await?;
                let _ = sink.close().await;
                info!("told the broker control is going away");
                return Ok(());
            }
            changed = watch.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                sent = push_new_versions(s, sink, sent, &mut last_sent).await?;
            }
            _ = poll.tick() => {
                // Where the watch follows every replica's commits (the doorbell reads the
                // version each second), a link reads the store only when it moved: one
                // query per replica per second instead of one per channel.
                if !s.store.allowlist_watch_follows_replicas() || *watch.borrow() > sent as i64 {
                    sent = push_new_versions(s, sink, sent, &mut last_sent).await?;
                }
                // Say something at least every `ping`, so the broker knows the channel
                // is alive.
                if last_sent.elapsed() >= ping {
                    send(sink, &ToBroker::Ping).await?;
                    last_sent = tokio::time::Instant::now();
                }
            }
            changed = replicas.changed(), if takes_replicas => {
                if changed.is_err() {
                    return Ok(());
                }
                let set = replicas.borrow_and_update().clone();
                send_replicas(sink, set).await?;
                last_sent = tokio::time::Instant::now();
            }
            msg = rx.recv() => match msg {
                Some(m) => {
                    send(sink, &m).await?;
                    last_sent = tokio::time::Instant::now();
                }
                None => return Ok(()),
            },
        }
    }
}

/// [`ToBroker::Replicas`], unless the registry was not read yet.
async fn send_replicas<S>(sink: &mut S, set: super::ReplicaSet) -> Result<(), LinkError>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    if set.self_id.is_empty() || set.replicas.is_empty() {
        return Ok(());
    }
    debug!(replicas = set.replicas.len(), "replicas sent to the broker");
    send(
        sink,
        &ToBroker::Replicas {
            self_id: set.self_id,
            replicas: set.replicas,
        },
    )
    .await
}

/// The link's state the reader updates (what the broker reports of itself) and watches.
struct Watched<'a> {
    applied: &'a AtomicU64,
    replicas_connected: &'a AtomicUsize,
    draining: &'a AtomicBool,
    /// Cancelled when the link ends or a newer channel of the broker replaces it.
    ended: &'a CancellationToken,
}

/// The reader: presence and command events, until the broker closes or falls silent for
/// [`CHANNEL_IDLE_TIMEOUT_SECS`].
async fn read_loop<S>(
    s: &LinkState,
    name: &str,
    stream: &mut S,
    link_id: u64,
    link: Watched<'_>,
) -> Result<(), LinkError>
where
    S: futures_util::Stream<Item = std::io::Result<bytes::BytesMut>> + Unpin,
{
    let Watched {
        applied,
        replicas_connected,
        draining,
        ended,
    } = link;
    let cluster = &s.cluster;
    let idle = Duration::from_secs(CHANNEL_IDLE_TIMEOUT_SECS);
    loop {
        let frame = match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => return Err(link_error("idle", "no frame from the broker in time")),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(link_error("framing", e)),
            Ok(Some(Ok(f))) => f,
        };
        // A newer channel of this broker replaced this one: frames still buffered here
        // are older than its `Hello` and must not touch presence after it.
        if ended.is_cancelled() {
            return Ok(());
        }
        let msg = cluster::decode::<ToControl>(&frame).map_err(|e| link_error("malformed", e))?;
        let (id, event, last) = match msg {
            ToControl::Hello { .. } => return Err(link_error("protocol", "a second Hello")),
            ToControl::Applied {
                version,
                sessions_closed,
            } => {
                applied.store(version, Ordering::Relaxed);
                debug!(version, sessions_closed, "broker applied version");
                continue;
            }
            ToControl::SessionUp(r) => {
                let appliance = r.appliance.clone();
                if let Some(older) = cluster.session_up(name, r) {
                    cluster.supersede(&appliance, older);
                }
                s.metrics.sessions.set(cluster.session_count());
                continue;
            }
            ToControl::SessionDown {
                appliance,
                session_id,
                reason,
            } => {
                debug!(%appliance, session_id, %reason, "session down");
                cluster.session_down(name, &appliance, session_id);
                s.metrics.sessions.set(cluster.session_count());
                continue;
            }
            ToControl::Heartbeats { items } => {
                cluster.heartbeats(name, items);
                continue;
            }
            ToControl::Ping => continue,
            ToControl::Draining => {
                info!("broker draining: its sessions reconnect elsewhere, then it stops");
                draining.store(true, Ordering::Relaxed);
                continue;
            }
            ToControl::Channels { replicas } => {
                debug!(
                    replicas = replicas.len(),
                    "broker's channels to control replicas"
                );
                replicas_connected.store(replicas.len(), Ordering::Relaxed);
                continue;
            }
            ToControl::TunnelAnswer { id, answer } => {
                if !cluster.tunnel_answered(link_id, &id, answer) {
                    debug!(tunnel = %id, "tunnel answer nobody waits for");
                }
                continue;
            }
            ToControl::TunnelEnded {
                id,
                reason,
                message,
                manifest,
                manifest_sig,
            } => {
                if reason == tether_proto::cluster::TUNNEL_DETACHED {
                    tunnel_detached(s, name, &id, &message).await;
                } else {
                    tunnel_ended(s, name, &id, &reason, &message, manifest, manifest_sig).await;
                }
                continue;
            }
            ToControl::ManifestBacklog {
                appliance,
                command_id,
                manifest,
                sig,
            } => {
                late_manifest(s, name, &appliance, command_id, manifest, sig).await;
                continue;
            }
            ToControl::CommandOutput { id, stream, data } => {
                (id, ExecEvent::Output { stream, data }, false)
            }
            ToControl::CommandManifest { id, manifest, sig } => {
                (id, ExecEvent::Manifest { manifest, sig }, false)
            }
            ToControl::CommandPlan {
                id,
                approval_required,
                document,
            } => (
                id,
                ExecEvent::Plan {
                    approval_required,
                    document,
                },
                false,
            ),
            ToControl::CommandExit { id, code } => (id, ExecEvent::Exit(code), true),
            ToControl::CommandFailed { id, code, message } => {
                (id, ExecEvent::Failed { code, message }, true)
            }
        };
        if !cluster.deliver(link_id, id, event, last) {
            foreign_command(s, name, id);
        }
    }
}

/// A signed manifest an agent re-sent after a reconnect (its command's stream ended
/// before delivery): into the audit chain beside the command's own entry, which names the
/// same `request_id`, so the vendor's record of the command is complete after all.
async fn late_manifest(
    s: &LinkState,
    broker: &str,
    appliance: &str,
    command_id: u64,
    manifest: String,
    sig: String,
) {
    let request_id = serde_json::from_str::<serde_json::Value>(&manifest)
        .ok()
        .and_then(|v| v.get("request_id")?.as_str().map(str::to_owned))
        .unwrap_or_default();
    info!(%appliance, %broker, command_id, %request_id, "manifest re-sent after a reconnect");
    let mut event = AuditEvent::success(
        Actor::appliance(appliance),
        action::APPLIANCE_EXEC_MANIFEST,
        appliance,
    )
    .with("broker", broker)
    .with("command_id", command_id as i64)
    .with("request_id", request_id)
    .with(
        "manifest_sha256",
        crate::domain::token::sha256_hex(manifest.as_bytes()),
    );
    // Whole if it fits an entry, else by hash (the appliance's own log holds it whole).
    if manifest.len() + sig.len() < 3 * 1024 {
        event = event.with("manifest", manifest).with("manifest_sig", sig);
    }
    if let Err(e) = s.store.append_audit(&event, crate::now_unix()).await {
        s.metrics.audit_failures.inc();
        tracing::error!(error = %e, "cannot audit a re-sent manifest");
    }
}

/// A tunnel session's broker lost its stream: record and audit it.
async fn tunnel_detached(s: &LinkState, broker: &str, id: &str, message: &str) {
    let Some(t) = s.cluster.tunnel_detached(broker, id) else {
        debug!(tunnel = %id, "detach of a tunnel this broker does not hold");
        return;
    };
    info!(tunnel = %id, appliance = %t.appliance, %message, "tunnel session detached");
    let event = AuditEvent::success(
        Actor::system(tether_audit::system::CONTROL),
        action::APPLIANCE_TUNNEL_DETACHED,
        &t.appliance,
    )
    .with("tunnel", id)
    .with("broker", broker)
    .with("message", tether_audit::clip(message, 512));
    if let Err(e) = s.store.append_audit(&event, crate::now_unix()).await {
        s.metrics.audit_failures.inc();
        tracing::error!(error = %e, "cannot audit a tunnel's detach");
    }
}

/// A tunnel session ended: record it and audit how (the appliance is the actor: its
/// agent decided), with the session manifest it signed: whole if it fits an entry, else
/// its hash (the appliance's own log holds it whole).
async fn tunnel_ended(
    s: &LinkState,
    broker: &str,
    id: &str,
    reason: &str,
    message: &str,
    manifest: String,
    manifest_sig: String,
) {
    let Some(t) = s.cluster.tunnel_ended(broker, id, reason) else {
        debug!(tunnel = %id, %reason, "end of a tunnel this broker did not open");
        return;
    };
    info!(tunnel = %id, appliance = %t.appliance, %reason, "tunnel session ended");
    s.metrics.tunnel_event(&format!("ended_{reason}"));
    s.metrics
        .tunnels_active
        .set(s.cluster.tunnels_active() as i64);
    let event = AuditEvent::success(
        Actor::appliance(&t.appliance),
        action::APPLIANCE_TUNNEL_ENDED,
        &t.appliance,
    )
    .with("tunnel", id)
    .with("broker", broker)
    .with("operator", t.operator.as_str())
    .with("request_id", t.request_id.as_str())
    .with("reason", reason)
    .with("message", tether_audit::clip(message, 512))
    .with("connections", t.connections as i64)
    .with("bytes_up", t.bytes_up as i64)
    .with("bytes_down", t.bytes_down as i64)
    .with("credential_fetched", t.credential_fetched);
    let mut event = event;
    if !manifest.is_empty() {
        event = event.with(
            "manifest_sha256",
            crate::domain::token::sha256_hex(manifest.as_bytes()),
        );
        if manifest.len() + manifest_sig.len() < 3 * 1024 {
            event = event
                .with("manifest", manifest)
                .with("manifest_sig", manifest_sig);
        }
    }
    if let Err(e) = s.store.append_audit(&event, crate::now_unix()).await {
        s.metrics.audit_failures.inc();
        tracing::error!(error = %e, "cannot audit a tunnel's end");
    }
}

/// Unregister a link that ended (unless a newer channel of the same broker took the
/// slot), forget its sessions and fail its commands with `broker_lost`.
fn unregister_link(s: &LinkState, name: &str, link_id: u64) {
    let cluster = &s.cluster;
    {
        let mut links = lock(&cluster.links);
        if links.get(name).is_some_and(|l| l.id == link_id) {
            let draining = links
                .remove(name)
                .is_some_and(|l| l.draining.load(Ordering::Relaxed));
            drop(links);
            cluster.forget_broker(name, draining);
        }
    }
    s.metrics
        .brokers_connected
        .set(lock(&cluster.links).len() as i64);
    s.metrics.sessions.set(cluster.session_count());
    cluster.tunnel_link_ended(link_id);
    let lost: Vec<InFlight> = {
        let mut commands = lock(&cluster.commands);
        let ids: Vec<u64> = commands
            .iter()
            .filter(|(_, c)| c.link == link_id)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| commands.remove(&id))
            .collect()
    };
    for c in lost {
        let _ = c.tx.send(ExecEvent::Failed {
            code: CommandFailure::BrokerLost,
            message: format!("the channel to broker {name} ended mid-command"),
        });
    }
}

/// A command event for no command of this broker: one that ended (its deadline passed,
/// its caller left) or one the broker was never sent. Counted and logged, never delivered.
fn foreign_command(s: &LinkState, name: &str, id: u64) {
    s.metrics
        .channel_errors
        .get_or_create(&Reason {
            reason: "unknown_command",
        })
        .inc();
    debug!(broker = %name, command_id = id, "event for a command this broker does not run");
}

fn end_with(s: &LinkState, name: &str, e: LinkError) {
    s.metrics
        .channel_errors
        .get_or_create(&Reason { reason: e.reason })
        .inc();
    warn!(broker = %name, reason = e.reason, detail = %e.detail, "broker channel ended with an error");
}

async fn send<S>(sink: &mut S, msg: &ToBroker) -> Result<(), LinkError>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    let frame = cluster::encode(msg).map_err(|e| link_error("encode", e))?;
    // `encode` adds the length; the codec adds it again, so strip ours.
    sink.send(bytes::Bytes::from(frame).slice(4..))
        .await
        .map_err(|e| link_error("write", e))
}

/// Bring a broker at version `since` (with `digest` for it, empty if it does not say) up
/// to date: deltas when it is close and its history is ours, a snapshot otherwise.
/// Returns the version it now has.
async fn sync_from<S>(
    s: &LinkState,
    sink: &mut S,
    since: u64,
    digest: &str,
) -> Result<u64, LinkError>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    let current = s
        .store
        .allowlist_version()
        .await
        .map_err(|e| link_error("store", e))?
        .max(0) as u64;
    // Its version number means our version only if its digest is ours too: after an
    // asynchronous failover or a restore, the same numbers may carry other changes.
    // Whether deltas cannot bring it up to date (another history, or ours pruned).
    let mut snapshot = false;
    if since > 0 && !digest.is_empty() && since <= current {
        let ours = s
            .store
            .allowlist_digests(since as i64 - 1, since as i64)
            .await
            .map_err(|e| link_error("store", e))?;
        let ours = match ours.first() {
            Some((_, d)) => d.as_str(),
            None => {
                // Older than the history kept (`[trust] allowlist_history`): deltas
                // cannot bring it up to date, whoever's history it followed.
                info!(
                    version = since,
                    current,
                    "the allowlist history of the broker's version was pruned: sending a snapshot"
                );
                snapshot = true;
                ""
            }
        };
        if !snapshot && !ours.eq_ignore_ascii_case(digest) {
            warn!(
                version = since,
                broker_digest = digest,
                store_digest = ours,
                current,
                "allowlist history diverged: sending a snapshot"
            );
            s.metrics.allowlist_diverged.inc();
            snapshot = true;
        }
    }
    if since > 0 && digest.is_empty() && !snapshot {
        // A version without its digest (a broker started from its snapshot on disk, which
        // keeps none, or an older broker): nothing shows that its history is ours, and
        // after a restore the same numbers carry other changes. Deltas on top of another
        // history would leave it enforcing a wrong allowlist it calls in sync.
        info!(
            version = since,
            current, "the broker's allowlist version comes without its digest: sending a snapshot"
        );
        snapshot = true;
    }
    if since > current {
        // Ahead of the store: the versions it holds were lost (an asynchronous failover
        // or a restore), so its history is not ours either (found by
        // `async_failover_divergence_is_detected`: a broker that reconnected during the
        // failover got a snapshot nobody counted).
        warn!(
            version = since,
            broker_digest = digest,
            current,
            "allowlist history diverged: the broker is ahead of the store; sending a snapshot"
        );
        s.metrics.allowlist_diverged.inc();
        snapshot = true;
    }
    if since == current && !snapshot {
        return Ok(current);
    }
    if since > 0 && since < current && !snapshot {
        let mut deltas = Vec::new();
        let mut after = since as i64;
        loop {
            let page = s
                .store
                .allowlist_changes_since(after, 10_000)
                .await
                .map_err(|e| link_error("store", e))?;
            let Some(last) = page.last() else { break };
            after = last.version;
            deltas.extend(page);
            if deltas.len() > MAX_DELTAS_ON_RESUME {
                break;
            }
        }
        if deltas.len() <= MAX_DELTAS_ON_RESUME && follows(since, &deltas) {
            return send_deltas(s, sink, deltas, since).await;
        }
    }
    // Too far behind, nothing held, or ahead of us (a restored database): a snapshot.
    let (version, entries) = s
        .store
        .allowlist_snapshot()
        .await
        .map_err(|e| link_error("store", e))?;
    let version = version.max(0) as u64;
    info!(
        since,
        version,
        entries = entries.len(),
        "sending a broker a full snapshot"
    );
    send(
        sink,
        &ToBroker::SnapshotBegin {
            version,
            entries: entries.len() as u64,
        },
    )
    .await?;
    for chunk in entries.chunks(SNAPSHOT_CHUNK) {
        send(
            sink,
            &ToBroker::SnapshotChunk {
                entries: chunk.to_vec(),
            },
        )
        .await?;
    }
    let digest = s
        .store
        .allowlist_digests(version as i64 - 1, version as i64)
        .await
        .map_err(|e| link_error("store", e))?
        .pop()
        .map(|(_, d)| d)
        .unwrap_or_default();
    send(sink, &ToBroker::SnapshotEnd { version, digest }).await?;
    Ok(version)
}

async fn push_new_versions<S>(
    s: &LinkState,
    sink: &mut S,
    sent: u64,
    last_sent: &mut tokio::time::Instant,
) -> Result<u64, LinkError>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    let mut sent = sent;
    loop {
        let page = s
            .store
            .allowlist_changes_since(sent as i64, 10_000)
            .await
            .map_err(|e| link_error("store", e))?;
        if page.is_empty() {
            return Ok(sent);
        }
        sent = send_deltas(s, sink, page, sent).await?;
        *last_sent = tokio::time::Instant::now();
    }
}

/// Whether `deltas` (whole versions, in order) are every version after `since`, one
/// after another, up to their last: not a history pruned past `since`.
fn follows(since: u64, deltas: &[crate::store::AllowlistDelta]) -> bool {
    let mut at = since as i64;
    deltas.iter().all(|d| {
        let next = d.version == at || d.version == at + 1;
        at = d.version;
        next && d.version > since as i64
    })
}

/// Send `deltas` (whole versions, in order) as one `Delta` per version.
async fn send_deltas<S>(
    s: &LinkState,
    sink: &mut S,
    deltas: Vec<crate::store::AllowlistDelta>,
    mut sent: u64,
) -> Result<u64, LinkError>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    let (Some(first), Some(last)) = (deltas.first(), deltas.last()) else {
        return Ok(sent);
    };
    if !follows(sent, &deltas) {
        // Pruned while this broker fell behind: it reconnects and gets a snapshot.
        return Err(link_error(
            "allowlist_gap",
            format!(
                "the history after version {sent} was pruned (next kept: {})",
                first.version
            ),
        ));
    }
    let digests: std::collections::HashMap<i64, String> = s
        .store
        .allowlist_digests(first.version - 1, last.version)
        .await
        .map_err(|e| link_error("store", e))?
        .into_iter()
        .collect();
    let mut i = 0;
    while i < deltas.len() {
        let version = deltas[i].version;
        let mut add = Vec::new();
        let mut remove = Vec::new();
        while i < deltas.len() && deltas[i].version == version {
            let d = &deltas[i];
            if d.added {
                add.push((d.appliance_id.clone(), d.fingerprint.clone()));
            } else {
                remove.push(d.fingerprint.clone());
            }
            i += 1;
        }
        let digest = digests.get(&version).cloned().unwrap_or_default();
        let version = version.max(0) as u64;
        send(
            sink,
            &ToBroker::Delta {
                version,
                add,
                remove,
                digest,
            },
        )
        .await?;
        sent = version;
    }
    Ok(sent)
}

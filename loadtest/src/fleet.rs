//! The virtual fleet: one real [`tether_agent::Agent`] per appliance, all in this process,
//! sharing a few QUIC client endpoints and one tokio runtime (over `--transport tcp` the
//! endpoints go unused: each agent opens its own TCP socket).
//!
//! Each appliance runs in one task that drives its agent and watches the agent's events;
//! what matters to a scenario goes to one collector channel as [`FleetEvent`]s. An
//! optional semaphore bounds how many appliances are connecting at once: an appliance holds
//! a permit from its start to its first session.
//!
//! `churn` kicks appliances ([`Fleet::kick`]): the appliance stops its agent (the session
//! closes as `Normal`, as when an appliance reboots), waits a random delay up to
//! [`FleetOptions::rejoin_delay`], and starts a fresh agent with the same credential.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tether_agent::{Agent, AgentConfig, AgentEvent, Credentials, DisconnectReason};
use tokio::sync::{broadcast, mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Client sockets bound for the fleet, and what the kernel granted them.
#[derive(Debug)]
pub struct Endpoints {
    /// The endpoints, used round-robin by the appliances.
    pub endpoints: Vec<quinn::Endpoint>,
    /// `SO_RCVBUF` of the first socket as the kernel reports it (Linux reports twice the
    /// usable size).
    pub recv_buffer_bytes: usize,
    /// `SO_SNDBUF` likewise.
    pub send_buffer_bytes: usize,
}

/// Bind `n` client endpoints on 127.0.0.1 asking for `buffer` bytes of UDP receive and
/// send buffer.
pub fn client_endpoints(n: usize, buffer: usize) -> anyhow::Result<Endpoints> {
    let mut endpoints = Vec::with_capacity(n);
    let (mut recv, mut send) = (0, 0);
    for _ in 0..n {
        // The kernel caps the buffers at net.core.rmem_max / wmem_max unless the process
        // may go above (CAP_NET_ADMIN): the caller compares what was granted with what it
        // asked.
        let (endpoint, r, s) =
            tether_broker::tls::client_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), buffer)
                .context("creating a QUIC client endpoint on 127.0.0.1")?;
        (recv, send) = (r, s);
        endpoints.push(endpoint);
    }
    Ok(Endpoints {
        endpoints,
        recv_buffer_bytes: recv,
        send_buffer_bytes: send,
    })
}

/// What a scenario hears from the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetEvent {
    /// Appliance `index` has a session. `first_connect` is the time from its start to its
    /// first session (only on the first).
    Connected {
        /// Index into the fleet.
        index: usize,
        /// Start → first `Connected`, the first time only.
        first_connect: Option<Duration>,
        /// From this agent's start (the appliance's start, or its restart after a kick)
        /// to this session, backoff and `GoAway` delays included.
        since_start: Duration,
        /// The broker holding the session.
        broker: SocketAddr,
        /// When the appliance's task saw it.
        at: Instant,
    },
    /// Appliance `index` closed its session because it was kicked ([`Fleet::kick`]); it
    /// comes back after its rejoin delay.
    Left {
        /// Index into the fleet.
        index: usize,
        /// When its agent had stopped.
        at: Instant,
    },
    /// A session or an attempt of appliance `index` ended (not counted after stop).
    Disconnected {
        /// Index into the fleet.
        index: usize,
        /// Whether it had a session (else: a failed attempt).
        was_connected: bool,
        /// [`error_kind`] of the reason.
        kind: String,
        /// When the appliance's task saw it.
        at: Instant,
    },
    /// The appliance could not start at all.
    Failed {
        /// Index into the fleet.
        index: usize,
        /// Why.
        kind: String,
    },
}

/// A stable, lowercase name for why a connection or attempt ended: the `errors` keys of
/// the report.
pub fn error_kind(reason: &DisconnectReason) -> String {
    match reason {
        DisconnectReason::Broker(code) => format!("closed_by_broker_{}", snake(code)),
        DisconnectReason::Local(code) => format!("closed_by_agent_{}", snake(code)),
        DisconnectReason::TlsAlert {
            alert,
            by_peer: true,
        } => format!("tls_alert_{alert}_from_broker"),
        DisconnectReason::TlsAlert {
            alert,
            by_peer: false,
        } => format!("tls_alert_{alert}_local"),
        DisconnectReason::ConnectionRefused => "connection_refused".into(),
        DisconnectReason::TimedOut => "timed_out".into(),
        DisconnectReason::Resolve(_) => "resolve".into(),
        DisconnectReason::Transport(_) => "transport".into(),
        _ => "other".into(),
    }
}

/// `ProtocolError` → `protocol_error`.
fn snake(v: &impl std::fmt::Debug) -> String {
    let mut out = String::new();
    for (i, c) in format!("{v:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// How the fleet runs.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// Brokers; appliance `i` starts its list at broker `i % len`.
    pub brokers: Vec<SocketAddr>,
    /// Agent settings of every appliance.
    pub agent: AgentConfig,
    /// At most this many appliances connecting at once.
    pub concurrency: Option<usize>,
    /// A kicked appliance starts again after a random delay in `[0, this]`.
    pub rejoin_delay: Duration,
}

/// A running fleet.
#[derive(Debug)]
pub struct Fleet {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    /// One per appliance (empty for the baseline's clients).
    kicks: Vec<Arc<Notify>>,
    /// What the appliances report.
    pub events: mpsc::UnboundedReceiver<FleetEvent>,
}

impl Fleet {
    /// Start one agent per credential, now.
    pub fn start(creds: Vec<Credentials>, endpoints: &Endpoints, opts: &FleetOptions) -> Fleet {
        let stop = CancellationToken::new();
        let (tx, events) = mpsc::unbounded_channel();
        let permits = opts.concurrency.map(|n| Arc::new(Semaphore::new(n)));
        let mut tasks = JoinSet::new();
        let mut kicks = Vec::with_capacity(creds.len());
        for (index, creds) in creds.into_iter().enumerate() {
            let kick = Arc::new(Notify::new());
            kicks.push(kick.clone());
            let mut brokers = opts.brokers.clone();
            let len = brokers.len().max(1);
            brokers.rotate_left(index % len);
            let endpoint = endpoints.endpoints[index % endpoints.endpoints.len()].clone();
            let appliance = Appliance {
                index,
                creds,
                endpoint,
                brokers,
                agent: opts.agent.clone(),
                permits: permits.clone(),
                tx: tx.clone(),
                stop: stop.child_token(),
                kick,
                rejoin_delay: opts.rejoin_delay,
            };
            tasks.spawn(appliance.run());
        }
        Fleet {
            stop,
            tasks,
            kicks,
            events,
        }
    }

    /// Make appliance `index` close its session and come back after its rejoin delay
    /// (ignored if it is not running; a kick while it is away is kept for its next
    /// session). Returns whether the fleet has such an appliance.
    pub fn kick(&self, index: usize) -> bool {
        match self.kicks.get(index) {
            Some(k) => {
                k.notify_one();
                true
            }
            None => false,
        }
    }

    /// A fleet of other clients reporting the same events (the baseline's).
    pub fn from_parts(
        stop: CancellationToken,
        tasks: JoinSet<()>,
        events: mpsc::UnboundedReceiver<FleetEvent>,
    ) -> Fleet {
        Fleet {
            stop,
            tasks,
            kicks: Vec::new(),
            events,
        }
    }

    /// Close every session (`Normal`) and wait up to `grace` for the agents to end.
    /// Returns how many had not ended by then.
    pub async fn stop(mut self, grace: Duration) -> usize {
        self.stop.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => break,
            }
        }
        let left = self.tasks.len();
        self.tasks.abort_all();
        left
    }
}

/// One virtual appliance.
struct Appliance {
    index: usize,
    creds: Credentials,
    endpoint: quinn::Endpoint,
    brokers: Vec<SocketAddr>,
    agent: AgentConfig,
    permits: Option<Arc<Semaphore>>,
    tx: mpsc::UnboundedSender<FleetEvent>,
    stop: CancellationToken,
    kick: Arc<Notify>,
    rejoin_delay: Duration,
}

/// How one agent's life ended.
enum Life {
    /// The fleet is stopping, or the agent could not go on.
    Over,
    /// Kicked: start a fresh agent after the rejoin delay.
    Kicked,
}

impl Appliance {
    async fn run(self) {
        let mut permit = match &self.permits {
            Some(p) => tokio::select! {
                p = p.clone().acquire_owned() => p.ok(),
                _ = self.stop.cancelled() => return,
            },
            None => None,
        };
        let mut first = true;
        loop {
            match self.life(&mut permit, &mut first).await {
                Life::Over => return,
                Life::Kicked => {
                    let _ = self.tx.send(FleetEvent::Left {
                        index: self.index,
                        at: Instant::now(),
                    });
                    let max = self.rejoin_delay.as_millis() as u64;
                    let delay = Duration::from_millis(fastrand::u64(0..=max));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Run one agent until the fleet stops or the appliance is kicked.
    async fn life(
        &self,
        permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
        first: &mut bool,
    ) -> Life {
        let index = self.index;
        let tx = &self.tx;
        let started = Instant::now();
        let agent = match Agent::new(
            self.agent.clone(),
            self.creds.clone(),
            self.endpoint.clone(),
            self.brokers.clone(),
        ) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(index, error = %e, "agent not built");
                let _ = tx.send(FleetEvent::Failed {
                    index,
                    kind: "agent_not_built".into(),
                });
                return Life::Over;
            }
        };
        let mut events = agent.events();
        // Cancelled by the fleet's stop, or by a kick.
        let stop = self.stop.child_token();
        let run = agent.run(stop.clone());
        tokio::pin!(run);
        let mut connected = false;
        let mut kicked = false;
        let mut done = false;
        loop {
            tokio::select! {
                biased;
                ev = events.recv() => match ev {
                    Ok(AgentEvent::Connected { broker, .. }) => {
                        let first_connect = first.then(|| started.elapsed());
                        *first = false;
                        connected = true;
                        permit.take();
                        let _ = tx.send(FleetEvent::Connected {
                            index,
                            first_connect,
                            since_start: started.elapsed(),
                            broker,
                            at: Instant::now(),
                        });
                    }
                    Ok(AgentEvent::Disconnected { reason, .. }) => {
                        if !stop.is_cancelled() {
                            let _ = tx.send(FleetEvent::Disconnected {
                                index,
                                was_connected: connected,
                                kind: error_kind(&reason),
                                at: Instant::now(),
                            });
                        }
                        connected = false;
                    }
                    Ok(AgentEvent::Stopped) | Err(broadcast::error::RecvError::Closed) => break,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // Read in the task that drives the agent, so this should not
                        // happen; if it does, a session may go uncounted: say so.
                        tracing::warn!(index, missed, "appliance events missed");
                    }
                    Ok(_) => {}
                },
                _ = self.kick.notified(), if !kicked => {
                    kicked = true;
                    stop.cancel();
                }
                r = &mut run => {
                    if let Err(e) = r {
                        tracing::warn!(index, error = %e, "agent failed");
                        let _ = tx.send(FleetEvent::Failed { index, kind: "agent_failed".into() });
                        return Life::Over;
                    }
                    done = true;
                    break;
                }
            }
        }
        if !done {
            let _ = run.await;
        }
        if kicked && !self.stop.is_cancelled() {
            Life::Kicked
        } else {
            Life::Over
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::CloseCode;

    #[test]
    fn error_kinds_are_stable_names() {
        assert_eq!(
            error_kind(&DisconnectReason::Broker(CloseCode::ProtocolError)),
            "closed_by_broker_protocol_error"
        );
        assert_eq!(
            error_kind(&DisconnectReason::TlsAlert {
                alert: 42,
                by_peer: true
            }),
            "tls_alert_42_from_broker"
        );
        assert_eq!(error_kind(&DisconnectReason::TimedOut), "timed_out");
        assert_eq!(
            error_kind(&DisconnectReason::Transport("x".into())),
            "transport"
        );
    }
}

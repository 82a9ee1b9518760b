//! The scenarios that move a connected fleet: `churn` (random appliances disconnect and
//! come back, as reboots and flaky links do) and `drain` (one broker leaves with `GoAway`
//! and its appliances move to the others).
//!
//! Both end with the same check: once the fleet has settled, the sessions the brokers
//! count (`tether_sessions` on their admin listeners, or control's `GET /v1/brokers`
//! against an existing cluster) must equal the sessions the fleet
//! holds. A broker that leaked a session, or lost one it should hold, shows as
//! `session_count_mismatch`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::fleet::{Fleet, FleetEvent};
use crate::ops::{hist, q, show, us, Api, Sampler};
use crate::progress::Progress;
use crate::report::round3;
use crate::scenario::Tally;
use crate::spawn;

/// How long the brokers' session counts may take to match the fleet's at the end.
const SETTLE: Duration = Duration::from_secs(10);
/// How long after the last kick (plus the rejoin delay) the kicked may take to return.
const REJOIN_WAIT: Duration = Duration::from_secs(30);
/// How long after the drain's GoAway jitter and drain timeout its appliances may take to
/// be back.
const DRAIN_EXTRA_WAIT: Duration = Duration::from_secs(30);

/// A broker as these scenarios see it.
#[derive(Clone, Debug)]
pub struct BrokerRef {
    /// Its name.
    pub name: String,
    /// Its QUIC address.
    pub quic: SocketAddr,
    /// Its admin listener (`/metrics`), when the run started it.
    pub admin: Option<SocketAddr>,
    /// Its process, when the run started it.
    pub pid: Option<u32>,
    /// Sessions it held before the fleet started (other appliances of an existing
    /// cluster): the session check counts the fleet's only.
    pub sessions_before: u64,
}

/// What `churn` measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChurnDetail {
    /// Disconnections per second asked for.
    pub rate: f64,
    /// Seconds appliances were disconnected for.
    pub secs: f64,
    /// Appliances disconnected (their agent stopped, the session closed as `Normal`).
    pub kicks: u64,
    /// Of those, back with a session by the end.
    pub rejoined: u64,
    /// Of those, not back by the end (also `churn_not_rejoined` in `errors`).
    pub not_rejoined: u64,
    /// The longest random delay before an appliance comes back, ms.
    pub rejoin_delay_max_ms: u64,
    /// From the fresh agent's start to its session, ms (the reconnect itself: handshake,
    /// `Hello`, `Welcome`, retries included).
    pub reconnect_p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub reconnect_p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub reconnect_p99_ms: Option<f64>,
    /// Slowest, ms.
    pub reconnect_max_ms: Option<f64>,
    /// Sessions the brokers counted at the end, less those they held before the run.
    pub broker_sessions_at_end: Option<u64>,
    /// Sessions the fleet held at the end.
    pub fleet_sessions_at_end: usize,
}

/// What `drain` measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DrainDetail {
    /// The drained broker.
    pub broker: String,
    /// Its sessions when the drain began.
    pub sessions: usize,
    /// GoAway's reconnect jitter, ms.
    pub jitter_ms: u64,
    /// Of its appliances, back on another broker by the end.
    pub rejoined: usize,
    /// Not back by the end (also `drain_not_rejoined` in `errors`).
    pub not_rejoined: usize,
    /// From the drain's start (SIGTERM) to each appliance's session on another broker, ms.
    pub rejoin_p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub rejoin_p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub rejoin_p99_ms: Option<f64>,
    /// The last one, ms.
    pub rejoin_max_ms: Option<f64>,
    /// How long each appliance was without a session: from the agent leaving its session
    /// on the drained broker to its session on another, ms (the agent spends GoAway's
    /// delay on the old connection and closes it once the new session is welcomed, so
    /// this is the reconnect alone).
    pub offline_p50_ms: Option<f64>,
    /// 99th percentile, ms.
    pub offline_p99_ms: Option<f64>,
    /// From the drain's start until the broker process exited, seconds.
    pub broker_exit_secs: Option<f64>,
    /// How the drained sessions ended, as the agents saw it (by kind; not errors).
    pub left_as: BTreeMap<String, u64>,
    /// Sessions the remaining brokers counted at the end.
    pub broker_sessions_at_end: Option<u64>,
    /// Sessions the fleet held at the end.
    pub fleet_sessions_at_end: usize,
}

/// The sessions `brokers` hold: the sum of `tether_sessions` on their admin listeners
/// when the run started them, else what control says each holds (`GET /v1/brokers`).
/// `None` if one did not answer, or there is no way to ask.
pub async fn broker_sessions(brokers: &[BrokerRef], api: Option<&Api>) -> Option<u64> {
    let mut total = 0.0;
    if brokers.iter().all(|b| b.admin.is_some()) {
        for b in brokers {
            let text = spawn::http_get(b.admin?, "/metrics").await.ok()?;
            total += spawn::metric(&text, "tether_sessions")?;
        }
        return Some(total as u64);
    }
    let list = api?.brokers().await.ok()?;
    for b in brokers {
        let info = list.brokers.iter().find(|i| i.name == b.name)?;
        total += info.sessions? as f64;
    }
    Some(total as u64)
}

/// Wait up to [`SETTLE`] for the brokers to count the sessions the fleet holds (events
/// keep coming meanwhile). Returns their count; a difference is added to `errors`.
async fn settle(
    brokers: &[BrokerRef],
    api: Option<&Api>,
    fleet: &mut Fleet,
    tally: &mut Tally,
    errors: &mut BTreeMap<String, u64>,
) -> Option<u64> {
    let deadline = Instant::now() + SETTLE;
    loop {
        while let Ok(ev) = fleet.events.try_recv() {
            tally.record(ev);
        }
        let before: u64 = brokers.iter().map(|b| b.sessions_before).sum();
        let counted = broker_sessions(brokers, api)
            .await
            .map(|c| c.saturating_sub(before));
        if counted == Some(tally.current as u64) {
            return counted;
        }
        if Instant::now() > deadline {
            match counted {
                Some(c) => {
                    eprintln!(
                        "the brokers count {c} sessions, the fleet holds {}",
                        tally.current
                    );
                    errors.insert(
                        "session_count_mismatch".into(),
                        c.abs_diff(tally.current as u64),
                    );
                }
                None if brokers.iter().all(|b| b.admin.is_some()) || api.is_some() => {
                    errors.insert("broker_sessions_unreadable".into(), 1);
                }
                None => {}
            }
            return counted;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A random connected appliance that is not `away`, if one is found in a few draws.
fn pick(tally: &Tally, away: &HashMap<usize, Instant>) -> Option<usize> {
    let n = tally.up.len();
    if n == 0 || tally.current == 0 {
        return None;
    }
    (0..64)
        .map(|_| fastrand::usize(..n))
        .find(|i| tally.up[*i] && !away.contains_key(i))
}

/// `churn`: for `duration`, `rate` random connected appliances per second stop their
/// agent and start a fresh one after up to `rejoin_delay`.
#[allow(clippy::too_many_arguments)]
pub async fn churn(
    rate: f64,
    duration: Duration,
    rejoin_delay: Duration,
    brokers: &[BrokerRef],
    api: Option<&Api>,
    fleet: &mut Fleet,
    tally: &mut Tally,
    tick: &mut tokio::time::Interval,
    sample: &mut Sampler<'_>,
    progress: &Progress,
) -> anyhow::Result<(ChurnDetail, BTreeMap<String, u64>)> {
    let mut errors = BTreeMap::new();
    let mut reconnect = hist();
    let mut detail = ChurnDetail {
        rate,
        rejoin_delay_max_ms: rejoin_delay.as_millis() as u64,
        ..Default::default()
    };
    // Kicked and not back yet, with when they were kicked.
    let mut away: HashMap<usize, Instant> = HashMap::new();
    let bar = progress.bar(duration.as_secs().max(1), "churning");
    let started = Instant::now();
    let stop_kicking = tokio::time::sleep(duration);
    tokio::pin!(stop_kicking);
    let mut fire = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut kicking = true;
    let mut wait_until = None;
    loop {
        if !kicking && away.is_empty() {
            break;
        }
        let deadline = async {
            match wait_until {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = fleet.events.recv() => match ev {
                Some(ev @ FleetEvent::Connected { index, since_start, .. }) if away.contains_key(&index) => {
                    away.remove(&index);
                    detail.rejoined += 1;
                    let _ = reconnect.record(us(since_start));
                    tally.record_expected(ev);
                }
                Some(ev) => tally.record(ev),
                None => break,
            },
            _ = tick.tick() => {
                sample(tally)?;
                bar.set_position(started.elapsed().as_secs());
                bar.set_prefix(format!("{} kicked, {} away", detail.kicks, away.len()));
            }
            _ = fire.tick(), if kicking => {
                match pick(tally, &away) {
                    Some(i) => {
                        fleet.kick(i);
                        away.insert(i, Instant::now());
                        detail.kicks += 1;
                    }
                    None => *errors.entry("churn_no_connected_appliance".into()).or_default() += 1,
                }
            }
            _ = &mut stop_kicking, if kicking => {
                kicking = false;
                detail.secs = round3(started.elapsed().as_secs_f64());
                wait_until = Some(tokio::time::Instant::now() + rejoin_delay + REJOIN_WAIT);
            }
            _ = deadline => break,
        }
    }
    bar.finish_and_clear();
    detail.not_rejoined = away.len() as u64;
    if !away.is_empty() {
        errors.insert("churn_not_rejoined".into(), away.len() as u64);
    }
    detail.reconnect_p50_ms = q(&reconnect, 0.5);
    detail.reconnect_p90_ms = q(&reconnect, 0.9);
    detail.reconnect_p99_ms = q(&reconnect, 0.99);
    detail.reconnect_max_ms = q(&reconnect, 1.0);
    detail.broker_sessions_at_end = settle(brokers, api, fleet, tally, &mut errors).await;
    detail.fleet_sessions_at_end = tally.current;
    println!(
        "churn: {} disconnected over {:.1} s, {} back (reconnect p50 {} ms, p99 {} ms); \
         sessions at the end: brokers {:?}, fleet {}",
        detail.kicks,
        detail.secs,
        detail.rejoined,
        show(detail.reconnect_p50_ms),
        show(detail.reconnect_p99_ms),
        detail.broker_sessions_at_end,
        detail.fleet_sessions_at_end,
    );
    Ok((detail, errors))
}

/// `drain`: SIGTERM `brokers[0]` and follow its appliances to the other brokers.
#[allow(clippy::too_many_arguments)]
pub async fn drain(
    jitter: Duration,
    drain_timeout: Duration,
    brokers: &[BrokerRef],
    fleet: &mut Fleet,
    tally: &mut Tally,
    tick: &mut tokio::time::Interval,
    sample: &mut Sampler<'_>,
    progress: &Progress,
) -> anyhow::Result<(DrainDetail, BTreeMap<String, u64>)> {
    let mut errors = BTreeMap::new();
    let (drained, rest) = brokers
        .split_first()
        .expect("drain runs with at least two brokers");
    // Appliances on the drained broker, and whether each is back elsewhere.
    let mut back: HashMap<usize, bool> = (0..tally.up.len())
        .filter(|&i| tally.up[i] && tally.on[i] == Some(drained.quic))
        .map(|i| (i, false))
        .collect();
    let mut detail = DrainDetail {
        broker: drained.name.clone(),
        sessions: back.len(),
        jitter_ms: jitter.as_millis() as u64,
        ..Default::default()
    };
    println!(
        "drain: {} sessions on {}; SIGTERM (GoAway, reconnect within {jitter:?})",
        back.len(),
        drained.name
    );
    let mut rejoin = hist();
    let mut offline = hist();
    let mut left_at: HashMap<usize, Instant> = HashMap::new();
    let bar = progress.bar(back.len() as u64, "drained appliances back");
    let started = Instant::now();
    let Some(pid) = drained.pid else {
        anyhow::bail!("drain stops a broker process: it needs --spawn");
    };
    spawn::terminate(pid);
    let give_up = tokio::time::sleep(jitter + drain_timeout + DRAIN_EXTRA_WAIT);
    tokio::pin!(give_up);
    let mut left = back.len();
    while left > 0 || detail.broker_exit_secs.is_none() {
        tokio::select! {
            ev = fleet.events.recv() => match ev {
                Some(FleetEvent::Disconnected { index, kind, at, .. }) if back.get(&index) == Some(&false) => {
                    tally.expected_close(index);
                    left_at.entry(index).or_insert(at);
                    *detail.left_as.entry(kind).or_default() += 1;
                }
                Some(FleetEvent::Connected { index, broker, at, .. }) if back.get(&index) == Some(&false) => {
                    if broker == drained.quic {
                        *errors.entry("drain_session_on_drained_broker".into()).or_default() += 1;
                    } else {
                        back.insert(index, true);
                        left -= 1;
                        detail.rejoined += 1;
                        let _ = rejoin.record(us(at.saturating_duration_since(started)));
                        if let Some(gone) = left_at.get(&index) {
                            let _ = offline.record(us(at.saturating_duration_since(*gone)));
                        }
                        bar.inc(1);
                    }
                    // A session closed and opened again is how the drain works, not a
                    // reconnect after a loss.
                    tally.expected_close(index);
                    tally.record_expected(FleetEvent::Connected {
                        index,
                        first_connect: None,
                        since_start: Duration::ZERO,
                        broker,
                        at,
                    });
                }
                Some(ev) => tally.record(ev),
                None => break,
            },
            _ = tick.tick() => {
                if detail.broker_exit_secs.is_none() && !crate::measure::is_alive(pid) {
                    detail.broker_exit_secs = Some(round3(started.elapsed().as_secs_f64()));
                }
                sample(tally)?;
                bar.set_prefix(format!("{} connected", tally.current));
            }
            _ = &mut give_up => break,
        }
    }
    bar.finish_and_clear();
    detail.not_rejoined = left;
    if left > 0 {
        errors.insert("drain_not_rejoined".into(), left as u64);
    }
    if detail.broker_exit_secs.is_none() {
        errors.insert("drain_broker_did_not_exit".into(), 1);
    }
    detail.rejoin_p50_ms = q(&rejoin, 0.5);
    detail.rejoin_p90_ms = q(&rejoin, 0.9);
    detail.rejoin_p99_ms = q(&rejoin, 0.99);
    detail.rejoin_max_ms = q(&rejoin, 1.0);
    detail.offline_p50_ms = q(&offline, 0.5);
    detail.offline_p99_ms = q(&offline, 0.99);
    detail.broker_sessions_at_end = settle(rest, None, fleet, tally, &mut errors).await;
    detail.fleet_sessions_at_end = tally.current;
    println!(
        "drain: {} of {} back on other brokers (p50 {} ms, p99 {} ms, last {} ms); {} exited \
         after {:?} s; sessions at the end: brokers {:?}, fleet {}",
        detail.rejoined,
        detail.sessions,
        show(detail.rejoin_p50_ms),
        show(detail.rejoin_p99_ms),
        show(detail.rejoin_max_ms),
        drained.name,
        detail.broker_exit_secs,
        detail.broker_sessions_at_end,
        detail.fleet_sessions_at_end,
    );
    Ok((detail, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_skips_the_away_and_the_disconnected() {
        let mut t = Tally::new(100);
        let mut away = HashMap::new();
        assert_eq!(pick(&t, &away), None);
        for index in [3, 42] {
            t.record(FleetEvent::Connected {
                index,
                first_connect: Some(Duration::from_millis(1)),
                since_start: Duration::from_millis(1),
                broker: crate::scenario::tests::BROKER,
                at: Instant::now(),
            });
        }
        away.insert(3, Instant::now());
        for _ in 0..20 {
            assert!(matches!(pick(&t, &away), Some(42) | None));
        }
        away.insert(42, Instant::now());
        assert_eq!(pick(&t, &away), None);
    }
}

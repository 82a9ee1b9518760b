//! Per-client-IP rate limit of the routes anyone may call without credentials
//! (`POST /v1/enroll/challenge`, `POST /v1/enroll`, `POST /v1/operators/login`), so that a
//! client cannot grow the database (nonces, audited refusals) or load the CA as fast as
//! it can send.
//!
//! Each client IP has a token bucket (GCRA, the `governor` crate): `http.public_burst`
//! requests at once, refilled at `http.public_rate_per_sec`. An IPv6 client is counted by
//! its /64 (one host usually has a whole /64); an IPv4-mapped IPv6 address as the IPv4
//! address. A request over the limit is answered 429 `rate_limited` with `Retry-After`
//! before the handler runs, so it writes nothing (no nonce, no audit entry); the metrics
//! middleware counts it (`status="429",code="rate_limited"`).
//!
//! Memory is bounded: at most [`MAX_TRACKED_CLIENTS`] buckets are held. When the table is
//! full, the buckets that are full again (clients idle for `burst / rate` seconds) are
//! dropped, at most once per [`SWEEP_INTERVAL`]; if it is still full (that many addresses
//! active within seconds), further requests to these routes are refused until buckets
//! refill (failing closed: an attacker with many addresses can then delay enrollment,
//! not grow control's memory or database).
//!
//! The clock is tokio's ([`tokio::time::Instant`]), so tests on paused time drive it.
//! Requests without a [`RemoteAddr`] (the router called in-process, never through
//! [`crate::http::server`], which always inserts one) are not limited.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tracing::warn;

use crate::http::{ApiError, HttpSettings};

/// Most client buckets held at once (a bucket is a few dozen bytes).
pub const MAX_TRACKED_CLIENTS: usize = 100_000;
/// Shortest time between two sweeps of idle buckets when the table is full.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The address of the TCP peer of a request, inserted by [`crate::http::server`] next to
/// [`crate::http::server::PeerCertificate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteAddr(pub SocketAddr);

/// Tokio's clock as a `governor` clock (paused and advanced in tests).
#[derive(Clone, Copy, Debug, Default)]
struct TokioClock;

impl Clock for TokioClock {
    type Instant = Instant;

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

type Keyed = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, TokioClock>;

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    /// When the client may try again.
    pub retry_after: Duration,
}

/// The limiter of the unauthenticated routes (one per router).
#[derive(Debug)]
pub struct PublicRateLimit {
    /// `None` when `http.public_rate_per_sec` is 0.
    limiter: Option<Keyed>,
    /// Time for an empty bucket to fill.
    refill: Duration,
    /// Most buckets held.
    capacity: usize,
    /// When the idle buckets were last dropped.
    last_sweep: Mutex<Option<Instant>>,
}

impl PublicRateLimit {
    /// The limit `http` configures, holding at most [`MAX_TRACKED_CLIENTS`] clients.
    pub fn new(http: &HttpSettings) -> PublicRateLimit {
        PublicRateLimit::with_capacity(http, MAX_TRACKED_CLIENTS)
    }

    /// As [`PublicRateLimit::new`], holding at most `capacity` clients.
    pub fn with_capacity(http: &HttpSettings, capacity: usize) -> PublicRateLimit {
        let rate = NonZeroU32::new(http.public_rate_per_sec);
        // `validate` refuses a zero burst with a rate; 1 is the least that means anything.
        let burst = NonZeroU32::new(http.public_burst).unwrap_or(NonZeroU32::MIN);
        let limiter = rate.map(|r| {
            RateLimiter::new(
                Quota::per_second(r).allow_burst(burst),
                DefaultKeyedStateStore::default(),
                TokioClock,
            )
        });
        let refill = match rate {
            Some(r) => Duration::from_secs_f64(f64::from(burst.get()) / f64::from(r.get())),
            None => Duration::ZERO,
        };
        PublicRateLimit {
            limiter,
            refill,
            capacity: capacity.max(1),
            last_sweep: Mutex::new(None),
        }
    }

    /// Take one request of `ip`'s bucket, or tell when to come back.
    pub fn check(&self, ip: IpAddr) -> Result<(), Limited> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if limiter.len() >= self.capacity {
            self.sweep(limiter);
            if limiter.len() >= self.capacity {
                warn!(
                    clients = limiter.len(),
                    "rate limit table full; refusing unauthenticated requests"
                );
                return Err(Limited {
                    retry_after: self.refill.max(Duration::from_secs(1)),
                });
            }
        }
        limiter
            .check_key(&client_key(ip))
            .map_err(|not_until| Limited {
                retry_after: not_until.wait_time_from(TokioClock.now()),
            })
    }

    /// Number of clients tracked now.
    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }

    /// Drop the buckets that are full again, unless that was done less than
    /// [`SWEEP_INTERVAL`] ago (or is being done by another request now).
    fn sweep(&self, limiter: &Keyed) {
        let now = TokioClock.now();
        let Ok(mut last) = self.last_sweep.try_lock() else {
            return;
        };
        if last.is_some_and(|t| now.duration_since(t) < SWEEP_INTERVAL) {
            return;
        }
        *last = Some(now);
        limiter.retain_recent();
        limiter.shrink_to_fit();
    }
}

/// The bucket a client address counts against: IPv4 as is, IPv6 by its /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & 0xffff_ffff_ffff_ffff_0000_0000_0000_0000,
            )),
        },
    }
}

/// Middleware (a `route_layer` on the unauthenticated routes): answer 429 to a client
/// over its limit, before the handler.
pub async fn limit(State(l): State<Arc<PublicRateLimit>>, req: Request, next: Next) -> Response {
    let Some(RemoteAddr(remote)) = req.extensions().get::<RemoteAddr>().copied() else {
        return next.run(req).await;
    };
    match l.check(remote.ip()) {
        Ok(()) => next.run(req).await,
        Err(Limited { retry_after }) => {
            // Whole seconds, rounded up: a client that waits that long is admitted.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            let secs = secs.max(1);
            tracing::debug!(%remote, retry_after = secs, "rate limited");
            let mut resp = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests from this address; retry in {secs} s"),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rate: u32, burst: u32) -> HttpSettings {
        HttpSettings {
            public_rate_per_sec: rate,
            public_burst: burst,
            ..HttpSettings::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let l = PublicRateLimit::new(&settings(2, 3));
        for _ in 0..3 {
            assert_eq!(l.check(ip("192.0.2.1")), Ok(()));
        }
        let refused = l.check(ip("192.0.2.1")).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        assert_eq!(l.check(ip("192.0.2.2")), Ok(()));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(l.check(ip("192.0.2.1")), Ok(()));
        assert!(l.check(ip("192.0.2.1")).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_counts_by_slash_64_and_mapped_as_ipv4() {
        let l = PublicRateLimit::new(&settings(1, 1));
        assert_eq!(l.check(ip("2001:db8:1:2::1")), Ok(()));
        assert!(l.check(ip("2001:db8:1:2:ffff::9")).is_err());
        assert_eq!(l.check(ip("2001:db8:1:3::1")), Ok(()));
        assert_eq!(l.check(ip("192.0.2.7")), Ok(()));
        assert!(l.check(ip("::ffff:192.0.2.7")).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn table_is_bounded_and_idle_clients_are_dropped() {
        let l = PublicRateLimit::with_capacity(&settings(10, 2), 3);
        for i in 1..=3 {
            assert_eq!(l.check(ip(&format!("192.0.2.{i}"))), Ok(()));
        }
        // Full of recent clients: a fourth address is refused, the table does not grow.
        let refused = l.check(ip("192.0.2.4")).unwrap_err();
        assert!(refused.retry_after >= Duration::from_secs(1));
        assert_eq!(l.tracked(), 3);
        // Once their buckets are full again, they are dropped to make room.
        tokio::time::advance(SWEEP_INTERVAL).await;
        assert_eq!(l.check(ip("192.0.2.4")), Ok(()));
        assert_eq!(l.tracked(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_rate_turns_the_limit_off() {
        let l = PublicRateLimit::new(&settings(0, 0));
        for _ in 0..1000 {
            assert_eq!(l.check(ip("192.0.2.1")), Ok(()));
        }
        assert_eq!(l.tracked(), 0);
    }
}

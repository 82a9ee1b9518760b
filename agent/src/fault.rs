//! Test-only crash points: with the cargo feature `fault-injection` (which the root
//! package's tests turn on through their dev-dependency on this crate, and which the
//! simulator's `chaos` scenario uses), `TETHER_AGENT_FAULT=crash_at:<point>` aborts the
//! process ([`std::process::abort`], as a power cut or SIGKILL would: no destructors, no
//! cleanup) when it reaches `<point>`. The points: `credential_key_written` (a renewal or
//! enrollment wrote the new key, not yet the certificate that goes with it). Without the
//! feature the variable is never read and [`point`] compiles to nothing.

/// The variable naming the crash point.
pub const ENV: &str = "TETHER_AGENT_FAULT";

/// A renewal or enrollment wrote the new key but not yet its certificate.
pub const CREDENTIAL_KEY_WRITTEN: &str = "credential_key_written";

/// Abort now if the crash point armed is `name`.
#[inline]
pub fn point(name: &str) {
    #[cfg(feature = "fault-injection")]
    if armed().as_deref() == Some(name) {
        eprintln!("{ENV}: crash_at:{name}: aborting");
        std::process::abort();
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = name;
}

/// Log the crash point armed, if any (once at start, so a harness can tell the hook is
/// built in).
pub fn announce() {
    #[cfg(feature = "fault-injection")]
    if let Some(p) = armed() {
        tracing::warn!(point = %p, "fault injection armed: crash_at");
    }
}

#[cfg(feature = "fault-injection")]
fn armed() -> Option<String> {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var(ENV)
                .ok()
                .and_then(|v| v.strip_prefix("crash_at:").map(str::to_owned))
        })
        .clone()
}

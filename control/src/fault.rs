//! Test-only fault hooks: with the cargo feature `fault-injection` (which the root
//! package's tests turn on through their dev-dependency on this crate),
//! `TETHER_CONTROL_FAULT=crash_after_commit:<op>` aborts the process
//! ([`std::process::abort`], as a crash or SIGKILL would: no destructors, no answer)
//! right after operation `<op>`'s transaction committed. The operations: `set_status`
//! (disable, enable, revoke) and `record_certificate` (an enrollment's commit: token
//! redeemed, certificate recorded). Without the feature the variable is never read and
//! [`after_commit`] compiles to nothing. It imports nothing of control, so every layer
//! may call it.

/// The variable naming the fault.
pub const ENV: &str = "TETHER_CONTROL_FAULT";

/// Abort now if the fault armed is `crash_after_commit:<op>`.
#[inline]
pub fn after_commit(op: &str) {
    #[cfg(feature = "fault-injection")]
    if armed().as_deref() == Some(op) {
        eprintln!("{ENV}: crash_after_commit:{op}: aborting");
        std::process::abort();
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = op;
}

/// Log the fault armed, if any (called once at start, so tests can check the hook is
/// built in).
pub fn announce() {
    #[cfg(feature = "fault-injection")]
    if let Some(op) = armed() {
        tracing::warn!(fault = %op, "fault injection armed: crash_after_commit");
    }
}

#[cfg(feature = "fault-injection")]
fn armed() -> Option<String> {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var(ENV)
                .ok()
                .and_then(|v| v.strip_prefix("crash_after_commit:").map(str::to_owned))
        })
        .clone()
}

//! Renewal and unattended re-enrollment.
//!
//! - [`renew`]: mutual TLS to control with the current credential, a fresh key and CSR,
//!   `POST /v1/renew`; the new credential is stored crash-safely and the previous one kept
//!   in `previous/` (control keeps allowing it for the overlap window).
//! - [`renewal_due`]: whether the certificate is within `renew_before` of its expiry.
//! - [`recover`]: the certificate expired (or the stored credential is unusable, e.g. a
//!   crash between the key and certificate writes): on AWS, GCP or Kubernetes the agent
//!   enrolls again with a fresh platform proof; a token-only appliance gets
//!   [`EnrollError::NeedsToken`], which says what an operator must do.

use std::path::Path;
use std::time::Duration;

use crate::credentials::{CA_FILE, CERT_FILE, KEY_FILE};
use crate::enroll::{
    enroll, http_client_with_proxy, key_and_csr, post, store_credential, EnrollError,
    EnrollOptions, EnrollResponse, EnrollState,
};
use crate::proof::EnrollProof;
use crate::proxy::ProxyConfig;

/// Default: renew when less than this is left (the renewal-due threshold).
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(86_400);
/// Default: how often the agent looks at its expiry.
pub const DEFAULT_CHECK_EVERY: Duration = Duration::from_secs(3_600);

/// Whether a certificate valid from `not_before` to `not_after` (Unix s) is due for
/// renewal at `now`: less than `renew_before` left, or less than half its lifetime when
/// that is shorter (so a lifetime under `renew_before` renews at half-life instead of
/// at once, over and over).
pub fn renewal_due(not_before: i64, not_after: i64, now: i64, renew_before: Duration) -> bool {
    let threshold = (renew_before.as_secs() as i64).min((not_after - not_before) / 2);
    not_after - now < threshold
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, EnrollError> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|source| EnrollError::Io { path, source })
}

/// Renew the credential in `dir` with control (the URL in `state.json`), reached as
/// `proxy` says. Returns the new state.
pub async fn renew(dir: &Path, proxy: &ProxyConfig) -> Result<EnrollState, EnrollError> {
    let state = EnrollState::load(dir)?.ok_or_else(|| {
        EnrollError::State(format!(
            "{} has no state.json: this credential was not issued by control, renew it by hand",
            dir.display()
        ))
    })?;
    let (ca, chain, key) = (
        read(dir, CA_FILE)?,
        read(dir, CERT_FILE)?,
        read(dir, KEY_FILE)?,
    );
    let client = http_client_with_proxy(&ca, Some((&chain, &key)), proxy)?;
    let (new_key, csr_pem) = key_and_csr(&state.appliance_id)?;
    let base = state.control_url.trim_end_matches('/');
    let resp: EnrollResponse = post(
        &client,
        proxy,
        format!("{base}/v1/renew"),
        &tether_api::enroll::RenewRequest { csr_pem },
    )
    .await?;
    let new_state = EnrollState {
        brokers: resp.brokers,
        fingerprint: resp.fingerprint,
        not_after: resp.not_after,
        ..state
    };
    store_credential(
        dir,
        &new_key,
        &resp.certificate_pem,
        &resp.ca_pem,
        &new_state,
    )?;
    Ok(new_state)
}

/// Put the previous credential (`previous/`, kept by every renewal) back in place, if it
/// is complete and still valid at `now`: how a crash between the key and certificate
/// writes of a renewal is undone without an operator. Returns whether it did. Control
/// still allows that certificate for the overlap window, so the caller renews at once.
pub fn restore_previous(dir: &Path, now: i64) -> Result<bool, EnrollError> {
    let prev = dir.join(crate::enroll::PREVIOUS_DIR);
    let (Ok(key), Ok(chain)) = (
        std::fs::read(prev.join(KEY_FILE)),
        std::fs::read(prev.join(CERT_FILE)),
    ) else {
        return Ok(false);
    };
    let ca = read(dir, CA_FILE)?;
    match crate::Credentials::from_pem(&chain, &key, &ca) {
        Ok(c) if c.not_after_ms() / 1000 > now => {}
        _ => return Ok(false),
    }
    // Key first, as always; a crash here leaves previous/ intact to try again.
    crate::enroll::write_atomic(&dir.join(KEY_FILE), &key, 0o600)?;
    crate::enroll::write_atomic(&dir.join(CERT_FILE), &chain, 0o644)?;
    Ok(true)
}

/// Enroll again from scratch with a fresh platform proof, as `state.json` records it,
/// reaching control as `proxy` says.
pub async fn recover(dir: &Path, proxy: &ProxyConfig) -> Result<EnrollState, EnrollError> {
    let state = EnrollState::load(dir)?.ok_or_else(|| {
        EnrollError::State(format!(
            "{} has no state.json: enroll this appliance with `tether-agent enroll`",
            dir.display()
        ))
    })?;
    let proof = state
        .proof
        .as_ref()
        .and_then(EnrollProof::from_spec)
        .ok_or_else(|| EnrollError::NeedsToken(state.appliance_id.clone()))?;
    let ca_pem = read(dir, CA_FILE)?;
    let mut new_state = enroll(&EnrollOptions {
        control_url: state.control_url.clone(),
        ca_pem,
        appliance_id: state.appliance_id.clone(),
        proof,
        state_dir: dir.to_owned(),
        proxy: proxy.clone(),
    })
    .await?;
    // Keep what the old state knew about operator renewal requests.
    if new_state.manual_renewal_generation < state.manual_renewal_generation {
        new_state.manual_renewal_generation = state.manual_renewal_generation;
        new_state.save(dir)?;
    }
    Ok(new_state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_threshold() {
        let day = DEFAULT_RENEW_BEFORE;
        let month = 30 * 86_400;
        assert!(!renewal_due(0, month, month - 86_400, day));
        assert!(renewal_due(0, month, month - 86_399, day));
        assert!(renewal_due(0, month, month + 5, day));
        // A lifetime shorter than the threshold renews at half-life.
        assert!(!renewal_due(0, 8, 3, day));
        assert!(renewal_due(0, 8, 5, day));
    }
}

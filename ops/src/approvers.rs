//! The customer's pinned approval keys: `approvers.toml` in the customer directory.
//!
//! ```toml
//! [[key]]
//! id = "acme-ops-2026"                        # the customer's label
//! public_key = "ssh-ed25519 AAAAC3Nz… alice"  # or sk-ssh-ed25519@openssh.com …
//! not_before = "2026-01-01T00:00:00Z"
//! not_after = "2027-01-31T00:00:00Z"          # overlap with the next key to rotate
//! scopes = ["exec"]                           # optional; default exec and break_glass
//! require_touch = false                       # sk- keys: demand the user-presence flag
//! ```
//!
//! A signature is accepted when the key it embeds is pinned here, the agent's own clock
//! is inside that key's window, the key is scoped for the use, and (if asked) a hardware
//! key saw a touch. Removing an entry revokes every approval it signed that is not yet
//! used. Whether the file may be trusted at all (who can write it) is the agent's check;
//! this module only reads text.

use serde::Deserialize;
use ssh_key::PublicKey;

use crate::sig::{accepted_algorithm, Signer};
use crate::{format_rfc3339_ms, parse_rfc3339_ms, APPROVAL_NAMESPACE};

/// The longest `approvers.toml` read (a few hundred keys).
pub const MAX_FILE_LEN: usize = 256 * 1024;

/// What a pinned key may sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Approvals of commands.
    Exec,
    /// Approvals of break-glass tunnels.
    BreakGlass,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    public_key: String,
    not_before: String,
    not_after: String,
    #[serde(default)]
    scopes: Option<Vec<Scope>>,
    #[serde(default)]
    require_touch: bool,
}

/// One pinned key.
#[derive(Clone, Debug)]
pub struct PinnedKey {
    /// The customer's label.
    pub id: String,
    /// The key (its comment as written).
    pub key: PublicKey,
    /// Start of its window, ms since the epoch.
    pub not_before_ms: i64,
    /// End of its window, ms since the epoch.
    pub not_after_ms: i64,
    /// What it may sign.
    pub scopes: Vec<Scope>,
    /// Whether a hardware key's signature must carry the user-presence flag.
    pub require_touch: bool,
}

impl PinnedKey {
    /// `SHA256:…` of the key.
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint(ssh_key::HashAlg::Sha256).to_string()
    }
}

/// The parsed `approvers.toml`.
#[derive(Clone, Debug, Default)]
pub struct Approvers {
    keys: Vec<PinnedKey>,
}

/// Why a verified signer may not approve.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyRefusal {
    /// The key is not in `approvers.toml`.
    #[error("the signing key {0} is not pinned in approvers.toml")]
    NotPinned(String),
    /// Pinned, but the agent's clock is outside its window.
    #[error("the signing key {id} is valid {from} to {until}, not now")]
    OutsideWindow {
        /// Its label.
        id: String,
        /// Its window.
        from: String,
        /// Its window.
        until: String,
    },
    /// Pinned, but not for this use.
    #[error("the signing key {0} is not scoped for this kind of approval")]
    Scope(String),
    /// A hardware key without the user-presence flag where the customer asked for it.
    #[error("the signing key {0} requires a touch and the signature carries none")]
    NoTouch(String),
}

impl Approvers {
    /// Parse `approvers.toml`; every entry must be valid (one bad entry refuses the file:
    /// fail closed, the customer sees the error in `Status`).
    pub fn parse(text: &str) -> Result<Approvers, String> {
        if text.len() > MAX_FILE_LEN {
            return Err(format!(
                "approvers.toml is longer than {MAX_FILE_LEN} bytes"
            ));
        }
        let file: File = toml::from_str(text).map_err(|e| format!("approvers.toml: {e}"))?;
        let mut keys: Vec<PinnedKey> = Vec::with_capacity(file.key.len());
        for e in file.key {
            let at = |what: &str| format!("approvers.toml key {:?}: {what}", e.id);
            if e.id.is_empty() || e.id.len() > 128 || e.id.chars().any(char::is_control) {
                return Err(at("id must be 1 to 128 printable characters"));
            }
            if keys.iter().any(|k| k.id == e.id) {
                return Err(at("the id appears twice"));
            }
            let key = PublicKey::from_openssh(e.public_key.trim())
                .map_err(|err| at(&format!("public_key: {err}")))?;
            if !accepted_algorithm(&key.algorithm()) {
                return Err(at(&format!(
                    "public_key is {}; only ssh-ed25519 and sk-ssh-ed25519 are accepted",
                    key.algorithm().as_str()
                )));
            }
            let not_before_ms = parse_rfc3339_ms(&e.not_before).map_err(|err| at(&err))?;
            let not_after_ms = parse_rfc3339_ms(&e.not_after).map_err(|err| at(&err))?;
            if not_after_ms <= not_before_ms {
                return Err(at("not_after must be later than not_before"));
            }
            keys.push(PinnedKey {
                id: e.id,
                key,
                not_before_ms,
                not_after_ms,
                scopes: e
                    .scopes
                    .unwrap_or_else(|| vec![Scope::Exec, Scope::BreakGlass]),
                require_touch: e.require_touch,
            });
        }
        Ok(Approvers { keys })
    }

    /// The pinned keys, in file order.
    pub fn keys(&self) -> &[PinnedKey] {
        &self.keys
    }

    /// The pinned key that made `signer`'s signature, if it may approve `scope` at
    /// `now_ms` (the agent's own clock).
    pub fn authorize(
        &self,
        signer: &Signer,
        now_ms: i64,
        scope: Scope,
    ) -> Result<&PinnedKey, KeyRefusal> {
        let mut found = None;
        for k in self
            .keys
            .iter()
            .filter(|k| k.key.key_data() == signer.key.key_data())
        {
            found = Some(k);
            if now_ms < k.not_before_ms || now_ms > k.not_after_ms {
                continue;
            }
            if !k.scopes.contains(&scope) {
                return Err(KeyRefusal::Scope(k.id.clone()));
            }
            if k.require_touch && !signer.user_present {
                return Err(KeyRefusal::NoTouch(k.id.clone()));
            }
            return Ok(k);
        }
        match found {
            None => Err(KeyRefusal::NotPinned(signer.fingerprint())),
            Some(k) => Err(KeyRefusal::OutsideWindow {
                id: k.id.clone(),
                from: format_rfc3339_ms(k.not_before_ms),
                until: format_rfc3339_ms(k.not_after_ms),
            }),
        }
    }

    /// The same keys as an OpenSSH `allowed_signers` file, so an auditor can reproduce
    /// the agent's decision with `ssh-keygen -Y verify -Overify-time=…`.
    pub fn allowed_signers(&self) -> String {
        let stamp = |ms: i64| {
            format_rfc3339_ms(ms)
                .replace(['-', ':', 'T'], "")
                .trim_end_matches('Z')
                .to_owned()
                + "Z"
        };
        let mut out = String::new();
        for k in &self.keys {
            let mut line_key = k.key.clone();
            line_key.set_comment("");
            out.push_str(&format!(
                "{} namespaces=\"{APPROVAL_NAMESPACE}\",valid-after=\"{}\",valid-before=\"{}\" {}\n",
                k.id.replace(|c: char| c.is_whitespace() || c == ',' || c == '"', "_"),
                stamp(k.not_before_ms),
                stamp(k.not_after_ms),
                line_key.to_openssh().unwrap_or_default()
            ));
        }
        out
    }
}

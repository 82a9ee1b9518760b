//! The appliance's manifest key: an Ed25519 key of its own, made on first start in the
//! state directory (`manifest.key`, mode 0600), that signs every command's output
//! manifest and the appliance audit log's checkpoints.
//!
//! It is deliberately not the mTLS key: that one rotates every renewal and is certified
//! by the vendor's CA, and offline verification must not depend on either. The customer
//! records the public half at install time (`tether-agent manifest-key show`), and every
//! approval the customer signs names it.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tether_ops::ssh_key::{rand_core::OsRng, Algorithm, LineEnding, PrivateKey};

/// The key's file name in the state directory.
pub const MANIFEST_KEY_FILE: &str = "manifest.key";

/// Why the key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ManifestKeyError {
    /// Reading or writing it failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The file is readable by others than the agent's user: anyone who can read it could
    /// forge manifests.
    #[error("{path} has mode {mode:o}: it must be 0600 (only the agent may read the key that signs its manifests)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// Not an unencrypted Ed25519 OpenSSH private key.
    #[error("{path} is not an unencrypted ssh-ed25519 private key: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

/// The manifest key in `state_dir`, made (and written 0600) if there is none yet.
pub fn load_or_create(state_dir: &Path) -> Result<PrivateKey, ManifestKeyError> {
    let path = state_dir.join(MANIFEST_KEY_FILE);
    let io_err = |source| ManifestKeyError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::metadata(&path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(ManifestKeyError::Permissions { path, mode });
            }
            let pem = std::fs::read(&path).map_err(io_err)?;
            let invalid = |detail: String| ManifestKeyError::Invalid {
                path: path.clone(),
                detail,
            };
            let key = PrivateKey::from_openssh(&pem).map_err(|e| invalid(e.to_string()))?;
            if key.is_encrypted() || key.algorithm() != Algorithm::Ed25519 {
                return Err(invalid(format!(
                    "it is {}{}",
                    key.algorithm().as_str(),
                    if key.is_encrypted() {
                        ", encrypted"
                    } else {
                        ""
                    }
                )));
            }
            Ok(key)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(|e| {
                ManifestKeyError::Invalid {
                    path: path.clone(),
                    detail: e.to_string(),
                }
            })?;
            let pem = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| ManifestKeyError::Invalid {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
            tether_identity::fs::write_atomic(&path, pem.as_bytes(), 0o600).map_err(io_err)?;
            tracing::info!(path = %path.display(), key = %public_line(&key), "made the appliance's manifest key");
            Ok(key)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// The public key as one OpenSSH line without comment: `ssh-ed25519 AAAA…`.
pub fn public_line(key: &PrivateKey) -> String {
    let mut public = key.public_key().clone();
    public.set_comment("");
    public.to_openssh().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_kept_private_and_printed_without_comment() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create(dir.path()).unwrap();
        let path = dir.path().join(MANIFEST_KEY_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(public_line(&key), public_line(&again));
        let line = public_line(&key);
        assert!(
            line.starts_with("ssh-ed25519 ") && line.split(' ').count() == 2,
            "{line}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(ManifestKeyError::Permissions { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(ManifestKeyError::Invalid { .. })
        ));
    }
}

//! Kubernetes proof: the projected ServiceAccount token, read from its file as the kubelet
//! last wrote it and sent as is. It cannot carry the nonce; control accepts it only while it
//! is fresh and only once, so re-enrolling needs the kubelet to have rotated it.

use std::path::PathBuf;

use crate::enroll::EnrollError;

/// Largest token file read, bytes.
pub const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

/// Where the token is.
#[derive(Clone, Debug)]
pub struct K8sSource {
    /// The projected token file.
    pub token_file: PathBuf,
}

impl K8sSource {
    /// The proof JSON: `{"kind": "k8s", "jwt": "..."}`. The nonce is not used.
    pub async fn build(&self, _nonce: &str) -> Result<tether_api::enroll::Proof, EnrollError> {
        let path = &self.token_file;
        let fail = |what: String| {
            EnrollError::Proof(format!("Kubernetes token file {}: {what}", path.display()))
        };
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if meta.len() > MAX_TOKEN_FILE_BYTES {
            return Err(fail(format!("larger than {MAX_TOKEN_FILE_BYTES} bytes")));
        }
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let jwt = text.trim();
        if !super::gcp::looks_like_jwt(jwt) {
            return Err(fail("does not hold a JWT".into()));
        }
        Ok(tether_api::enroll::Proof::K8s {
            jwt: jwt.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_and_trims_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "eyJh.eyJp.c2ln\n").unwrap();
        let source = K8sSource {
            token_file: file.clone(),
        };
        let v = source.build("nonce").await.unwrap();
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            serde_json::json!({"kind": "k8s", "jwt": "eyJh.eyJp.c2ln"})
        );
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            source.build("n").await,
            Err(EnrollError::Proof(_))
        ));
        let missing = K8sSource {
            token_file: dir.path().join("missing"),
        };
        assert!(matches!(
            missing.build("n").await,
            Err(EnrollError::Proof(_))
        ));
    }
}

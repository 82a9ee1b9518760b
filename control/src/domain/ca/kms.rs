//! CA keys held in AWS KMS (key spec `ECC_NIST_P256`, usage `SIGN_VERIFY`). The private
//! keys never leave KMS: rcgen signs through [`KmsKey`], which implements rcgen's
//! [`SigningKey`] by calling KMS `Sign`.
//!
//! # Sync signing over an async SDK
//!
//! rcgen's `SigningKey::sign` is synchronous and the SDK is async. The KMS client lives on
//! a small dedicated Tokio runtime (one worker thread, `tether-kms`) owned by the CA; a
//! signature is requested by spawning the SDK call onto that runtime and blocking the
//! calling thread on a channel until it answers. This works from any thread — a plain
//! thread, a `spawn_blocking` task, even (though it blocks a worker, so don't) an async
//! task of another runtime — where `Handle::block_on` would panic inside a runtime. Servers
//! should run issuance in `tokio::task::spawn_blocking`, as they must for local keys too.
//!
//! # RAW versus DIGEST
//!
//! Messages of at most 4,096 bytes (every TBS certificate control makes) are sent as
//! `MessageType::Raw` with `ECDSA_SHA_256`: KMS hashes them. Only larger messages are
//! hashed here and sent as `MessageType::Digest`. (The moto emulator hashes DIGEST messages
//! a second time, so DIGEST signatures from moto do not verify; RAW ones do.) Every
//! signature KMS returns is verified locally against the key's public key before use.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyState, KeyUsageType, MessageType, SigningAlgorithmSpec};
use rcgen::{PublicKeyData, SignatureAlgorithm, SigningKey};
use serde::{Deserialize, Serialize};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

/// Largest message KMS signs as `RAW` (bytes); larger ones go as a SHA-256 `DIGEST`.
pub const KMS_RAW_MESSAGE_MAX: usize = 4096;
/// Timeout for one KMS operation, retries included.
pub const KMS_OPERATION_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the CA's KMS keys are and how to reach KMS.
#[derive(Clone, Default)]
pub struct KmsSettings {
    /// AWS region, e.g. `eu-west-1`. `None`: the SDK's default chain (`AWS_REGION`,
    /// profile).
    pub region: Option<String>,
    /// KMS endpoint URL (an emulator, a VPC endpoint). `None`: the region's endpoint.
    pub endpoint_url: Option<String>,
    /// Key id, ARN or alias (`alias/...`) of an existing root key. `None`: `init_kms`
    /// creates one. Ignored by `load_kms` (the data directory records the key).
    pub root_key: Option<String>,
    /// Key id, ARN or alias of an existing intermediate key. `None`: created.
    pub intermediate_key: Option<String>,
    /// Explicit credentials. `None`: the SDK's default credential chain (environment,
    /// profile, web identity, ECS, instance metadata).
    pub credentials: Option<StaticCredentials>,
}

impl fmt::Debug for KmsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            region,
            endpoint_url,
            root_key,
            intermediate_key,
            credentials,
        } = self;
        f.debug_struct("KmsSettings")
            .field("region", region)
            .field("endpoint_url", endpoint_url)
            .field("root_key", root_key)
            .field("intermediate_key", intermediate_key)
            .field("credentials", credentials)
            .finish()
    }
}

/// Fixed AWS credentials (tests against an emulator; deployments normally use the default
/// chain). `Debug` shows the access key id only.
#[derive(Clone)]
pub struct StaticCredentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key (never printed).
    pub secret_access_key: String,
    /// Session token, for temporary credentials (never printed).
    pub session_token: Option<String>,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// What the data directory records about a KMS-backed CA (`ca/kms.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsRecord {
    /// Region used at init (`None`: default chain).
    pub region: Option<String>,
    /// Endpoint used at init (`None`: the region's).
    pub endpoint_url: Option<String>,
    /// ARN of the root key.
    pub root_key_arn: String,
    /// ARN of the intermediate key.
    pub intermediate_key_arn: String,
}

/// A dedicated runtime for the SDK; see the module docs.
struct KmsRuntime {
    rt: Option<tokio::runtime::Runtime>,
}

impl KmsRuntime {
    fn new() -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tether-kms")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the kms runtime: {e}"))?;
        Ok(Self { rt: Some(rt) })
    }

    /// Run `fut` on the KMS runtime and block this thread until it completes.
    fn run<F>(&self, fut: F) -> Result<F::Output, String>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let rt = self.rt.as_ref().ok_or("kms runtime is shut down")?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| "kms request task ended without an answer".to_owned())
    }
}

impl Drop for KmsRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks; inside another runtime that panics. Don't wait.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A connected KMS client on its own runtime.
#[derive(Clone)]
pub(crate) struct KmsSession {
    rt: Arc<KmsRuntime>,
    client: aws_sdk_kms::Client,
}

impl KmsSession {
    pub(crate) fn connect(settings: &KmsSettings) -> Result<Self, String> {
        let rt = Arc::new(KmsRuntime::new()?);
        let settings = settings.clone();
        let client = rt.run(async move {
            let http = aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https();
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .http_client(http)
                .timeout_config(
                    aws_config::timeout::TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(5))
                        .operation_timeout(KMS_OPERATION_TIMEOUT)
                        .build(),
                );
            if let Some(region) = settings.region {
                loader = loader.region(aws_config::Region::new(region));
            }
            if let Some(url) = settings.endpoint_url {
                loader = loader.endpoint_url(url);
            }
            if let Some(c) = settings.credentials {
                loader = loader.credentials_provider(aws_sdk_kms::config::Credentials::new(
                    c.access_key_id,
                    c.secret_access_key,
                    c.session_token,
                    None,
                    "tether-static",
                ));
            }
            let sdk = loader.load().await;
            aws_sdk_kms::Client::new(&sdk)
        })?;
        Ok(Self { rt, client })
    }

    /// Create an `ECC_NIST_P256` / `SIGN_VERIFY` key; returns its ARN.
    pub(crate) fn create_key(&self, description: &str) -> Result<String, String> {
        let client = self.client.clone();
        let description = description.to_owned();
        self.rt.run(async move {
            let out = client
                .create_key()
                .key_spec(KeySpec::EccNistP256)
                .key_usage(KeyUsageType::SignVerify)
                .description(description)
                .send()
                .await
                .map_err(|e| {
                    format!("CreateKey: {}", aws_sdk_kms::error::DisplayErrorContext(e))
                })?;
            let meta = out
                .key_metadata()
                .ok_or("CreateKey returned no key metadata")?;
            Ok(meta.arn().unwrap_or(meta.key_id()).to_owned())
        })?
    }

    /// Look a key up (id, ARN or alias) with DescribeKey, check its spec, usage and state,
    /// fetch its public key.
    pub(crate) fn key(&self, key_id: &str) -> Result<KmsKey, String> {
        let client = self.client.clone();
        let id = key_id.to_owned();
        let (arn, spki) = self.rt.run(async move {
            let err = |op: &str, e: &dyn fmt::Display| format!("{op} {id}: {e}");
            let meta = client
                .describe_key()
                .key_id(&id)
                .send()
                .await
                .map_err(|e| err("DescribeKey", &aws_sdk_kms::error::DisplayErrorContext(e)))?
                .key_metadata
                .ok_or_else(|| format!("DescribeKey {id} returned no key metadata"))?;
            if meta.key_spec() != Some(&KeySpec::EccNistP256) {
                return Err(format!(
                    "kms key {id} has key spec {}, want ECC_NIST_P256",
                    meta.key_spec().map_or("(none)", |s| s.as_str())
                ));
            }
            if meta.key_usage() != Some(&KeyUsageType::SignVerify) {
                return Err(format!(
                    "kms key {id} has key usage {}, want SIGN_VERIFY",
                    meta.key_usage().map_or("(none)", |s| s.as_str())
                ));
            }
            if meta.key_state() != Some(&KeyState::Enabled) {
                return Err(format!(
                    "kms key {id} is {}, want Enabled",
                    meta.key_state().map_or("(no state)", |s| s.as_str())
                ));
            }
            // The ARN, not the alias: an alias can be pointed elsewhere later.
            let arn = meta.arn().unwrap_or(meta.key_id()).to_owned();
            let spki = client
                .get_public_key()
                .key_id(&arn)
                .send()
                .await
                .map_err(|e| err("GetPublicKey", &aws_sdk_kms::error::DisplayErrorContext(e)))?
                .public_key
                .ok_or_else(|| format!("GetPublicKey {id} returned no public key"))?
                .into_inner();
            Ok::<_, String>((arn, spki))
        })??;
        let public_key = p256_point_from_spki(&spki)
            .ok_or_else(|| format!("kms key {key_id}: public key is not a P-256 point"))?;
        Ok(KmsKey {
            session: self.clone(),
            arn,
            public_key,
            last_error: Arc::new(Mutex::new(None)),
        })
    }
}

/// The uncompressed point of a P-256 SubjectPublicKeyInfo.
fn p256_point_from_spki(spki: &[u8]) -> Option<Vec<u8>> {
    let (rest, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).ok()?;
    if !rest.is_empty() || info.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return None;
    }
    let curve = info.algorithm.parameters.as_ref()?.as_oid().ok()?;
    let point = info.subject_public_key.data.to_vec();
    (curve == OID_EC_P256 && point.len() == 65 && point[0] == 4).then_some(point)
}

/// A P-256 signing key in KMS, usable as an rcgen signer.
#[derive(Clone)]
pub struct KmsKey {
    session: KmsSession,
    arn: String,
    /// Uncompressed P-256 point.
    public_key: Vec<u8>,
    /// rcgen's error for a remote key carries no detail; the detail waits here.
    last_error: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for KmsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsKey").field("arn", &self.arn).finish()
    }
}

impl KmsKey {
    /// The key's ARN.
    pub fn arn(&self) -> &str {
        &self.arn
    }

    /// The detail of the last failed signature, if any (taken).
    pub(crate) fn take_last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|mut e| e.take())
    }

    fn sign_checked(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        let (message, message_type) = if msg.len() <= KMS_RAW_MESSAGE_MAX {
            (msg.to_vec(), MessageType::Raw)
        } else {
            let digest = ring::digest::digest(&ring::digest::SHA256, msg);
            (digest.as_ref().to_vec(), MessageType::Digest)
        };
        let client = self.session.client.clone();
        let arn = self.arn.clone();
        let sig = self.session.rt.run(async move {
            let out = client
                .sign()
                .key_id(&arn)
                .message(Blob::new(message))
                .message_type(message_type)
                .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
                .send()
                .await
                .map_err(|e| {
                    format!("Sign {arn}: {}", aws_sdk_kms::error::DisplayErrorContext(e))
                })?;
            out.signature()
                .map(|b| b.as_ref().to_vec())
                .ok_or_else(|| format!("Sign {arn} returned no signature"))
        })??;
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &self.public_key,
        )
        .verify(msg, &sig)
        .map_err(|_| {
            format!(
                "kms key {} returned a signature that does not verify",
                self.arn
            )
        })?;
        Ok(sig)
    }
}

impl PublicKeyData for KmsKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for KmsKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_checked(msg).map_err(|e| {
            if let Ok(mut slot) = self.last_error.lock() {
                *slot = Some(e);
            }
            rcgen::Error::RemoteKeyError
        })
    }
}

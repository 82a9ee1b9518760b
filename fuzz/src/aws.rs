//! The AWS proof targets' configuration: the STS endpoints control is given and the
//! nonce of the enrollment.

use tether_control::domain::proof::aws::{AwsSettings, AwsVerifier};

/// The nonce of the enrollment.
pub const NONCE: &str = "n-3q2k8w1x7c5v";

/// The STS endpoints configured.
pub const ENDPOINTS: [&str; 3] = [
    "https://sts.amazonaws.com",
    "https://sts.eu-west-1.amazonaws.com",
    "http://127.0.0.1:5000",
];

/// A verifier for [`ENDPOINTS`] (its HTTP client is built, never used by the targets).
pub fn verifier() -> AwsVerifier {
    AwsVerifier::new(&AwsSettings {
        sts_endpoints: ENDPOINTS.iter().map(|s| s.to_string()).collect(),
        ..AwsSettings::default()
    })
    .expect("AWS settings")
}

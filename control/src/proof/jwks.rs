//! JWKS sources shared by the GCP and Kubernetes verifiers. (Being built.)

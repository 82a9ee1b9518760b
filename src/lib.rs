//! Tether's root package: the `tether` dev tool, shared test/bench support (`pki`).

pub mod audit_cli;
pub mod cli;
pub mod ops_cli;
pub mod pki;
pub mod up;

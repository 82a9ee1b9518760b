//! `tether audit verify FILE`: check an audit export offline (the whole chain, every
//! signed checkpoint, and that the export reaches the last checkpoint) against a root
//! certificate the operator holds — never one taken from the file. The format and what
//! verifying proves are in `tether_audit::export`. `tether audit verify SEG... LIVE`
//! checks archive segments (`tether-control audit archive`) and the live export after
//! them end to end (`tether_audit::export::verify_segments`).
//!
//! The root comes from `--ca`, else `$TETHER_CONFIG_DIR/ca.pem` when that variable is
//! set, else `tether/ca.pem` in the platform config directory (where `tether login`
//! keeps it).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rustls::pki_types::CertificateDer;
use tether_audit::checkpoint::{pem_certs, root_trust_domain, CheckpointVerifier};
use tether_audit::export::{
    verify_export, verify_segments, ExportSummary, ExportVerifier, SegmentError, VerifyError,
};

/// The variable naming the CLI's config directory (credentials, `ca.pem`).
pub const CONFIG_DIR_ENV: &str = "TETHER_CONFIG_DIR";
/// The root certificate's file name in the config directory.
pub const CA_FILE: &str = "ca.pem";

/// Where the root certificate is by default: `$TETHER_CONFIG_DIR/ca.pem` when `env` has
/// a non-empty [`CONFIG_DIR_ENV`], else `<platform config dir>/tether/ca.pem`; `None` if
/// there is no platform config directory either.
pub fn default_ca_path(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    match env(CONFIG_DIR_ENV).filter(|d| !d.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir).join(CA_FILE)),
        None => dirs::config_dir().map(|d| d.join("tether").join(CA_FILE)),
    }
}

/// A failed verification: the export's fault ([`VerifyError`]) or the setup's (no root,
/// unreadable file).
#[derive(Debug)]
pub enum Failure {
    /// The export does not verify.
    Export(VerifyError),
    /// A file of several (archive segments, then the live export) does not verify.
    Segment(SegmentError),
    /// The verification could not run.
    Setup(anyhow::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Export(e) => {
                write!(f, "the audit export does not verify: {e}")?;
                if let Some(seq) = e.first_bad_seq() {
                    write!(f, "\nfirst bad entry: {seq}")?;
                }
                Ok(())
            }
            Failure::Segment(e) => {
                write!(
                    f,
                    "the audit archive does not verify: {}: {}",
                    e.name, e.error
                )?;
                if let Some(seq) = e.error.first_bad_seq() {
                    write!(f, "\nfirst bad entry: {seq} (in {})", e.name)?;
                }
                Ok(())
            }
            Failure::Setup(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for Failure {}

/// Verify the export `file` with the root certificate(s) in `ca` (PEM). The trust domain
/// the signer must belong to is `trust_domain`, else the one the root names.
pub fn verify_file(
    file: &Path,
    ca: &Path,
    trust_domain: Option<&str>,
) -> Result<ExportSummary, Failure> {
    let verifier = checkpoint_verifier(ca, trust_domain).map_err(Failure::Setup)?;
    let f = File::open(file)
        .with_context(|| format!("cannot open {}", file.display()))
        .map_err(Failure::Setup)?;
    verify_export(BufReader::new(f), ExportVerifier::new(verifier)).map_err(Failure::Export)
}

/// Verify `files`: one export of the whole log, or archive segments oldest first and then
/// the live export, end to end (see the module docs).
pub fn verify_files(
    files: &[PathBuf],
    ca: &Path,
    trust_domain: Option<&str>,
) -> Result<ExportSummary, Failure> {
    if let [file] = files {
        return verify_file(file, ca, trust_domain);
    }
    let verifier = checkpoint_verifier(ca, trust_domain).map_err(Failure::Setup)?;
    let mut readers = Vec::with_capacity(files.len());
    for file in files {
        let f = File::open(file)
            .with_context(|| format!("cannot open {}", file.display()))
            .map_err(Failure::Setup)?;
        readers.push((file.display().to_string(), BufReader::new(f)));
    }
    verify_segments(readers, &verifier).map_err(Failure::Segment)
}

fn checkpoint_verifier(
    ca: &Path,
    trust_domain: Option<&str>,
) -> anyhow::Result<CheckpointVerifier> {
    let pem = std::fs::read_to_string(ca).with_context(|| {
        format!(
            "cannot read the root certificate {} (give --ca ROOT.pem, or run `tether login`)",
            ca.display()
        )
    })?;
    let roots: Vec<CertificateDer<'static>> =
        pem_certs(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
    if roots.is_empty() {
        bail!("{}: no certificate in it", ca.display());
    }
    let td = match trust_domain {
        Some(td) => td.to_owned(),
        None => roots
            .iter()
            .find_map(|r| root_trust_domain(r))
            .with_context(|| {
                format!(
                    "{} does not name a trust domain; give --trust-domain",
                    ca.display()
                )
            })?,
    };
    Ok(CheckpointVerifier::new(&roots, &td)?)
}

/// The line `verify` prints for a good export, and a note on what no checkpoint covers.
pub fn report(summary: &ExportSummary) -> (String, Option<String>) {
    let (head_seq, head) = summary
        .head
        .as_ref()
        .map_or((0, ""), |(s, h)| (*s, h.as_str()));
    let ok = format!(
        "ok: {} entries, {} checkpoints, head {head} (entry {head_seq})",
        summary.entries, summary.checkpoints
    );
    let note = match summary.last_checkpoint {
        None => Some(
            "note: the export holds no checkpoint; entries cut from its end would not show"
                .to_owned(),
        ),
        Some(last) if head_seq > last => Some(format!(
            "note: entries {}..={head_seq} come after the last checkpoint (entry {last}); \
             a cut among them would not show",
            last + 1
        )),
        Some(_) => None,
    };
    (ok, note)
}

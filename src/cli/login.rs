//! `tether login --bundle FILE`: redeem a one-time bundle for an operator certificate.
//!
//! The key is generated here (ECDSA P-256) and never leaves the machine; only a CSR is
//! sent, over HTTPS pinned to the bundle's root CA. The credential lands in the config
//! directory (see [`crate::cli`]).

use std::path::PathBuf;

use anyhow::Context;
use tether_api::operators::{Bundle, LoginRequest, LoginResponse};

use super::{print_json, write_secret, Common, Output, Profile};

/// `tether login`.
#[derive(Clone, Debug, clap::Args)]
pub struct LoginArgs {
    /// The one-time bundle (from `tether-control init`, `tether operator invite`, or
    /// `tether-control operator invite`).
    #[arg(long)]
    pub bundle: PathBuf,
    /// Control's URL instead of the bundle's (e.g. behind a load balancer or a tunnel),
    /// stored for later commands: the global `--control URL` / `$TETHER_CONTROL_URL`,
    /// which `main` copies here.
    #[arg(skip)]
    pub control: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

/// Redeem the bundle and store the credential.
pub async fn run(args: LoginArgs) -> anyhow::Result<()> {
    let text = std::fs::read(&args.bundle)
        .with_context(|| format!("reading the bundle {}", args.bundle.display()))?;
    let bundle: Bundle = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a Tether bundle", args.bundle.display()))?;
    let control_url = args
        .control
        .unwrap_or_else(|| bundle.control_url.clone())
        .trim_end_matches('/')
        .to_owned();
    super::check_name(&bundle.name)?;
    let dir = args.common.dir()?;
    let (key_pem, csr_pem) =
        tether_agent::enroll::key_and_csr(&bundle.name).context("generating the operator key")?;
    let http = tether_agent::enroll::http_client(bundle.ca_pem.as_bytes())
        .context("the bundle's CA certificate")?;
    let resp: LoginResponse = super::answer(
        &control_url,
        http.post(format!("{control_url}/v1/operators/login"))
            .json(&LoginRequest {
                token: bundle.token.clone(),
                csr_pem,
            })
            .send()
            .await,
    )
    .await?;
    create_private_dir(&dir)?;
    let profile = Profile {
        control_url: control_url.clone(),
        name: resp.name.clone(),
        role: resp.role.as_str().to_owned(),
    };
    // Key before certificate: a certificate never sits next to a key it does not match.
    write_secret(&dir.join(super::KEY_FILE), key_pem.as_bytes())?;
    write_secret(&dir.join(super::CERT_FILE), resp.certificate_pem.as_bytes())?;
    write_secret(&dir.join(super::CA_FILE), resp.ca_pem.as_bytes())?;
    write_secret(
        &dir.join(super::CONFIG_FILE),
        &serde_json::to_vec_pretty(&profile)?,
    )?;
    match args.common.output {
        Output::Json => print_json(&serde_json::json!({
            "name": resp.name,
            "role": resp.role,
            "control_url": control_url,
            "expires_at": resp.expires_at,
            "config_dir": dir,
        }))?,
        Output::Table => println!(
            "logged in to {control_url} as {} ({}); certificate valid until {}; credential in {}",
            resp.name,
            resp.role.as_str(),
            resp.expires_at,
            dir.display()
        ),
    }
    Ok(())
}

/// Create `dir` (and parents) with mode 0700 for the directory itself.
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

//! `tether console [--print-url]`: a single-use sign-in link for the web console, minted
//! with the operator's credential (`POST /v1/console/login-links`), opened in the
//! browser (`xdg-open`) or printed. The link is good once, for about a minute; its secret
//! is in the fragment, which browsers never send to a server.

use anyhow::Context;
use tether_api::console::LoginLink;

use super::{Client, Common};

/// The path that mints a link.
pub const LOGIN_LINKS_PATH: &str = "/v1/console/login-links";

/// `tether console`.
#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// Print the link instead of opening it.
    #[arg(long)]
    pub print_url: bool,
    #[command(flatten)]
    pub common: Common,
}

/// A fresh sign-in link for the operator whose credential is in `dir`.
pub async fn login_link(dir: &std::path::Path) -> anyhow::Result<LoginLink> {
    let client = Client::load(dir)?;
    client
        .call(reqwest::Method::POST, LOGIN_LINKS_PATH)
        .await
        .context("asking control for a console sign-in link")
}

/// Run `tether console`.
pub async fn run(args: ConsoleArgs) -> anyhow::Result<()> {
    let link = login_link(&args.common.dir()?).await?;
    if args.print_url {
        println!("{}", link.url);
        return Ok(());
    }
    let opened = std::process::Command::new("xdg-open")
        .arg(&link.url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if opened {
        eprintln!(
            "opened the console in your browser (the link works once, until {})",
            link.expires_at
        );
    } else {
        eprintln!(
            "open this link in your browser (it works once, until {}):",
            link.expires_at
        );
        println!("{}", link.url);
    }
    Ok(())
}

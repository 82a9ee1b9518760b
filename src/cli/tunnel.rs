//! `tether tunnel`: break glass from the operator's side.
//!
//! 1. `tether tunnel request APP --resource NAME --privilege NAME --duration 30m --reason
//!    TEXT > request.json` makes a fresh one-time `age` key pair (the private half stays
//!    in `CONFIG_DIR/tunnel-keys/`, mode 0600), and asks the appliance, through control,
//!    for the approval document it expects; that document is written to stdout for the
//!    customer to read and sign (`tether-approve sign`).
//! 2. `tether tunnel open --approval request.json --listen 127.0.0.1:PORT` activates the
//!    session the customer signed, prints the local address it listens on (the first line
//!    on stdout), and relays each local TCP connection through control, the broker and the
//!    appliance to the target the customer declared (`tether_proto::relay`). It runs until
//!    the session ends (the appliance's timer, the customer, a policy change) and says why;
//!    Ctrl-C closes the session.
//! 3. `tether tunnel credential ID` fetches the credential the appliance minted, still
//!    sealed to the one-time key, opens it and prints it, once; the one-time key is then
//!    deleted. `tether tunnel close ID` ends a session; `tether tunnel list` shows them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use tether_api::tunnels::{SealedCredential, TunnelList, TunnelPlan, TunnelRequest, TunnelSession};
use tether_proto::relay::{self, Chunk, ChunkCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{print_json, write_secret, Client, Common, Output, Refused};

/// Where one-time keys are kept, under the config directory.
pub const KEYS_DIR: &str = "tunnel-keys";

/// `tether tunnel`
#[derive(Debug, clap::Subcommand)]
pub enum TunnelCmd {
    /// Ask the appliance for the approval document of a break-glass tunnel (to stdout,
    /// for the customer to sign); makes the one-time key the credential will be sealed to.
    Request(RequestArgs),
    /// Activate a signed approval and relay local TCP connections through it until the
    /// session ends; prints the local address first.
    Open(OpenArgs),
    /// Print the session's one-time credential (once), opened with the one-time key.
    Credential {
        /// The tunnel session id (`tun_…`).
        id: String,
        /// Write it to FILE (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// End a session now.
    Close {
        /// The tunnel session id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Tunnel sessions control relays, live first.
    List {
        #[command(flatten)]
        common: Common,
    },
}

/// `tether tunnel request`
#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// The appliance.
    pub appliance: String,
    /// The resource, by the customer's name for it.
    #[arg(long)]
    pub resource: String,
    /// The privilege, by the customer's name for it.
    #[arg(long)]
    pub privilege: String,
    /// How long the session lasts from activation.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Why (a ticket, an incident), signed into the approval.
    #[arg(long)]
    pub reason: String,
    /// Most TCP connections at once.
    #[arg(long, default_value_t = 4)]
    pub max_connections: u16,
    /// Idle limit of each connection [default: the whole duration].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// The request id signed into the approval [default: a fresh one].
    #[arg(long)]
    pub request_id: Option<String>,
    /// Ask for no credential (the privilege mints none).
    #[arg(long)]
    pub no_credential: bool,
    #[command(flatten)]
    pub common: Common,
}

/// `tether tunnel open`
#[derive(Debug, clap::Args)]
pub struct OpenArgs {
    /// The customer's signed approval (its signature beside it as FILE.sig).
    #[arg(long, value_name = "FILE")]
    pub approval: PathBuf,
    /// The signature [default: FILE.sig].
    #[arg(long)]
    pub approval_sig: Option<PathBuf>,
    /// Where to listen for local connections (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub common: Common,
}

/// Run a `tether tunnel` command; the process exit code.
pub async fn run(cmd: TunnelCmd) -> anyhow::Result<i32> {
    match cmd {
        TunnelCmd::Request(args) => request(args).await.map(|()| 0),
        TunnelCmd::Open(args) => open(args).await,
        TunnelCmd::Credential { id, out, common } => {
            credential(&id, out.as_deref(), &common).await.map(|()| 0)
        }
        TunnelCmd::Close { id, common } => {
            let client = Client::load(&common.dir()?)?;
            let t: TunnelSession = client
                .call(reqwest::Method::DELETE, &format!("/v1/tunnels/{id}"))
                .await?;
            match common.output {
                Output::Json => print_json(&t)?,
                Output::Table => println!("closing {id} on appliance {}", t.appliance),
            }
            Ok(0)
        }
        TunnelCmd::List { common } => {
            let client = Client::load(&common.dir()?)?;
            let list: TunnelList = client.get("/v1/tunnels").await?;
            match common.output {
                Output::Json => print_json(&list)?,
                Output::Table => print_table(&list.items),
            }
            Ok(0)
        }
    }
}

fn print_table(items: &[TunnelSession]) {
    println!(
        "{:<28} {:<20} {:<12} {:<10} {:<10} {:<16} {:>5} {:>12}",
        "ID", "APPLIANCE", "RESOURCE", "PRIVILEGE", "STATE", "ENDED", "CONNS", "BYTES"
    );
    for t in items {
        println!(
            "{:<28} {:<20} {:<12} {:<10} {:<10} {:<16} {:>5} {:>12}",
            t.id,
            t.appliance,
            t.resource,
            t.privilege,
            t.state,
            t.ended.as_deref().unwrap_or("-"),
            t.connections,
            t.bytes_up + t.bytes_down
        );
    }
}

/// The file of the one-time key whose public half is `recipient`.
fn key_path(dir: &Path, recipient: &str) -> PathBuf {
    let digest = ring::digest::digest(&ring::digest::SHA256, recipient.as_bytes());
    let name: String = digest.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dir.join(KEYS_DIR).join(format!("{name}.age"))
}

async fn request(args: RequestArgs) -> anyhow::Result<()> {
    let dir = args.common.dir()?;
    let client = Client::load(&dir)?;
    let duration_s = u32::try_from(args.duration.as_secs())
        .ok()
        .filter(|s| *s > 0)
        .context("--duration must be at least 1s")?;
    let identity = (!args.no_credential).then(age::x25519::Identity::generate);
    let recipient = identity
        .as_ref()
        .map(|i| i.to_public().to_string())
        .unwrap_or_default();
    let mut body = TunnelRequest {
        request_id: args
            .request_id
            .clone()
            .unwrap_or_else(|| format!("req-{}", tether_ops::approval::new_approval_id())),
        reason: args.reason.clone(),
        resource: args.resource.clone(),
        privilege: args.privilege.clone(),
        duration_s,
        max_connections: Some(args.max_connections),
        idle_timeout_s: args
            .idle_timeout
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
        recipient,
        approval: None,
        approval_sig: None,
        plan: true,
    };
    let path = format!("/v1/appliances/{}/tunnels", args.appliance);
    let mut plan: anyhow::Result<TunnelPlan> = client.post(&path, &body).await;
    let refused_invalid = |r: &anyhow::Result<TunnelPlan>| {
        r.as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<Refused>())
            .is_some_and(|r| r.code == tether_proto::CommandFailure::Invalid.name())
    };
    let mut identity = identity;
    if identity.is_some() && refused_invalid(&plan) {
        // The privilege mints no credential, so there is nothing to seal: ask again
        // without a recipient (the appliance refuses one it would never use).
        body.recipient.clear();
        identity = None;
        plan = client.post(&path, &body).await;
    }
    let plan = plan?;
    if let Some(identity) = identity {
        let file = key_path(&dir, &body.recipient);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        use age::secrecy::ExposeSecret as _;
        write_secret(&file, identity.to_string().expose_secret().as_bytes())?;
        eprintln!(
            "one-time key for the credential kept in {} (deleted once the credential is opened)",
            file.display()
        );
    }
    eprintln!(
        "approval document for appliance {} from broker {}: have the customer read and sign it (tether-approve sign), then run `tether tunnel open --approval FILE`",
        args.appliance, plan.broker
    );
    print!("{}", plan.document);
    if !plan.document.ends_with('\n') {
        // The document's bytes are what is signed: add nothing to them on a file.
        use std::io::IsTerminal as _;
        if std::io::stdout().is_terminal() {
            println!();
        }
    }
    Ok(())
}

async fn open(args: OpenArgs) -> anyhow::Result<i32> {
    let client = std::sync::Arc::new(Client::load(&args.common.dir()?)?);
    let approval = std::fs::read(&args.approval)
        .with_context(|| format!("cannot read {}", args.approval.display()))?;
    let sig_path = args
        .approval_sig
        .clone()
        .unwrap_or_else(|| tether_ops::sig::sig_path(&args.approval));
    let sig = std::fs::read_to_string(&sig_path)
        .with_context(|| format!("cannot read the signature {}", sig_path.display()))?;
    let doc = tether_ops::tunnel::TunnelApproval::parse(&approval).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a break-glass approval: {e}",
            args.approval.display()
        )
    })?;
    let bg = &doc.break_glass;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    let body = TunnelRequest {
        request_id: doc.request_id.clone(),
        reason: doc.reason.clone(),
        resource: bg.resource.clone(),
        privilege: bg.privilege.clone(),
        duration_s: u32::try_from(bg.duration_s).unwrap_or(u32::MAX),
        max_connections: Some(u16::try_from(bg.max_connections).unwrap_or(u16::MAX)),
        idle_timeout_s: Some(u32::try_from(bg.idle_timeout_s).unwrap_or(u32::MAX)),
        recipient: bg.recipient.clone(),
        approval: Some(String::from_utf8(approval).context("the approval is not UTF-8")?),
        approval_sig: Some(sig),
        plan: false,
    };
    let session: TunnelSession = client
        .post(
            &format!("/v1/appliances/{}/tunnels", doc.appliance.id),
            &body,
        )
        .await?;
    println!("{local}");
    eprintln!(
        "tunnel {} to {} ({} as {}) on appliance {} is active for {}s; connect to {local}{}",
        session.id,
        bg.target,
        bg.resource,
        bg.privilege,
        session.appliance,
        bg.duration_s,
        if session.credential {
            format!("; the credential: tether tunnel credential {}", session.id)
        } else {
            String::new()
        }
    );
    let id = session.id.clone();
    let mut poll = tokio::time::interval(Duration::from_secs(2));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, peer)) = accepted else { continue };
                let client = client.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    match connect(&client, &id, tcp).await {
                        Ok(reason) => eprintln!("connection from {peer} closed: {reason}"),
                        Err(e) => eprintln!("connection from {peer} failed: {e:#}"),
                    }
                });
            }
            _ = poll.tick() => {
                let now: anyhow::Result<TunnelSession> = client.get(&format!("/v1/tunnels/{id}")).await;
                match now {
                    Ok(t) if t.ended.is_some() => {
                        eprintln!("tunnel {id} ended: {}", t.ended.unwrap_or_default());
                        return Ok(0);
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("cannot check the session: {e:#}"),
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    let closed: anyhow::Result<TunnelSession> = client
        .call(reqwest::Method::DELETE, &format!("/v1/tunnels/{id}"))
        .await;
    match closed {
        Ok(_) => eprintln!("tunnel {id} closed"),
        Err(e) => {
            eprintln!("cannot close tunnel {id} (the appliance's timer still ends it): {e:#}")
        }
    }
    Ok(0)
}

/// Relay one local connection through the session; returns why it closed.
async fn connect(client: &Client, id: &str, tcp: tokio::net::TcpStream) -> anyhow::Result<String> {
    let _ = tcp.set_nodelay(true);
    let io = client
        .upgrade(&format!("/v1/tunnels/{id}/connect"), relay::UPGRADE)
        .await?;
    let (rd, wr) = tokio::io::split(io);
    let mut chunks = tokio_util::codec::FramedRead::new(rd, ChunkCodec);
    let mut wr = tokio_util::codec::FramedWrite::new(wr, ChunkCodec);
    match chunks.next().await {
        Some(Ok(Chunk::Connected)) => {}
        Some(Ok(Chunk::Ended { reason, message })) => {
            return Ok(if message.is_empty() {
                reason.to_string()
            } else {
                format!("{reason} ({message})")
            })
        }
        Some(Ok(other)) => bail!("unexpected first chunk {other:?}"),
        Some(Err(e)) => bail!("bad relay chunk: {e}"),
        None => bail!("the relay closed before the appliance answered"),
    }
    let (mut local_rd, mut local_wr) = tcp.into_split();
    let up = async move {
        let mut buf = vec![0u8; relay::MAX_DATA];
        loop {
            match local_rd.read(&mut buf).await {
                Ok(0) => {
                    let _ = wr.send(Chunk::Fin).await;
                    // Keep the write half open: the other side may still send.
                    return Some(wr);
                }
                Ok(n) => {
                    let data = Chunk::Data(bytes::Bytes::copy_from_slice(&buf[..n]));
                    if wr.send(data).await.is_err() {
                        return None;
                    }
                }
                Err(_) => return None,
            }
        }
    };
    let down = async move {
        while let Some(c) = chunks.next().await {
            match c {
                Ok(Chunk::Data(d)) => {
                    if local_wr.write_all(&d).await.is_err() {
                        return "the local client went away".to_owned();
                    }
                }
                Ok(Chunk::Fin) => {
                    let _ = local_wr.shutdown().await;
                    return "finished".to_owned();
                }
                Ok(Chunk::Ended { reason, message }) => {
                    return if message.is_empty() {
                        reason.to_string()
                    } else {
                        format!("{reason} ({message})")
                    };
                }
                Ok(Chunk::Connected) | Err(_) => return "relay protocol error".to_owned(),
            }
        }
        "the relay closed".to_owned()
    };
    tokio::pin!(up, down);
    let reason = tokio::select! {
        w = &mut up => match w {
            // Half-closed: wait for the far side to finish too, then end cleanly.
            Some(mut wr) => {
                let r = down.await;
                let _ = wr.close().await;
                r
            }
            None => "aborted".to_owned(),
        },
        r = &mut down => r,
    };
    Ok(reason)
}

async fn credential(id: &str, out: Option<&Path>, common: &Common) -> anyhow::Result<()> {
    let dir = common.dir()?;
    let client = Client::load(&dir)?;
    let sealed: SealedCredential = client
        .call(
            reqwest::Method::POST,
            &format!("/v1/tunnels/{id}/credential"),
        )
        .await?;
    let file = key_path(&dir, &sealed.recipient);
    let key = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "no one-time key for this session in {} (it was made by `tether tunnel request` with this config directory)",
            file.display()
        )
    })?;
    let identity: age::x25519::Identity = key
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{} is not an age identity: {e}", file.display()))?;
    let ciphertext = base64::engine::general_purpose::STANDARD
        .decode(sealed.sealed.as_bytes())
        .context("the sealed credential is not base64")?;
    // The secret lives in this buffer only, zeroed when it goes.
    let plain =
        zeroize::Zeroizing::new(age::decrypt(&identity, &ciphertext).map_err(|e| {
            anyhow::anyhow!("cannot open the credential with the one-time key: {e}")
        })?);
    match out {
        Some(path) => {
            write_secret(path, &plain)?;
            eprintln!("credential written to {}", path.display());
        }
        None => {
            use std::io::Write as _;
            let mut stdout = std::io::stdout();
            stdout.write_all(&plain)?;
            stdout.flush()?;
        }
    }
    // One use: the key has nothing left to open.
    let _ = std::fs::remove_file(&file);
    Ok(())
}

//! `tether-control audit list|verify|checkpoint|export|archive`: the audit log on the data
//! directory ([`tether_control::domain::audit`]).

use anyhow::Context;
use tether_audit as audit;
use tether_control::domain::audit as domain_audit;
use tether_control::domain::ca::Ca;
use tether_control::store::sql::DEFAULT_AUDIT_LIMIT;

use super::{open, AuditCmd};

/// `audit …`.
pub async fn audit(cmd: AuditCmd) -> anyhow::Result<()> {
    use std::io::Write;
    match cmd {
        AuditCmd::List { dir, after, limit } => {
            let (_, store) = open(&dir.data_dir).await?;
            let mut out = std::io::stdout().lock();
            for entry in store.audit_entries(after, limit).await? {
                serde_json::to_writer(&mut out, &entry)?;
                writeln!(out)?;
            }
        }
        AuditCmd::Verify { dir } => {
            let (_, store) = open(&dir.data_dir).await?;
            let mut chain = domain_audit::live_chain(store.as_ref()).await?;
            if let Some(a) = store.audit_archive().await? {
                println!(
                    "entries up to {} are archived (last to {}); checking the live log after it",
                    a.seq, a.file
                );
            }
            let mut after = 0;
            loop {
                let page = store.audit_entries(after, DEFAULT_AUDIT_LIMIT).await?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for entry in &page {
                    chain.push(entry).context("the audit log does not verify")?;
                }
            }
            match chain.head() {
                Some((seq, hash)) => println!(
                    "audit log verified: {} entries, head {seq} {hash}",
                    chain.checked()
                ),
                None => println!("audit log verified: empty"),
            }
        }
        AuditCmd::Checkpoint { dir } => {
            let (cfg, store) = open(&dir.data_dir).await?;
            let ca = Ca::load(&dir.data_dir, &cfg.ca_config())?;
            let signer = domain_audit::checkpoint_signer(&ca)?;
            let now = tether_control::now_unix();
            match domain_audit::write_checkpoint(store.as_ref(), &signer, now).await? {
                Some(cp) => println!("checkpoint signed: entry {} {}", cp.seq, cp.head_hash),
                None => println!("no entry newer than the last checkpoint; nothing signed"),
            }
        }
        AuditCmd::Archive { dir, before, out } => {
            let (cfg, store) = open(&dir.data_dir).await?;
            let header = export_header(&dir.data_dir, &cfg.trust_domain)?;
            let ca = Ca::load(&dir.data_dir, &cfg.ca_config())?;
            let signer = domain_audit::checkpoint_signer(&ca)?;
            let roots = audit::checkpoint::pem_certs(&header.root_pem)
                .map_err(|e| anyhow::anyhow!("ca/root.pem: {e}"))?;
            let verifier = audit::checkpoint::CheckpointVerifier::new(&roots, &cfg.trust_domain)?;
            let done = domain_audit::archive(
                store.as_ref(),
                &signer,
                verifier,
                Some(&header),
                audit::Actor::system(audit::system::LOCAL_ADMIN),
                before,
                &out,
                tether_control::now_unix(),
            )
            .await?;
            if done.signed {
                println!("signed a checkpoint of entry {}", done.last);
            }
            println!(
                "archived entries {}..={} ({} checkpoints) to {}; {} entries left the live log, which now starts after entry {} {}",
                done.first,
                done.last,
                done.file.checkpoints,
                out.display(),
                done.deleted,
                done.last,
                done.hash
            );
        }
        AuditCmd::Export { dir, out } => {
            let (cfg, store) = open(&dir.data_dir).await?;
            let header = export_header(&dir.data_dir, &cfg.trust_domain)?;
            let tmp = out.with_extension("partial");
            let file = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut w = std::io::BufWriter::new(file);
            let summary = domain_audit::write_export(store.as_ref(), Some(&header), &mut w).await?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "exported {} entries and {} checkpoints to {}",
                summary.entries,
                summary.checkpoints,
                out.display()
            );
        }
    }
    Ok(())
}

/// The export header of the data directory's log (its root, for information).
fn export_header(
    data_dir: &std::path::Path,
    trust_domain: &str,
) -> anyhow::Result<audit::export::ExportHeader> {
    let root = data_dir.join("ca").join("root.pem");
    Ok(audit::export::ExportHeader {
        tether_audit_export: audit::export::EXPORT_VERSION,
        trust_domain: trust_domain.to_owned(),
        root_pem: std::fs::read_to_string(&root)
            .with_context(|| format!("reading {}", root.display()))?,
    })
}

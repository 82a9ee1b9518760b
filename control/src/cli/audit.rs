//! `tether-control audit list|verify|checkpoint|export`: the audit log on the data
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
            let mut chain = audit::ChainVerifier::from_genesis();
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
        AuditCmd::Export { dir, out } => {
            let (cfg, store) = open(&dir.data_dir).await?;
            let root = dir.data_dir.join("ca").join("root.pem");
            let header = audit::export::ExportHeader {
                tether_audit_export: audit::export::EXPORT_VERSION,
                trust_domain: cfg.trust_domain.clone(),
                root_pem: std::fs::read_to_string(&root)
                    .with_context(|| format!("reading {}", root.display()))?,
            };
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

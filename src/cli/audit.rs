//! `tether audit export --out FILE`: the whole audit log and its signed checkpoints from
//! control's API (`GET /v1/audit`, role viewer), written in the export format that
//! `tether audit verify FILE` (and `tether-control audit export`) use: one JSON line per
//! entry, each checkpoint right after the entry it vouches for, and checkpoints control
//! holds beyond its last entry (a cut tail) at the end, for the verifier to find.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use tether_audit::export::ExportLine;
use tether_audit::page::AuditPage;

use super::{Client, Common};

/// Export the log to `out` (replaced atomically). Returns (entries, checkpoints).
pub async fn export(common: &Common, out: &Path) -> anyhow::Result<(u64, u64)> {
    let client = Client::load(&common.dir()?)?;
    let tmp = out.with_extension("partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(file);
    let mut line = |l: ExportLine| -> std::io::Result<()> {
        w.write_all(l.to_json().as_bytes())?;
        w.write_all(b"\n")
    };
    let (mut entries, mut checkpoints, mut after) = (0u64, 0u64, 0i64);
    loop {
        let page: AuditPage = client.get(&format!("/v1/audit?after={after}")).await?;
        let mut cps = page.checkpoints.into_iter().peekable();
        if page.entries.is_empty() {
            for c in cps {
                line(ExportLine::Checkpoint(c))?;
                checkpoints += 1;
            }
            break;
        }
        for entry in page.entries {
            let seq = entry.seq;
            anyhow::ensure!(
                seq > after,
                "control answered entry {seq} after {after}: out of order"
            );
            after = seq;
            // An anchor (the last archived entry's checkpoint) leads the live log.
            while let Some(c) = cps.next_if(|c| c.seq < seq) {
                line(ExportLine::Checkpoint(c))?;
                checkpoints += 1;
            }
            line(ExportLine::Entry(entry))?;
            entries += 1;
            while let Some(c) = cps.next_if(|c| c.seq <= seq) {
                line(ExportLine::Checkpoint(c))?;
                checkpoints += 1;
            }
        }
    }
    w.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok((entries, checkpoints))
}

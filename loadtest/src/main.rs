//! `tether-loadtest`: the Tether fleet simulator.
//!
//! Thousands of virtual appliances in one process, each a real [`tether_agent::Agent`]
//! with its own enrolled certificate, on one transport (`--transport`: sharing a few QUIC
//! endpoints, or a TCP socket each); control and the brokers run as child processes
//! (`--spawn`) so their memory and CPU can be measured.
//! A run drives one scenario and writes a JSON report.
//!
//! # Layout
//!
//! - [`cli`]: flags, defaults and their environment variables.
//! - [`pool`]: the cached pool of enrolled appliances and control's data directory.
//! - [`spawn`]: control and brokers as child processes, killed when their guard drops.
//! - [`fleet`]: the virtual appliances and the events they report.
//! - [`scenario`]: one run, sampling, the report's numbers; `storm` and `steady`.
//! - [`ops`]: `commands` and `revoke`, through control's API as an operator.
//! - [`motion`]: `churn` and `drain`, the fleet moving between sessions and brokers.
//! - [`chaos`]: `chaos`, the fleet under seeded faults, and its invariants.
//! - [`faultproxy`]: `chaos`'s partitions between a broker and control.
//! - [`pgserver`]: `chaos --control-replicas`'s own PostgreSQL, which `pg_restart` crashes.
//! - [`remote`]: `--control URL`, a run against an existing cluster as an operator.
//! - [`baseline`]: `--baseline`, the bare echo server (quinn, or tokio-rustls over TCP) and
//!   its clients.
//! - [`measure`]: `/proc` readings (RSS, CPU, UDP drops, open-files limits), the machine.
//! - [`report`]: the JSON report.
//! - [`progress`]: progress bars.
//!
//! ```text
//! tether-loadtest run --spawn --scenario storm --appliances 2000 --report storm.json
//! ```

use clap::Parser;

mod baseline;
mod chaos;
mod cli;
mod faultproxy;
mod fleet;
mod html;
mod measure;
mod motion;
mod ops;
mod pgserver;
mod pool;
mod progress;
mod remote;
mod report;
mod scenario;
mod spawn;

#[global_allocator]
static GLOBAL: alloc::Allocator = alloc::Allocator;

mod alloc {
    //! The simulator runs on mimalloc (a hundred thousand agents in one process); the
    //! bare baseline server, a child process of this binary, runs on the system allocator,
    //! as the broker does, so the two servers' memory per connection is compared on the
    //! same allocator. The child is told by [`SYSTEM_ALLOCATOR`] in its environment, read
    //! with `getenv` (which does not allocate) at the first allocation, before `main` and
    //! before any other thread exists; every later allocation and free goes to the same
    //! allocator.

    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicU8, Ordering};

    /// Set (to anything) in the environment of a child that is to use the system allocator.
    pub const SYSTEM_ALLOCATOR: &std::ffi::CStr = c"TETHER_LOADTEST_SYSTEM_ALLOCATOR";

    const UNDECIDED: u8 = 0;
    const MIMALLOC: u8 = 1;
    const SYSTEM: u8 = 2;
    static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

    pub struct Allocator;

    /// mimalloc's `mi_option_purge_delay` (`mimalloc.h`, v2 and v3 alike): how long freed
    /// memory is kept before it is returned to the system; -1 is never.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

    /// On mimalloc, keep freed memory instead of returning it to the system (after 1 s by
    /// default). The simulator starts and stops whole fleets back to back: returned memory
    /// was faulted in again, zeroed by the kernel, by the next phase. perf of a 5,000 QUIC
    /// storm: 868 samples of page faults in the simulator during Tether's phase against
    /// 488 during the bare phase (Tether's agents allocate and free more); with purging
    /// off, the simulator's CPU in Tether's phase fell from 4.35 / 4.10 / 4.06 s to 3.74 /
    /// 3.54 / 3.68 s. Memory is what a load generator has to spare.
    pub fn keep_freed_memory() {
        if !system() {
            // SAFETY: sets one of mimalloc's runtime options, which it reads when it next
            // considers purging; any value is valid for this option.
            unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
        }
    }

    fn system() -> bool {
        match CHOICE.load(Ordering::Relaxed) {
            SYSTEM => true,
            MIMALLOC => false,
            _ => {
                // SAFETY: a NUL-terminated name; getenv only reads the environment.
                let set = !unsafe { nix::libc::getenv(SYSTEM_ALLOCATOR.as_ptr()) }.is_null();
                CHOICE.store(if set { SYSTEM } else { MIMALLOC }, Ordering::Relaxed);
                set
            }
        }
    }

    // SAFETY: each call goes to one allocator, the same for the process's whole life
    // (decided at its first allocation), so memory is always freed by the allocator that
    // gave it; both uphold GlobalAlloc's contract.
    unsafe impl GlobalAlloc for Allocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if system() {
                unsafe { System.alloc(layout) }
            } else {
                unsafe { mimalloc::MiMalloc.alloc(layout) }
            }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if system() {
                unsafe { System.alloc_zeroed(layout) }
            } else {
                unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
            }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if system() {
                unsafe { System.dealloc(ptr, layout) }
            } else {
                unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
            }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if system() {
                unsafe { System.realloc(ptr, layout, new_size) }
            } else {
                unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_purge_delay_option_is_the_one_set() {
            // SAFETY: reads one of mimalloc's options.
            let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                // mimalloc v3's default for `purge_delay` (ms): the index names that option.
                assert_eq!(get(), 1000);
            }
            keep_freed_memory();
            if !system() {
                assert_eq!(get(), -1, "never purge");
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    alloc::keep_freed_memory();
    let cli = cli::Cli::parse();
    // In `revoke`, every revoked agent logs an error when refused: that is the point, and
    // the report counts it. Over TCP, yamux warns of every connection the fleet's stop
    // closes under it.
    let default_filter = match &cli.command {
        cli::Command::Run(a)
            if matches!(a.scenario, cli::Scenario::Revoke | cli::Scenario::Chaos) =>
        {
            "warn,tether_agent=error,yamux=error,tether_agent::agent=off"
        }
        _ => "warn,tether_agent=error,yamux=error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        cli::Command::Run(args) => runtime.block_on(run(args)),
        cli::Command::BaselineServer(args) => runtime.block_on(baseline::serve(args)),
    }
}

async fn run(args: cli::RunArgs) -> anyhow::Result<()> {
    let limits = limits();
    let report = tokio::select! {
        r = scenario::run(&args, limits) => r?,
        _ = tokio::signal::ctrl_c() => {
            // Dropping the run stops the fleet and kills control and the brokers.
            anyhow::bail!("interrupted: the fleet, the brokers and control were stopped");
        }
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{json}\n"))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        println!("report: {}", path.display());
        // The same report as a page with charts, next to it.
        let page_path = path.with_extension("html");
        let page = html::render(&serde_json::to_value(&report)?);
        std::fs::write(&page_path, page)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", page_path.display()))?;
        println!("report page: {}", page_path.display());
    }
    println!("{}", report.summary());
    // chaos: a broken invariant fails the run, named, with the seed to repeat it.
    if let Some(broken) = report.broken_invariants() {
        anyhow::bail!("{broken}");
    }
    Ok(())
}

/// Raise the open-files limit and say which kernel limits may get in the way.
fn limits() -> report::Limits {
    let nofile = match measure::raise_nofile() {
        Ok((before, after, hard)) => {
            if before != after {
                println!("open files limit: raised from {before} to {after} (hard limit {hard})");
            } else {
                println!("open files limit: {after} (hard limit {hard})");
            }
            after
        }
        Err(e) => {
            eprintln!("warning: cannot raise the open files limit: {e:#}");
            0
        }
    };
    let rmem_max = measure::sysctl(measure::RMEM_MAX);
    let wmem_max = measure::sysctl(measure::WMEM_MAX);
    const WANTED: u64 = 32 * 1024 * 1024;
    if let Some(r) = rmem_max.filter(|r| *r < WANTED) {
        eprintln!(
            "note: net.core.rmem_max is {r} bytes: processes without CAP_NET_ADMIN get at most \
             that much UDP receive buffer, and a storm above ~1,000 concurrent handshakes drops \
             packets. To lift it: sysctl -w net.core.rmem_max={WANTED} net.core.wmem_max={WANTED}"
        );
    }
    report::Limits {
        nofile,
        rmem_max,
        wmem_max,
        ..report::Limits::default()
    }
}

//! What the simulator measures outside its own code: a process's memory and CPU from
//! `/proc`, the machine, the kernel's UDP counters and limits, and the open-files limit.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// One reading of a process: resident memory and CPU time used so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ProcSample {
    /// `VmRSS`, bytes.
    pub rss_bytes: u64,
    /// `utime + stime`, seconds.
    pub cpu_seconds: f64,
}

/// Read `/proc/PID/status` and `/proc/PID/stat`.
pub fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(ProcSample {
        rss_bytes: parse_rss(&status).context("no VmRSS in /proc/PID/status")?,
        cpu_seconds: parse_cpu_ticks(&stat).context("malformed /proc/PID/stat")? as f64
            / clock_ticks() as f64,
    })
}

/// Whether process `pid` runs (exists and is not a zombie waiting to be reaped).
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold any
        // character: read it after the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Sum of readings of several processes.
pub fn sample_all(pids: &[u32]) -> anyhow::Result<ProcSample> {
    let mut total = ProcSample::default();
    for pid in pids {
        let s = sample(*pid)?;
        total.rss_bytes += s.rss_bytes;
        total.cpu_seconds += s.cpu_seconds;
    }
    Ok(total)
}

/// `VmRSS:   1234 kB` → bytes.
fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Fields 14 and 15 (utime, stime, in clock ticks) of `/proc/PID/stat`. The command name
/// (field 2) may hold spaces and parentheses: count from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After `)`: field 3 (state) is index 0, so utime (14) is index 11, stime index 12.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => 100,
    }
}

/// The machine a report was measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Cores this process may use.
    pub cores: usize,
    /// `MemTotal`, bytes.
    pub memory_bytes: u64,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// 1-minute load average when the run started.
    pub load_average_1m: Option<f64>,
    /// 1-minute load average when the scenario ended (above the cores, something else
    /// competed for them: the figures are pessimistic).
    pub load_average_1m_end: Option<f64>,
}

/// The 1-minute load average.
pub fn load_average() -> Option<f64> {
    read_trimmed("/proc/loadavg")
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
}

impl Machine {
    /// Read it from `/proc`.
    pub fn detect() -> Machine {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0);
        Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_bytes,
            kernel: read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default(),
            load_average_1m: load_average(),
            load_average_1m_end: None,
        }
    }
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A kernel setting as a number, if readable.
pub fn sysctl(path: &str) -> Option<u64> {
    read_trimmed(path)?.parse().ok()
}

/// `net.core.rmem_max`.
pub const RMEM_MAX: &str = "/proc/sys/net/core/rmem_max";
/// `net.core.wmem_max`.
pub const WMEM_MAX: &str = "/proc/sys/net/core/wmem_max";

/// UDP counters of the whole machine (`/proc/net/snmp`, IPv4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UdpCounters {
    /// Datagrams dropped because a socket's receive buffer was full.
    pub rcvbuf_errors: u64,
    /// Datagrams that could not be sent for lack of send buffer.
    pub sndbuf_errors: u64,
}

impl UdpCounters {
    /// Read them (zero if unreadable).
    pub fn read() -> UdpCounters {
        parse_snmp(&std::fs::read_to_string("/proc/net/snmp").unwrap_or_default())
            .unwrap_or_default()
    }

    /// Counts since `earlier`.
    pub fn since(self, earlier: UdpCounters) -> UdpCounters {
        UdpCounters {
            rcvbuf_errors: self.rcvbuf_errors.saturating_sub(earlier.rcvbuf_errors),
            sndbuf_errors: self.sndbuf_errors.saturating_sub(earlier.sndbuf_errors),
        }
    }
}

/// The `Udp:` header and value lines of `/proc/net/snmp`.
fn parse_snmp(text: &str) -> Option<UdpCounters> {
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let get = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some(UdpCounters {
        rcvbuf_errors: get("RcvbufErrors")?,
        sndbuf_errors: get("SndbufErrors").unwrap_or(0),
    })
}

/// Raise the soft open-files limit to the hard one. Returns `(before, after, hard)`.
pub fn raise_nofile() -> anyhow::Result<(u64, u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    let (now, _) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    Ok((soft, now, hard))
}

/// Process `pid`'s soft open-files limit (`Max open files` in `/proc/PID/limits`);
/// `None` if unreadable, `u64::MAX` if unlimited.
pub fn nofile_of(pid: u32) -> Option<u64> {
    parse_nofile(&std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?)
}

fn parse_nofile(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    match line["Max open files".len()..].split_whitespace().next()? {
        "unlimited" => Some(u64::MAX),
        soft => soft.parse().ok(),
    }
}

/// File descriptors a process needs beside one per TCP connection (listeners, logs,
/// epoll, the runtime's, control's channel).
pub const NOFILE_MARGIN: u64 = 256;

/// Warn when `who` (with open-files limit `limit`) cannot hold `connections` TCP
/// connections. Returns whether it can.
pub fn check_nofile(who: &str, limit: Option<u64>, connections: u64) -> bool {
    let need = connections + NOFILE_MARGIN;
    match limit {
        Some(l) if l < need => {
            eprintln!(
                "warning: {who} may open {l} files, and {connections} TCP connections need about \
                 {need}: connections past the limit fail (raise the hard limit: ulimit -Hn, or \
                 LimitNOFILE= / limits.conf)"
            );
            false
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_from_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(parse_nofile(limits), Some(20000));
        assert_eq!(
            parse_nofile(
                "Max open files            unlimited            unlimited            files\n"
            ),
            Some(u64::MAX)
        );
        assert_eq!(parse_nofile("Max processes 10 10\n"), None);
        // Children inherit the limit this process raised.
        assert_eq!(
            nofile_of(std::process::id()),
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        );
    }

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        assert!(is_alive(std::process::id()));
        assert!(!is_alive(u32::MAX - 1));
    }

    #[test]
    fn rss_from_status() {
        let status = "Name:\tx\nVmPeak:\t  9999 kB\nVmRSS:\t    1024 kB\nThreads:\t4\n";
        assert_eq!(parse_rss(status), Some(1024 * 1024));
        assert_eq!(parse_rss("Name: x\n"), None);
    }

    #[test]
    fn cpu_from_stat_with_a_strange_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime ...
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 10 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn udp_counters_from_snmp() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
            Udp: 100 0 7 90 5 2 0\n";
        assert_eq!(
            parse_snmp(text),
            Some(UdpCounters {
                rcvbuf_errors: 5,
                sndbuf_errors: 2
            })
        );
        assert_eq!(parse_snmp("Ip: 1\n"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id()).expect("sample self");
        assert!(s.rss_bytes > 0);
    }
}

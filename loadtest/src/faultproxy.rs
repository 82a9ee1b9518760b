//! `chaos`: a TCP proxy between brokers and control that can partition them.
//!
//! A partition is a black hole, as a real one is: nothing is refused or reset, bytes
//! simply stop moving in both directions (on the connections open and on any opened
//! meanwhile) until it heals, when whatever was written meanwhile flows on, as TCP's
//! retransmissions would deliver it. Whether the two ends notice (keep-alives, read
//! deadlines) and how they recover is what the chaos run watches.
//!
//! A proxy either stands between one broker and control ([`FaultProxy::partition`]
//! cuts every connection), or in front of one control replica for every broker (the
//! address the replica advertises), where [`FaultProxy::cut_processes`] cuts only the
//! connections of the given processes: each accepted connection's peer socket is looked
//! up in `/proc/net/tcp` and matched against those processes' open sockets.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bytes moved per read.
const BUF: usize = 16 * 1024;

/// Which connections a partition cuts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Cut {
    /// None.
    #[default]
    Nothing,
    /// Every one.
    All,
    /// Those opened by these processes.
    Processes(Vec<u32>),
}

impl Cut {
    /// Whether the connection whose peer socket is `inode` is cut.
    fn holds(&self, inode: Option<u64>) -> bool {
        match self {
            Cut::Nothing => false,
            Cut::All => true,
            Cut::Processes(pids) => {
                inode.is_some_and(|inode| pids.iter().any(|&pid| owns_socket(pid, inode)))
            }
        }
    }
}

/// A proxy on 127.0.0.1 forwarding every connection to `upstream`.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    partitioned: watch::Sender<Cut>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free loopback port.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fault proxy")?;
        let addr = listener.local_addr()?;
        let (partitioned, rx) = watch::channel(Cut::Nothing);
        let accept = tokio::spawn(accept_loop(listener, upstream, rx));
        Ok(FaultProxy {
            addr,
            partitioned,
            accept,
        })
    }

    /// Where to connect instead of `upstream`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Start (`true`) or heal (`false`) the partition of every connection.
    pub fn partition(&self, on: bool) {
        self.partitioned
            .send_replace(if on { Cut::All } else { Cut::Nothing });
    }

    /// Partition the connections of processes `pids` (and only those); an empty list
    /// heals.
    pub fn cut_processes(&self, pids: Vec<u32>) {
        self.partitioned.send_replace(if pids.is_empty() {
            Cut::Nothing
        } else {
            Cut::Processes(pids)
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, part: watch::Receiver<Cut>) {
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            continue;
        };
        let part = part.clone();
        tokio::spawn(async move {
            // The peer's socket, to tell whose connection this is.
            let inode = client
                .local_addr()
                .ok()
                .and_then(|local| socket_inode(peer, local));
            let mut wait = part.clone();
            // A connection opened during a partition hangs until it heals.
            if healed(&mut wait, inode).await.is_err() {
                return;
            }
            // Control down: the broker sees its connection dropped, as a refused one.
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = tokio::spawn(pipe(cr, sw, part.clone(), inode));
            let down = tokio::spawn(pipe(sr, cw, part, inode));
            let _ = tokio::join!(up, down);
        });
    }
}

/// Wait until no partition cuts the connection of peer socket `inode`; `Err` when the
/// proxy is gone.
async fn healed(
    part: &mut watch::Receiver<Cut>,
    inode: Option<u64>,
) -> Result<(), watch::error::RecvError> {
    while part.borrow_and_update().holds(inode) {
        part.changed().await?;
    }
    Ok(())
}

/// The inode of the socket at `peer` connected to `local` (both on this machine), from
/// `/proc/net/tcp` (or `tcp6`, for an IPv4-mapped socket).
fn socket_inode(peer: SocketAddr, local: SocketAddr) -> Option<u64> {
    for (table, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let (Some(ours), Some(theirs)) = (proc_addr(peer, v6), proc_addr(local, v6)) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[1] == ours && f[2] == theirs {
                return f[9].parse().ok();
            }
        }
    }
    None
}

/// `addr` as `/proc/net/tcp{,6}` prints it: each 32-bit word of the address in host byte
/// order, `%08X`, then `:%04X` of the port.
fn proc_addr(addr: SocketAddr, v6: bool) -> Option<String> {
    let octets: Vec<u8> = match (addr.ip(), v6) {
        (IpAddr::V4(ip), false) => ip.octets().to_vec(),
        (IpAddr::V4(ip), true) => ip.to_ipv6_mapped().octets().to_vec(),
        (IpAddr::V6(ip), true) => ip.octets().to_vec(),
        (IpAddr::V6(_), false) => return None,
    };
    let mut out = String::new();
    for w in octets.chunks(4) {
        let word = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]);
        out.push_str(&format!("{word:08X}"));
    }
    Some(format!("{out}:{:04X}", addr.port()))
}

/// Whether process `pid` holds socket `inode` open.
fn owns_socket(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str())
            })
        })
        .unwrap_or(false)
}

/// Copy `from` to `to`, holding bytes while partitioned; at EOF or an error, shut `to`
/// down so the other side sees the end too.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut part: watch::Receiver<Cut>,
    inode: Option<u64>,
) {
    let mut buf = vec![0u8; BUF];
    loop {
        if healed(&mut part, inode).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            // A partition began: stop reading until it heals.
            _ = part.changed() => continue,
        };
        // Read just as the partition began: deliver it after.
        if healed(&mut part, inode).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An echo server on a free loopback port: what the proxies under test forward to.
    async fn echo_server() -> SocketAddr {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn forwards_then_holds_bytes_while_partitioned() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.expect("proxy");
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        let mut b = [0u8; 5];
        c.write_all(b"hello").await.expect("write");
        c.read_exact(&mut b).await.expect("echo");
        assert_eq!(&b, b"hello");

        proxy.partition(true);
        c.write_all(b"again").await.expect("write");
        let held = tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut b)).await;
        assert!(held.is_err(), "bytes crossed a partition");
        // A connection opened meanwhile hangs too.
        let mut d = TcpStream::connect(proxy.addr()).await.expect("connect");
        d.write_all(b"new").await.expect("write");

        proxy.partition(false);
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut b))
            .await
            .expect("delivered after healing")
            .expect("read");
        assert_eq!(&b, b"again");
        let mut e = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(5), d.read_exact(&mut e))
            .await
            .expect("delivered after healing")
            .expect("read");
        assert_eq!(&e, b"new");
    }

    #[tokio::test]
    async fn cuts_only_the_connections_of_the_processes_named() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.expect("proxy");
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        let mut b = [0u8; 3];
        c.write_all(b"one").await.expect("write");
        c.read_exact(&mut b).await.expect("echo");

        // Another process's connections cut: ours flow on.
        proxy.cut_processes(vec![1]);
        c.write_all(b"two").await.expect("write");
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut b))
            .await
            .expect("not cut")
            .expect("read");
        assert_eq!(&b, b"two");

        // Ours: held until healed.
        proxy.cut_processes(vec![std::process::id()]);
        c.write_all(b"three").await.expect("write");
        let mut b = [0u8; 5];
        let held = tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut b)).await;
        assert!(held.is_err(), "bytes crossed a partition of this process");
        proxy.cut_processes(Vec::new());
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut b))
            .await
            .expect("delivered after healing")
            .expect("read");
        assert_eq!(&b, b"three");
    }

    /// Another process's connection (a python3 child relaying its stdin) is told apart.
    #[tokio::test]
    async fn cuts_the_connection_of_another_process() {
        use tokio::io::AsyncBufReadExt;
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.expect("proxy");
        let script = format!(
            "import socket,sys\ns=socket.create_connection(('127.0.0.1',{}))\nfor l in sys.stdin:\n    s.sendall(l.encode())\n    print(s.recv(64).decode(),end='',flush=True)\n",
            proxy.addr().port()
        );
        let mut child = tokio::process::Command::new("python3")
            .args(["-c", &script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3");
        let pid = child.id().expect("pid");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        stdin.write_all(b"one\n").await.expect("write");
        let line = tokio::time::timeout(Duration::from_secs(10), out.next_line()).await;
        assert_eq!(line.expect("echo").expect("read").as_deref(), Some("one"));
        proxy.cut_processes(vec![pid]);
        stdin.write_all(b"two\n").await.expect("write");
        let held = tokio::time::timeout(Duration::from_millis(500), out.next_line()).await;
        assert!(
            held.is_err(),
            "bytes of process {pid} crossed its partition"
        );
        proxy.cut_processes(Vec::new());
        let line = tokio::time::timeout(Duration::from_secs(10), out.next_line()).await;
        assert_eq!(line.expect("healed").expect("read").as_deref(), Some("two"));
    }

    #[test]
    fn addresses_are_written_as_proc_net_tcp_writes_them() {
        let a: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let want = if cfg!(target_endian = "little") {
            "0100007F:1F90"
        } else {
            "7F000001:1F90"
        };
        assert_eq!(proc_addr(a, false).as_deref(), Some(want));
        let mapped = proc_addr(a, true).expect("v6");
        assert!(
            mapped.ends_with(":1F90") && mapped.len() == 32 + 5,
            "{mapped}"
        );
    }
}

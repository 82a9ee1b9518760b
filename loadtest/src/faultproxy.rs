//! `chaos`: a TCP proxy between one broker and control that can partition them.
//!
//! A partition is a black hole, as a real one is: nothing is refused or reset, bytes
//! simply stop moving in both directions (on the connections open and on any opened
//! meanwhile) until it heals, when whatever was written meanwhile flows on, as TCP's
//! retransmissions would deliver it. Whether the two ends notice (keep-alives, read
//! deadlines) and how they recover is what the chaos run watches.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bytes moved per read.
const BUF: usize = 16 * 1024;

/// A proxy on 127.0.0.1 forwarding every connection to `upstream`.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    partitioned: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free loopback port.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fault proxy")?;
        let addr = listener.local_addr()?;
        let (partitioned, rx) = watch::channel(false);
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

    /// Start (`true`) or heal (`false`) the partition.
    pub fn partition(&self, on: bool) {
        self.partitioned.send_replace(on);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, part: watch::Receiver<bool>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let part = part.clone();
        tokio::spawn(async move {
            let mut wait = part.clone();
            // A connection opened during a partition hangs until it heals.
            if healed(&mut wait).await.is_err() {
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
            let up = tokio::spawn(pipe(cr, sw, part.clone()));
            let down = tokio::spawn(pipe(sr, cw, part));
            let _ = tokio::join!(up, down);
        });
    }
}

/// Wait until no partition is on; `Err` when the proxy is gone.
async fn healed(part: &mut watch::Receiver<bool>) -> Result<(), watch::error::RecvError> {
    while *part.borrow_and_update() {
        part.changed().await?;
    }
    Ok(())
}

/// Copy `from` to `to`, holding bytes while partitioned; at EOF or an error, shut `to`
/// down so the other side sees the end too.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut part: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; BUF];
    loop {
        if healed(&mut part).await.is_err() {
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
        if healed(&mut part).await.is_err() {
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

    #[tokio::test]
    async fn forwards_then_holds_bytes_while_partitioned() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = echo.local_addr().expect("addr");
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
}

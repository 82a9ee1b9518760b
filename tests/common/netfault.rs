//! A TCP proxy that plays the network between two processes, so a test can break it on
//! purpose: [`FaultProxy::cut`] (reset every connection, refuse new ones),
//! [`FaultProxy::blackhole`] (accept and never forward: a half-open partition),
//! [`FaultProxy::heal`], [`FaultProxy::retarget`] (a failover: new connections go
//! elsewhere, the old ones are reset). Connections are spread round-robin over the
//! upstreams unless one is pinned. Tokio only, on 127.0.0.1.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Forward.
    Pass,
    /// Reset every connection and refuse (reset) new ones.
    Cut,
    /// Accept, read nothing, forward nothing, answer nothing.
    Blackhole,
}

struct Shared {
    upstreams: Vec<SocketAddr>,
    pinned: Option<usize>,
    next: usize,
    mode: Mode,
}

/// See the module doc. Dropping it stops accepting and resets every connection.
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    /// Bumped to end every live connection (cut, retarget, drop).
    generation: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on an ephemeral port of 127.0.0.1 and forward to `upstreams`.
    pub async fn start(upstreams: &[SocketAddr]) -> FaultProxy {
        assert!(!upstreams.is_empty(), "a proxy needs an upstream");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared {
            upstreams: upstreams.to_vec(),
            pinned: None,
            next: 0,
            mode: Mode::Pass,
        }));
        let (generation, _) = watch::channel(0u64);
        let (s, g) = (shared.clone(), generation.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (mode, upstream) = {
                    let mut s = s.lock().unwrap();
                    let i = s.pinned.unwrap_or(s.next % s.upstreams.len());
                    s.next = s.next.wrapping_add(1);
                    (s.mode, s.upstreams[i])
                };
                let mut ended = g.subscribe();
                tokio::spawn(async move {
                    match mode {
                        Mode::Cut => reset(client),
                        Mode::Blackhole => {
                            // Hold it open, silent, until told otherwise.
                            let _ = ended.changed().await;
                            reset(client);
                        }
                        Mode::Pass => {
                            let Ok(server) = TcpStream::connect(upstream).await else {
                                reset(client);
                                return;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            forward(client, server, ended).await;
                        }
                    }
                });
            }
        });
        FaultProxy {
            addr,
            shared,
            generation,
            accept,
        }
    }

    /// `postgres://…@HOST:PORT/…` rewritten to go through this proxy.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL");
        let (auth, hostpath) = match rest.rsplit_once('@') {
            Some((a, h)) => (format!("{a}@"), h),
            None => (String::new(), rest),
        };
        let path = hostpath.find('/').map(|i| &hostpath[i..]).unwrap_or("");
        format!("{scheme}://{auth}{}{path}", self.addr)
    }

    fn set(&self, mode: Mode, end_live: bool) {
        self.shared.lock().unwrap().mode = mode;
        if end_live {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Reset every connection and refuse new ones until [`FaultProxy::heal`].
    pub fn cut(&self) {
        self.set(Mode::Cut, true);
    }

    /// A half-open partition: live connections stop forwarding (their bytes go nowhere,
    /// nothing comes back, no reset), new ones are accepted and never answered.
    pub fn blackhole(&self) {
        // Live connections: end their forwarding silently by swapping them into holes.
        self.set(Mode::Blackhole, false);
        self.generation.send_modify(|g| *g += 1 << 32);
    }

    /// Forward again (connections held in a hole are reset, so peers notice at once).
    pub fn heal(&self) {
        self.set(Mode::Pass, true);
    }

    /// New connections go to `addr`; live ones are reset (they reached the old one).
    pub fn retarget(&self, addr: SocketAddr) {
        {
            let mut s = self.shared.lock().unwrap();
            s.upstreams = vec![addr];
            s.pinned = None;
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Send every new connection to upstream `i` (`None`: round-robin).
    pub fn pin(&self, i: Option<usize>) {
        self.shared.lock().unwrap().pinned = i;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

/// Close with RST rather than FIN: what a peer sees when the network path breaks.
/// (`SO_LINGER` 0 never blocks: it drops the connection at once.)
#[allow(deprecated)]
fn reset(stream: TcpStream) {
    let _ = stream.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

/// Copy both ways until either side closes or the generation changes. A change in the
/// high half (a blackhole) parks the connection silently until the next change; any
/// other change resets both sides.
async fn forward(client: TcpStream, server: TcpStream, mut ended: watch::Receiver<u64>) {
    let start = *ended.borrow_and_update();
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    let copy = async { tokio::join!(up, down) };
    tokio::select! {
        _ = copy => return,
        _ = ended.changed() => {}
    }
    let now = *ended.borrow_and_update();
    if now >> 32 != start >> 32 && (now & 0xffff_ffff) == (start & 0xffff_ffff) {
        // Blackholed: hold both ends open, forwarding nothing, until healed or cut.
        let _ = ended.changed().await;
    }
    let client = cr.reunite(cw).ok();
    let server = sr.reunite(sw).ok();
    if let Some(c) = client {
        reset(c);
    }
    if let Some(s) = server {
        reset(s);
    }
}

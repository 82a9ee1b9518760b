//! Egress through an HTTP proxy (HTTP `CONNECT`), for customer networks that allow
//! outbound connections only through one.
//!
//! [`ProxyConfig`] is the one place that reads the proxy environment: an explicit URL
//! (`tether-agent --proxy`) wins over `HTTPS_PROXY` / `https_proxy` (uppercase wins when
//! both are set); `NO_PROXY` / `no_proxy` lists the destinations reached directly, and
//! applies to the explicit URL too. Everything the agent dials goes through it:
//!
//! - [`ProxyConfig::connect`]: a TCP stream to `host:port`, direct or tunnelled through the
//!   proxy with `CONNECT host:port HTTP/1.1` (Basic credentials from the URL's userinfo).
//! - [`ProxyConfig::reqwest_proxy`]: the same decision for the HTTPS client of enrollment
//!   and renewal ([`crate::enroll::http_client_with_proxy`]).
//!
//! Only `http://` proxies are supported (the tunnel itself carries TLS); other schemes are
//! refused when the configuration is built. The password never leaves this module except
//! in the `Proxy-Authorization` header: [`ProxyUrl`]'s `Display` and `Debug` print
//! `http://user:***@proxy:3128`, and no error or log line carries it.
//!
//! `NO_PROXY` entries, comma-separated, case-insensitive, each with an optional `:port`
//! (`[v6]:port` for IPv6): `*` (everything), a domain (`example.com`, `.example.com` or
//! `*.example.com`: the domain and every name under it), an IP address, or a CIDR range
//! (`10.0.0.0/8`, `fd00::/8`). Names are compared as written, never resolved: a domain
//! entry does not match an IP literal and a CIDR does not match a name.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use base64::Engine as _;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Environment variables naming the proxy, first found wins (after an explicit URL).
pub const ENV_HTTPS_PROXY: [&str; 2] = ["HTTPS_PROXY", "https_proxy"];
/// Environment variables listing the destinations reached directly, first found wins.
pub const ENV_NO_PROXY: [&str; 2] = ["NO_PROXY", "no_proxy"];
/// Largest response head (status line and headers) accepted from a proxy: 8 KiB.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// Most headers accepted in a proxy's response.
pub const MAX_RESPONSE_HEADERS: usize = 64;
/// Port of a proxy URL that names none (the `http` default).
pub const DEFAULT_PROXY_PORT: u16 = 80;
/// Where an explicit proxy URL comes from, as error messages name it.
pub const ORIGIN_EXPLICIT: &str = "--proxy";

/// Why a proxy could not be configured or refused a tunnel. Messages never contain the
/// proxy's password; proxies are shown as `http://user:***@host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The proxy URL is not usable (local configuration: fix it, retrying cannot help).
    #[error("invalid proxy URL in {origin}: {reason}")]
    InvalidUrl {
        /// Where it came from: `--proxy`, `HTTPS_PROXY` or `https_proxy`.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The proxy URL's scheme is not `http` (local configuration).
    #[error(
        "unsupported proxy scheme {scheme:?} in {origin}: only http:// proxies \
         (HTTP CONNECT) are supported"
    )]
    UnsupportedScheme {
        /// Where it came from.
        origin: String,
        /// The scheme given.
        scheme: String,
    },
    /// An entry of `NO_PROXY` is not usable (local configuration).
    #[error("invalid {origin} entry {entry:?}: {reason}")]
    InvalidNoProxy {
        /// Where it came from: `NO_PROXY` or `no_proxy`.
        origin: String,
        /// The entry.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The destination cannot be written in a `CONNECT` request (our caller's input).
    #[error("invalid destination host {0:?}")]
    InvalidTarget(String),
    /// The proxy answered 407 (proxy authentication required): it wants credentials, or
    /// refused the ones sent. Retrying with the same credentials cannot help. Some proxies
    /// (tinyproxy) answer 401 to wrong credentials: a `CONNECT` is answered by the proxy
    /// itself, so that is taken as the same.
    #[error(
        "proxy {proxy} requires authentication ({status} proxy authentication required): {}",
        if *sent_credentials {
            "it refused the configured credentials"
        } else {
            "no credentials configured (give them in the proxy URL: http://user:password@host:port)"
        }
    )]
    AuthRequired {
        /// The proxy (redacted).
        proxy: String,
        /// The status: 407, or 401 from proxies that use it for wrong credentials.
        status: u16,
        /// Whether credentials were sent.
        sent_credentials: bool,
    },
    /// The proxy refused the tunnel with another status (e.g. 403: the destination or
    /// port is not allowed; 502/504: the proxy could not reach it, retrying may help).
    #[error("proxy {proxy} refused CONNECT {target}: {status} {reason}")]
    Refused {
        /// The proxy (redacted).
        proxy: String,
        /// The destination asked for.
        target: String,
        /// The HTTP status.
        status: u16,
        /// The proxy's reason phrase (printable ASCII, shortened).
        reason: String,
    },
    /// The proxy's response head exceeded [`MAX_RESPONSE_HEAD`] bytes (or
    /// [`MAX_RESPONSE_HEADERS`] headers): the proxy's fault.
    #[error("proxy {proxy} sent a response head over {MAX_RESPONSE_HEAD} bytes or {MAX_RESPONSE_HEADERS} headers")]
    HeadTooLarge {
        /// The proxy (redacted).
        proxy: String,
    },
    /// The proxy's answer is not an HTTP/1.x response: the proxy's fault (or not a
    /// proxy at that address).
    #[error("proxy {proxy} sent an invalid response: {reason}")]
    Malformed {
        /// The proxy (redacted).
        proxy: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The proxy closed the connection before answering `CONNECT`; retrying may help.
    #[error("proxy {proxy} closed the connection before answering CONNECT")]
    Closed {
        /// The proxy (redacted).
        proxy: String,
    },
}

impl ProxyError {
    /// The [`io::ErrorKind`] this error travels as from [`ProxyConfig::connect`].
    fn io_kind(&self) -> io::ErrorKind {
        match self {
            ProxyError::InvalidUrl { .. }
            | ProxyError::UnsupportedScheme { .. }
            | ProxyError::InvalidNoProxy { .. }
            | ProxyError::InvalidTarget(_) => io::ErrorKind::InvalidInput,
            ProxyError::AuthRequired { .. } => io::ErrorKind::PermissionDenied,
            ProxyError::Refused { .. } => io::ErrorKind::ConnectionRefused,
            ProxyError::HeadTooLarge { .. } | ProxyError::Malformed { .. } => {
                io::ErrorKind::InvalidData
            }
            ProxyError::Closed { .. } => io::ErrorKind::UnexpectedEof,
        }
    }
}

impl From<ProxyError> for io::Error {
    /// Keeps the [`ProxyError`] as the source: `e.get_ref()` downcasts to it.
    fn from(e: ProxyError) -> io::Error {
        io::Error::new(e.io_kind(), e)
    }
}

/// Basic credentials, percent-decoded. The password is only ever written into the
/// `Proxy-Authorization` header.
#[derive(Clone, PartialEq, Eq)]
struct Credentials {
    username: String,
    password: String,
}

impl Credentials {
    fn header_value(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// An `http://` proxy: host, port and optional Basic credentials. `Display` and `Debug`
/// show `http://user:***@host:port`, never the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Host name or IP address (IPv6 without brackets).
    host: String,
    port: u16,
    credentials: Option<Credentials>,
}

impl ProxyUrl {
    /// Parse `http://[user[:password]@]host[:port][/]`; a URL without a scheme is taken as
    /// `http://`. The port defaults to [`DEFAULT_PROXY_PORT`]. `origin` names where the URL
    /// came from in errors (`--proxy`, `HTTPS_PROXY`).
    pub fn parse(url: &str, origin: &str) -> Result<ProxyUrl, ProxyError> {
        let invalid = |reason: &str| ProxyError::InvalidUrl {
            origin: origin.to_owned(),
            reason: reason.to_owned(),
        };
        let url = url.trim();
        if url.is_empty() {
            return Err(invalid("empty"));
        }
        let full = match url.split_once("://") {
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") => url.to_owned(),
            Some((scheme, _)) => {
                // The scheme only, and only if it looks like one: the rest may hold a
                // password.
                let shown = if !scheme.is_empty()
                    && scheme.len() <= 16
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                {
                    scheme.to_ascii_lowercase()
                } else {
                    "?".to_owned()
                };
                return Err(ProxyError::UnsupportedScheme {
                    origin: origin.to_owned(),
                    scheme: shown,
                });
            }
            None => format!("http://{url}"),
        };
        // url's errors never quote the input.
        let parsed = reqwest::Url::parse(&full).map_err(|e| invalid(&e.to_string()))?;
        let host = match parsed.host_str() {
            Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']'),
            _ => return Err(invalid("no host")),
        };
        if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
            return Err(invalid(
                "a proxy URL has no path or query: http://host:port",
            ));
        }
        if parsed.fragment().is_some() {
            return Err(invalid("a proxy URL has no fragment: http://host:port"));
        }
        let port = parsed.port().unwrap_or(DEFAULT_PROXY_PORT);
        let credentials = if parsed.username().is_empty() && parsed.password().is_none() {
            None
        } else {
            let decode = |s: &str, what: &str| {
                percent_decode(s).ok_or_else(|| {
                    invalid(&format!(
                        "the {what} is not valid UTF-8 once percent-decoded"
                    ))
                })
            };
            Some(Credentials {
                username: decode(parsed.username(), "user name")?,
                password: decode(parsed.password().unwrap_or(""), "password")?,
            })
        };
        Ok(ProxyUrl {
            host: host.to_ascii_lowercase(),
            port,
            credentials,
        })
    }

    /// The proxy's host name or IP address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user name of the Basic credentials, if any.
    pub fn username(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.username.as_str())
    }

    /// Whether the URL carries credentials.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// `http://host:port`, without credentials.
    fn plain(&self) -> String {
        format!("http://{}", authority(&self.host, self.port))
    }

    /// A TCP stream to `host:port` tunnelled through this proxy (whatever `NO_PROXY`
    /// says), the whole of it (TCP connect, `CONNECT`, response) within `timeout`. No byte
    /// after the proxy's response head is consumed.
    pub async fn connect(&self, host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
        let target = target_authority(host, port)?;
        tracing::debug!(proxy = %self, target = %target, "connecting through the proxy");
        let attempt = async {
            let mut stream = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot connect to proxy {self}: {e}"))
                })?;
            let _ = stream.set_nodelay(true);
            self.handshake(&mut stream, &target).await?;
            Ok::<_, io::Error>(stream)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connecting to {target} through proxy {self}: timed out after {}",
                    humantime::format_duration(timeout)
                ),
            )),
        }
    }

    /// Send `CONNECT` on `stream` and read the answer; `Ok` on 2xx.
    async fn handshake(&self, stream: &mut TcpStream, target: &str) -> io::Result<()> {
        let mut request = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: tether-agent/{}\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(c) = &self.credentials {
            request.push_str("Proxy-Authorization: ");
            request.push_str(&c.header_value());
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        let written = stream.write_all(request.as_bytes()).await;
        // The request holds the credentials: do not keep a copy around.
        drop(request);
        written
            .map_err(|e| io::Error::new(e.kind(), format!("cannot write to proxy {self}: {e}")))?;
        let head = read_head(stream, self).await?;
        let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let malformed = |reason: String| ProxyError::Malformed {
            proxy: self.to_string(),
            reason,
        };
        match response.parse(&head) {
            Ok(httparse::Status::Complete(n)) if n == head.len() => {}
            Ok(_) => return Err(malformed("incomplete response head".into()).into()),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ProxyError::HeadTooLarge {
                    proxy: self.to_string(),
                }
                .into())
            }
            Err(e) => return Err(malformed(e.to_string()).into()),
        }
        let status = response.code.unwrap_or(0);
        match status {
            200..=299 => {
                tracing::debug!(proxy = %self, target = %target, status, "proxy tunnel open");
                Ok(())
            }
            407 | 401 => Err(ProxyError::AuthRequired {
                proxy: self.to_string(),
                status,
                sent_credentials: self.credentials.is_some(),
            }
            .into()),
            _ => Err(ProxyError::Refused {
                proxy: self.to_string(),
                target: target.to_owned(),
                status,
                reason: self.sanitize_reason(response.reason.unwrap_or("")),
            }
            .into()),
        }
    }

    /// The proxy's reason phrase, printable ASCII, at most 100 characters, and never our
    /// password (should a proxy echo it).
    fn sanitize_reason(&self, reason: &str) -> String {
        let mut s: String = reason
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(100)
            .collect();
        if let Some(c) = &self.credentials {
            if !c.password.is_empty() && s.contains(&c.password) {
                s = s.replace(&c.password, "***");
            }
        }
        s
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("http://")?;
        if let Some(c) = &self.credentials {
            write!(f, "{}:***@", c.username.escape_debug())?;
        }
        f.write_str(&authority(&self.host, self.port))
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ProxyUrl")
            .field(&format_args!("{self}"))
            .finish()
    }
}

/// Read the proxy's response head, through the blank line and not one byte further: the
/// bytes are peeked, and only those up to the end of the head are consumed, so whatever
/// the destination sends first stays in the stream for the caller.
async fn read_head(stream: &mut TcpStream, proxy: &ProxyUrl) -> io::Result<Vec<u8>> {
    let mut head: Vec<u8> = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        let room = MAX_RESPONSE_HEAD - head.len();
        if room == 0 {
            return Err(ProxyError::HeadTooLarge {
                proxy: proxy.to_string(),
            }
            .into());
        }
        let want = room.min(buf.len());
        let n = stream.peek(&mut buf[..want]).await.map_err(|e| {
            io::Error::new(e.kind(), format!("cannot read from proxy {proxy}: {e}"))
        })?;
        if n == 0 {
            return Err(ProxyError::Closed {
                proxy: proxy.to_string(),
            }
            .into());
        }
        let before = head.len();
        head.extend_from_slice(&buf[..n]);
        // The terminator may straddle the previous read.
        let from = before.saturating_sub(3);
        let end = find(&head[from..], b"\r\n\r\n").map(|i| from + i + 4);
        let take = end.map_or(n, |end| end - before);
        stream.read_exact(&mut buf[..take]).await?;
        if let Some(end) = end {
            head.truncate(end);
            return Ok(head);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `host:port`, with brackets around an IPv6 address.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The `CONNECT` target for `host` (a name, an IPv4 address, or an IPv6 address with or
/// without brackets), refusing anything that could break out of the request line.
fn target_authority(host: &str, port: u16) -> Result<String, ProxyError> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.contains(':') {
        let ip: Ipv6Addr = bare
            .parse()
            .map_err(|_| ProxyError::InvalidTarget(host.escape_debug().to_string()))?;
        return Ok(format!("[{ip}]:{port}"));
    }
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !ok {
        return Err(ProxyError::InvalidTarget(host.escape_debug().to_string()));
    }
    Ok(format!("{bare}:{port}"))
}

/// Percent-decode `s`; `None` if the result is not UTF-8. A `%` not followed by two hex
/// digits stays as it is.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// What one `NO_PROXY` entry matches.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rule {
    /// `*`.
    All,
    /// A domain and every name under it (lowercase, no leading or trailing dot).
    Domain(String),
    /// One address.
    Ip(IpAddr),
    /// A range: network and prefix length.
    Cidr(IpAddr, u8),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    rule: Rule,
    /// Only this destination port, when given.
    port: Option<u16>,
}

/// The `NO_PROXY` list: destinations reached directly (see the module docs for the
/// syntax).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<Entry>,
}

impl NoProxy {
    /// Parse a comma-separated list; empty entries are skipped. `origin` names the
    /// variable in errors.
    pub fn parse(list: &str, origin: &str) -> Result<NoProxy, ProxyError> {
        let mut entries = Vec::new();
        for raw in list.split(',') {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            entries.push(
                parse_entry(raw).map_err(|reason| ProxyError::InvalidNoProxy {
                    origin: origin.to_owned(),
                    entry: raw.escape_debug().to_string(),
                    reason: reason.to_owned(),
                })?,
            );
        }
        Ok(NoProxy { entries })
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `host:port` is to be reached directly. `host` is a name, an IP address, or
    /// an IPv6 address in brackets.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let ip: Option<IpAddr> = host.parse().ok();
        self.entries.iter().any(|e| {
            if e.port.is_some_and(|p| p != port) {
                return false;
            }
            match (&e.rule, ip) {
                (Rule::All, _) => true,
                (Rule::Ip(a), Some(ip)) => *a == ip,
                (Rule::Cidr(net, len), Some(ip)) => in_cidr(ip, *net, *len),
                (Rule::Domain(d), None) => {
                    host == *d
                        || (host.len() > d.len()
                            && host.ends_with(d.as_str())
                            && host.as_bytes()[host.len() - d.len() - 1] == b'.')
                }
                _ => false,
            }
        })
    }
}

impl fmt::Display for NoProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let host = match &e.rule {
                Rule::All => "*".to_owned(),
                Rule::Domain(d) => format!(".{d}"),
                Rule::Ip(IpAddr::V6(a)) if e.port.is_some() => format!("[{a}]"),
                Rule::Ip(a) => a.to_string(),
                Rule::Cidr(a, l) => format!("{a}/{l}"),
            };
            match e.port {
                Some(p) => write!(f, "{host}:{p}")?,
                None => f.write_str(&host)?,
            }
        }
        Ok(())
    }
}

fn parse_entry(raw: &str) -> Result<Entry, &'static str> {
    if raw == "*" {
        return Ok(Entry {
            rule: Rule::All,
            port: None,
        });
    }
    let parse_port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or("the port must be a number from 1 to 65535")
    };
    // Split an optional port: `[v6]:port`, `name:port`, `v4:port`; a bare IPv6 address
    // (more than one colon) has none.
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("unclosed [")?;
        match after {
            "" => (inside, None),
            _ => {
                let p = after.strip_prefix(':').ok_or("expected :port after ]")?;
                (inside, Some(parse_port(p)?))
            }
        }
    } else if raw.matches(':').count() == 1 {
        let (h, p) = raw.split_once(':').ok_or("unreachable")?;
        (h, Some(parse_port(p)?))
    } else {
        (raw, None)
    };
    let rule = if let Some((addr, len)) = host.split_once('/') {
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| "a CIDR range is an IP address, /, a prefix length")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or("the prefix length is out of range")?;
        Rule::Cidr(addr, len)
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        Rule::Ip(ip)
    } else {
        let d = host
            .strip_prefix("*.")
            .or_else(|| host.strip_prefix('.'))
            .unwrap_or(host);
        let d = d.strip_suffix('.').unwrap_or(d).to_ascii_lowercase();
        if d.is_empty()
            || !d
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err("expected *, a domain, an IP address or a CIDR range");
        }
        Rule::Domain(d)
    };
    Ok(Entry { rule, port })
}

fn in_cidr(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    fn prefix_eq(a: &[u8], b: &[u8], len: u8) -> bool {
        let (full, rest) = ((len / 8) as usize, len % 8);
        if a[..full] != b[..full] {
            return false;
        }
        rest == 0 || {
            let mask = 0xffu8 << (8 - rest);
            a[full] & mask == b[full] & mask
        }
    }
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => prefix_eq(&a.octets(), &b.octets(), len),
        (IpAddr::V6(a), IpAddr::V6(b)) => prefix_eq(&a.octets(), &b.octets(), len),
        // An IPv4-mapped IPv6 destination against an IPv4 range.
        (IpAddr::V6(a), IpAddr::V4(b)) => a
            .to_ipv4_mapped()
            .is_some_and(|a| prefix_eq(&a.octets(), &b.octets(), len)),
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    }
}

/// How the agent reaches the outside: an optional proxy and the destinations that bypass
/// it. The default is direct (no proxy). Build it with [`ProxyConfig::from_env`] (the
/// binary) or [`ProxyConfig::from_lookup`] (tests pass a map).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    proxy: Option<ProxyUrl>,
    no_proxy: NoProxy,
}

impl ProxyConfig {
    /// No proxy: every connection is direct.
    pub fn direct() -> ProxyConfig {
        ProxyConfig::default()
    }

    /// `proxy` for every destination but those `no_proxy` lists.
    pub fn new(proxy: Option<ProxyUrl>, no_proxy: NoProxy) -> ProxyConfig {
        ProxyConfig { proxy, no_proxy }
    }

    /// `explicit` (e.g. `--proxy`), else `HTTPS_PROXY` / `https_proxy`, with `NO_PROXY` /
    /// `no_proxy`, from the process environment. Empty values count as unset.
    pub fn from_env(explicit: Option<&str>) -> Result<ProxyConfig, ProxyError> {
        ProxyConfig::from_lookup(explicit, |name| std::env::var(name).ok())
    }

    /// As [`ProxyConfig::from_env`], reading variables through `env`.
    pub fn from_lookup(
        explicit: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ProxyConfig, ProxyError> {
        let first = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find_map(|n| env(n).filter(|v| !v.trim().is_empty()).map(|v| (n, v)))
        };
        let proxy = match explicit.filter(|s| !s.trim().is_empty()) {
            Some(url) => Some(ProxyUrl::parse(url, ORIGIN_EXPLICIT)?),
            None => match first(ENV_HTTPS_PROXY) {
                Some((name, url)) => Some(ProxyUrl::parse(&url, name)?),
                None => None,
            },
        };
        let no_proxy = match first(ENV_NO_PROXY) {
            Some((name, list)) => NoProxy::parse(&list, name)?,
            None => NoProxy::default(),
        };
        Ok(ProxyConfig { proxy, no_proxy })
    }

    /// The proxy, if one is configured (whatever `NO_PROXY` says).
    pub fn proxy(&self) -> Option<&ProxyUrl> {
        self.proxy.as_ref()
    }

    /// The destinations reached directly.
    pub fn no_proxy(&self) -> &NoProxy {
        &self.no_proxy
    }

    /// The proxy to reach `host:port` through, or `None` for a direct connection (no
    /// proxy configured, or `NO_PROXY` matches).
    pub fn proxy_for(&self, host: &str, port: u16) -> Option<&ProxyUrl> {
        self.proxy
            .as_ref()
            .filter(|_| !self.no_proxy.matches(host, port))
    }

    /// A TCP stream to `host:port`: direct when no proxy applies, else tunnelled through
    /// the proxy ([`ProxyUrl::connect`]). All of it within `timeout`. Errors from the
    /// proxy carry a [`ProxyError`] (`e.get_ref()` downcasts to it); none carries the
    /// password.
    pub async fn connect(&self, host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
        if let Some(proxy) = self.proxy_for(host, port) {
            return proxy.connect(host, port, timeout).await;
        }
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match tokio::time::timeout(timeout, TcpStream::connect((bare, port))).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connecting to {}: timed out after {}",
                    authority(bare, port),
                    humantime::format_duration(timeout)
                ),
            )),
        }
    }

    /// The same decision for reqwest: a proxy for `https://` URLs that [`proxy_for`]
    /// sends through it, with the Basic credentials; `None` when no proxy is configured.
    /// The client should also call `no_proxy()` on its builder first, so that reqwest
    /// never reads the environment itself.
    ///
    /// [`proxy_for`]: ProxyConfig::proxy_for
    pub fn reqwest_proxy(&self) -> Option<reqwest::Proxy> {
        let proxy = self.proxy.clone()?;
        let credentials = proxy.credentials.clone();
        let no_proxy = self.no_proxy.clone();
        let plain = proxy.plain();
        let p = reqwest::Proxy::custom(move |url| {
            let host = url.host_str()?;
            let port = url.port_or_known_default()?;
            (url.scheme() == "https" && !no_proxy.matches(host, port)).then(|| plain.clone())
        });
        Some(match credentials {
            Some(c) => p.basic_auth(&c.username, &c.password),
            None => p,
        })
    }
}

impl fmt::Display for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.proxy {
            None => f.write_str("direct"),
            Some(p) if self.no_proxy.is_empty() => write!(f, "{p}"),
            Some(p) => write!(f, "{p} (not for {})", self.no_proxy),
        }
    }
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { proxy, no_proxy } = self;
        f.debug_struct("ProxyConfig")
            .field("proxy", proxy)
            .field("no_proxy", &format_args!("{no_proxy}"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    fn no_proxy(list: &str) -> NoProxy {
        NoProxy::parse(list, "NO_PROXY").expect("valid NO_PROXY")
    }

    fn config(vars: &[(&str, &str)], explicit: Option<&str>) -> Result<ProxyConfig, ProxyError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ProxyConfig::from_lookup(explicit, |k| map.get(k).cloned())
    }

    #[test]
    fn no_proxy_exact_and_suffix_domains() {
        let np = no_proxy("example.com, .corp.internal,*.svc.local");
        assert!(np.matches("example.com", 443));
        assert!(np.matches("EXAMPLE.com.", 443));
        assert!(np.matches("api.example.com", 443));
        assert!(!np.matches("badexample.com", 443));
        assert!(!np.matches("example.com.evil", 443));
        assert!(np.matches("corp.internal", 443));
        assert!(np.matches("a.b.corp.internal", 1));
        assert!(!np.matches("xcorp.internal", 443));
        assert!(np.matches("broker.svc.local", 4433));
        assert!(!np.matches("other.local", 4433));
        // Names are not resolved: a domain entry never matches an IP literal.
        assert!(!no_proxy("localhost").matches("127.0.0.1", 80));
    }

    #[test]
    fn no_proxy_star_matches_everything() {
        let np = no_proxy("*");
        assert!(np.matches("anything.example", 1));
        assert!(np.matches("10.1.2.3", 443));
        assert!(np.matches("[::1]", 443));
        assert!(!no_proxy("").matches("example.com", 443));
        assert!(no_proxy(" , ,").is_empty());
    }

    #[test]
    fn no_proxy_ip_and_cidr() {
        let np = no_proxy("192.0.2.7,10.0.0.0/8,fd00::/8,::1,172.16.0.0/12");
        assert!(np.matches("192.0.2.7", 443));
        assert!(!np.matches("192.0.2.8", 443));
        assert!(np.matches("10.255.0.1", 443));
        assert!(!np.matches("11.0.0.1", 443));
        assert!(np.matches("172.31.255.255", 443));
        assert!(!np.matches("172.32.0.0", 443));
        assert!(np.matches("fd12:3456::1", 443));
        assert!(np.matches("[fd12:3456::1]", 443));
        assert!(!np.matches("fe80::1", 443));
        assert!(np.matches("[::1]", 443));
        assert!(np.matches("::ffff:10.1.1.1", 443));
        assert!(!np.matches("ten.example", 443));
        assert!(no_proxy("0.0.0.0/0").matches("203.0.113.9", 1));
        assert!(no_proxy("10.1.2.3/32").matches("10.1.2.3", 1));
        assert!(!no_proxy("10.1.2.3/32").matches("10.1.2.4", 1));
        assert!(no_proxy("10.1.2.128/25").matches("10.1.2.200", 1));
        assert!(!no_proxy("10.1.2.128/25").matches("10.1.2.100", 1));
    }

    #[test]
    fn no_proxy_ports() {
        let np = no_proxy("example.com:8443,10.0.0.1:443,[::1]:4433,10.9.0.0/16:22");
        assert!(np.matches("example.com", 8443));
        assert!(np.matches("api.example.com", 8443));
        assert!(!np.matches("example.com", 443));
        assert!(np.matches("10.0.0.1", 443));
        assert!(!np.matches("10.0.0.1", 4433));
        assert!(np.matches("::1", 4433));
        assert!(!np.matches("::1", 443));
        assert!(np.matches("10.9.1.1", 22));
        assert!(!np.matches("10.9.1.1", 23));
    }

    #[test]
    fn no_proxy_refuses_garbage_naming_the_entry() {
        for bad in [
            "10.0.0.0/33",
            "example.com:http",
            "example.com:0",
            "[::1",
            "<local>",
            "a b",
            "/8",
        ] {
            let err = NoProxy::parse(&format!("ok.example,{bad}"), "no_proxy").unwrap_err();
            match &err {
                ProxyError::InvalidNoProxy { origin, entry, .. } => {
                    assert_eq!(origin, "no_proxy");
                    assert_eq!(entry, bad);
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn no_proxy_displays_its_entries() {
        assert_eq!(
            no_proxy("*.a.example, 10.0.0.0/8, ::1, [::2]:443, b.example:8443").to_string(),
            ".a.example,10.0.0.0/8,::1,[::2]:443,.b.example:8443"
        );
    }

    #[test]
    fn proxy_url_parses_http_only() {
        let p = ProxyUrl::parse("http://proxy.corp:3128", "--proxy").unwrap();
        assert_eq!(
            (p.host(), p.port(), p.username()),
            ("proxy.corp", 3128, None)
        );
        let p = ProxyUrl::parse("proxy.corp:8080", "--proxy").unwrap();
        assert_eq!((p.host(), p.port()), ("proxy.corp", 8080));
        let p = ProxyUrl::parse("HTTP://[::1]/", "--proxy").unwrap();
        assert_eq!((p.host(), p.port()), ("::1", DEFAULT_PROXY_PORT));
        assert_eq!(p.to_string(), "http://[::1]:80");
        for (url, scheme) in [
            ("https://p:1", "https"),
            ("socks5://u:pw@p:1", "socks5"),
            ("socks5h://p:1", "socks5h"),
        ] {
            assert_eq!(
                ProxyUrl::parse(url, "HTTPS_PROXY"),
                Err(ProxyError::UnsupportedScheme {
                    origin: "HTTPS_PROXY".into(),
                    scheme: scheme.into()
                })
            );
        }
        for bad in [
            "",
            "http://",
            "http://p:99999",
            "http://p:1/path",
            "http://p:1?q",
        ] {
            assert!(
                matches!(
                    ProxyUrl::parse(bad, "--proxy"),
                    Err(ProxyError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn proxy_url_decodes_credentials() {
        let p = ProxyUrl::parse("http://us%40er:p%3As%2Fw%25rd@proxy:3128", "--proxy").unwrap();
        let c = p.credentials.as_ref().unwrap();
        assert_eq!(c.username, "us@er");
        assert_eq!(c.password, "p:s/w%rd");
        assert_eq!(c.header_value(), "Basic dXNAZXI6cDpzL3clcmQ=");
        let p = ProxyUrl::parse("http://user@proxy:3128", "--proxy").unwrap();
        assert_eq!(p.credentials.as_ref().unwrap().password, "");
    }

    #[test]
    fn the_password_never_shows() {
        const SECRET: &str = "Hunter2-s3cret";
        let url = format!("http://alice:{SECRET}@proxy.corp:3128");
        let p = ProxyUrl::parse(&url, "--proxy").unwrap();
        assert_eq!(p.to_string(), "http://alice:***@proxy.corp:3128");
        assert_eq!(
            format!("{p:?}"),
            "ProxyUrl(http://alice:***@proxy.corp:3128)"
        );
        let cfg = config(&[("NO_PROXY", "10.0.0.0/8")], Some(&url)).unwrap();
        let shown = [
            cfg.to_string(),
            format!("{cfg:?}"),
            format!("{cfg:#?}"),
            format!("{:?}", cfg.reqwest_proxy()),
        ];
        for s in &shown {
            assert!(!s.contains(SECRET), "{s}");
        }
        assert_eq!(
            cfg.to_string(),
            "http://alice:***@proxy.corp:3128 (not for 10.0.0.0/8)"
        );
        // Errors about the URL never quote it.
        for bad in [
            format!("socks5://alice:{SECRET}@proxy:1"),
            format!("http://alice:{SECRET}@proxy:99999"),
            format!("http://alice:{SECRET}@proxy:1/x"),
            format!("alice:{SECRET}@proxy:1://x"),
            format!("http://alice:{SECRET}@"),
        ] {
            let e = ProxyUrl::parse(&bad, "HTTPS_PROXY").unwrap_err();
            assert!(!e.to_string().contains(SECRET), "{e}");
            assert!(!format!("{e:?}").contains(SECRET), "{e:?}");
        }
        let e = ProxyError::AuthRequired {
            proxy: p.to_string(),
            status: 407,
            sent_credentials: true,
        };
        assert!(!e.to_string().contains(SECRET));
        assert_eq!(p.sanitize_reason(&format!("bad {SECRET}")), "bad ***");
    }

    #[test]
    fn explicit_wins_then_uppercase() {
        let vars = [
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:2"),
            ("NO_PROXY", "a.example"),
            ("no_proxy", "b.example"),
        ];
        let c = config(&vars, None).unwrap();
        assert_eq!(c.proxy().unwrap().host(), "upper");
        assert!(c.no_proxy().matches("a.example", 1));
        assert!(!c.no_proxy().matches("b.example", 1));
        let c = config(&[vars[1], vars[3]], None).unwrap();
        assert_eq!(c.proxy().unwrap().host(), "lower");
        assert!(c.no_proxy().matches("b.example", 1));
        let c = config(&vars, Some("http://explicit:3")).unwrap();
        assert_eq!(c.proxy().unwrap().host(), "explicit");
        // NO_PROXY applies to an explicit proxy too.
        assert_eq!(c.proxy_for("a.example", 443), None);
        assert_eq!(c.proxy_for("c.example", 443).unwrap().host(), "explicit");
        // Empty values count as unset.
        let c = config(
            &[("HTTPS_PROXY", ""), ("https_proxy", "http://l:2")],
            Some(""),
        )
        .unwrap();
        assert_eq!(c.proxy().unwrap().host(), "l");
        assert_eq!(config(&[], None).unwrap(), ProxyConfig::direct());
        assert_eq!(ProxyConfig::direct().to_string(), "direct");
        assert!(matches!(
            config(&[("HTTPS_PROXY", "https://p:1")], None),
            Err(ProxyError::UnsupportedScheme { origin, .. }) if origin == "HTTPS_PROXY"
        ));
    }

    #[test]
    fn connect_targets_are_checked() {
        assert_eq!(
            target_authority("example.com", 443).unwrap(),
            "example.com:443"
        );
        assert_eq!(target_authority("::1", 443).unwrap(), "[::1]:443");
        assert_eq!(target_authority("[::1]", 443).unwrap(), "[::1]:443");
        for bad in ["", "a b", "evil\r\nX-Injected: 1", "a@b", "[x:y]", "a/b"] {
            assert!(target_authority(bad, 1).is_err(), "{bad:?}");
        }
    }

    /// A scripted peer on a real socket that answers `CONNECT` with `answer` (the parts
    /// of the proxy's behaviour tinyproxy cannot be made to show).
    async fn scripted_proxy(answer: Vec<u8>) -> (ProxyUrl, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut b = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).await.unwrap();
                request.push(b[0]);
            }
            s.write_all(&answer).await.unwrap();
            // Keep the connection open until the client is done.
            let _ = s.read(&mut b).await;
            request
        });
        let url = ProxyUrl::parse(&format!("http://u:pw@127.0.0.1:{port}"), "--proxy").unwrap();
        (url, task)
    }

    #[tokio::test]
    async fn bytes_after_the_head_are_left_in_the_stream() {
        let (proxy, task) =
            scripted_proxy(b"HTTP/1.1 200 Connection established\r\nX-A: b\r\n\r\nhello".to_vec())
                .await;
        let mut s = proxy
            .connect("dest.example", 4433, Duration::from_secs(5))
            .await
            .unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        drop(s);
        let request = String::from_utf8(task.await.unwrap()).unwrap();
        assert!(request
            .starts_with("CONNECT dest.example:4433 HTTP/1.1\r\nHost: dest.example:4433\r\n"));
        assert!(request.contains("Proxy-Authorization: Basic dTpwdw==\r\n"));
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
        while answer.len() <= MAX_RESPONSE_HEAD {
            answer.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        answer.extend_from_slice(b"\r\n");
        let (proxy, _task) = scripted_proxy(answer).await;
        let err = proxy
            .connect("dest.example", 1, Duration::from_secs(5))
            .await
            .unwrap_err();
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<ProxyError>());
        assert!(
            matches!(inner, Some(ProxyError::HeadTooLarge { .. })),
            "{err}"
        );
    }

    #[tokio::test]
    async fn other_statuses_are_refusals_with_the_status() {
        let (proxy, _task) =
            scripted_proxy(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
        let err = proxy
            .connect("dest.example", 22, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(
            err.to_string(),
            "proxy http://u:***@127.0.0.1:".to_owned()
                + &proxy.port().to_string()
                + " refused CONNECT dest.example:22: 403 Forbidden"
        );
        let (proxy, _task) = scripted_proxy(b"SSH-2.0-OpenSSH\r\n\r\n".to_vec()).await;
        let err = proxy
            .connect("dest.example", 22, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }
}

//! What yamux writes, on its way to TLS: coalesced, and without its periodic pings.
//!
//! yamux writes each frame's 12-byte header and its body as two writes, and every write
//! into the TLS stream is a TLS record of its own and a `write` system call: a heartbeat
//! cost two records and two system calls, a `HeartbeatAck` two more. [`MuxIo`] collects
//! what yamux writes between two flushes (yamux flushes once it has written everything it
//! had queued) and hands it to TLS in one write: one record, one system call.
//!
//! yamux (0.13 and later) also sends a `Ping` whenever it is polled and 10 s have passed
//! since its last round-trip measurement, to size stream windows. Heartbeats every 15 s
//! poll it every time, so each heartbeat cost each side a ping and a pong as well: three
//! more records, two more system calls and a task wake-up on the broker, for a figure the
//! broker's control traffic never needs fresh. On the agent's side [`MuxIo`] lets yamux's
//! first ping go out (its answer gives yamux the round-trip time its window tuning uses:
//! what the broker sends the agent, tunnel data among it, may widen its windows) and drops
//! the later ones. yamux waits for the answer to a ping before it sends another and never
//! gives up waiting (`yamux/src/connection/rtt.rs`), so after one dropped ping it simply
//! sends no more and keeps the round-trip time it measured. On the broker's side it drops
//! the first ping too: the agent's answer to it was a TLS record, a `write` and a broker
//! wake-up of its own in every connection's first moments (an `strace` of one connection:
//! the agent's fifth write, after its `Hello`), and without a round-trip time the broker's
//! yamux keeps each stream's receive window at its initial 256 KiB, twice the per-stream
//! window the broker gives QUIC streams. Pings from the peer are still answered.
//! Liveness is not yamux's job here: heartbeats, TCP keep-alive and `TCP_USER_TIMEOUT`
//! (`docs/PROTOCOL.md` §13) notice a dead peer.
//!
//! Until yamux writes its first frame that is not a ping (the agent's `Hello`, the
//! broker's `Welcome`), [`MuxIo`] keeps pings and their answers back instead of sending
//! them at each flush: they go out in the same TLS record and system call as that frame.
//! Both sides ping as soon as the connection starts, so each side's ping and the broker's
//! answer to the agent's had been a record and a system call of their own, two of the
//! broker's four writes per connection; now it writes its handshake flight and one record
//! (the broker's CPU per connect in a storm: see the README). The round-trip time yamux
//! measures with the first ping grows by the broker's time from `Hello` to `Welcome`,
//! which only makes it a little readier to widen a stream's window.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// yamux's frame header: version, type, flags (u16), stream id (u32), length (u32).
const HEADER: usize = 12;
/// Frame type `Data`: `length` body bytes follow the header.
const TYPE_DATA: u8 = 0;
/// Frame type `Ping`.
const TYPE_PING: u8 = 2;
/// Flag `SYN`: on a `Ping`, a request (an answer carries `ACK`).
const FLAG_SYN: u16 = 1;
/// Bytes collected before they go to TLS without waiting for a flush: one TLS record's
/// worth of plaintext.
const COLLECT: usize = 16 * 1024;

/// The I/O under yamux: reads pass through; writes are collected until yamux flushes, and
/// yamux's own pings after the first are dropped.
#[derive(Debug)]
pub(crate) struct MuxIo<T> {
    io: T,
    /// Bytes yamux wrote that `io` has not taken yet, from `sent` on. Holds no allocation
    /// while empty: an idle connection keeps no buffer.
    out: Vec<u8>,
    sent: usize,
    /// The frame header being read from yamux's writes.
    header: [u8; HEADER],
    header_len: usize,
    /// Body bytes of the current `Data` frame still to come.
    body: usize,
    /// yamux sent its first ping.
    pinged: bool,
    /// yamux wrote a frame other than a ping: flushes send from here on.
    started: bool,
    /// Pings dropped (tests).
    dropped: u64,
}

impl<T> MuxIo<T> {
    /// `first_ping`: let yamux's first ping out (the agent's side); the broker's side
    /// sends none (see the module's text).
    pub(crate) fn new(io: T, first_ping: bool) -> MuxIo<T> {
        MuxIo {
            io,
            out: Vec::new(),
            sent: 0,
            header: [0; HEADER],
            header_len: 0,
            body: 0,
            pinged: !first_ping,
            started: false,
            dropped: 0,
        }
    }

    /// yamux's pings dropped so far.
    #[cfg(test)]
    pub(crate) fn pings_dropped(&self) -> u64 {
        self.dropped
    }

    /// Take what yamux wrote in `buf` into `out`, up to [`COLLECT`] bytes; returns how
    /// many bytes of `buf` were taken (all of a frame header is taken before any of it is
    /// kept, so that a ping can be dropped whole).
    fn take(&mut self, buf: &[u8]) -> usize {
        let mut i = 0;
        while i < buf.len() {
            if self.body > 0 {
                let room = COLLECT.saturating_sub(self.out.len());
                if room == 0 {
                    break;
                }
                let n = self.body.min(buf.len() - i).min(room);
                self.out.extend_from_slice(&buf[i..i + n]);
                self.body -= n;
                i += n;
                continue;
            }
            if self.header_len == 0 && self.out.len() + HEADER > COLLECT {
                break;
            }
            let n = (HEADER - self.header_len).min(buf.len() - i);
            self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[i..i + n]);
            self.header_len += n;
            i += n;
            if self.header_len < HEADER {
                break;
            }
            self.header_len = 0;
            let kind = self.header[1];
            self.started |= kind != TYPE_PING;
            let flags = u16::from_be_bytes([self.header[2], self.header[3]]);
            if kind == TYPE_PING && flags & FLAG_SYN != 0 {
                if self.pinged {
                    self.dropped += 1;
                    continue;
                }
                self.pinged = true;
            }
            self.out.extend_from_slice(&self.header);
            if kind == TYPE_DATA {
                let len = u32::from_be_bytes([
                    self.header[8],
                    self.header[9],
                    self.header[10],
                    self.header[11],
                ]);
                self.body = usize::try_from(len).unwrap_or(usize::MAX);
            }
        }
        i
    }
}

impl<T: AsyncWrite + Unpin> MuxIo<T> {
    /// Write everything collected to `io`.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        // Written: give the buffer back (an idle connection holds none).
        self.out = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MuxIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MuxIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let n = this.take(buf);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            // Full: send what was collected first.
            ready!(this.poll_send(cx))?;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Before the first other frame, pings wait for it (see the module's text).
        if this.started {
            ready!(this.poll_send(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A yamux frame header.
    fn header(kind: u8, flags: u16, stream: u32, len: u32) -> Vec<u8> {
        let mut h = vec![0, kind];
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&stream.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    /// Feed `writes` to a `MuxIo`, one `take` at a time as yamux would write them, and
    /// return what it collected.
    fn collect(writes: &[Vec<u8>]) -> (Vec<u8>, u64) {
        let mut io = MuxIo::new((), true);
        for w in writes {
            let mut rest = &w[..];
            while !rest.is_empty() {
                let n = io.take(rest);
                assert!(n > 0, "room below the limit");
                rest = &rest[n..];
            }
        }
        (io.out.clone(), io.pings_dropped())
    }

    #[test]
    fn frames_pass_whole_and_only_the_first_ping_goes_out() {
        let ping = header(TYPE_PING, FLAG_SYN, 0, 7);
        let pong = header(TYPE_PING, 2, 0, 9);
        let data = header(TYPE_DATA, 0, 3, 5);
        let body = b"hello".to_vec();
        // A body that looks like a ping header is data, not a ping.
        let tricky = header(TYPE_DATA, 0, 3, 12);
        let (out, dropped) = collect(&[
            ping.clone(),
            data.clone(),
            body.clone(),
            ping.clone(),
            pong.clone(),
            tricky.clone(),
            ping.clone(),
            ping.clone(),
        ]);
        let mut want = Vec::new();
        for part in [&ping, &data, &body, &pong, &tricky, &ping] {
            want.extend_from_slice(part);
        }
        assert_eq!(out, want);
        assert_eq!(
            dropped, 2,
            "the second ping and the last (the one after `tricky` is its body)"
        );
    }

    #[test]
    fn without_the_first_ping_no_ping_goes_out_and_answers_do() {
        let ping = header(TYPE_PING, FLAG_SYN, 0, 7);
        let pong = header(TYPE_PING, 2, 0, 9);
        let data = header(TYPE_DATA, 0, 2, 0);
        let mut io = MuxIo::new((), false);
        for w in [&ping, &pong, &data, &ping] {
            assert_eq!(io.take(w), HEADER);
        }
        let mut want = pong.clone();
        want.extend_from_slice(&data);
        assert_eq!(io.out, want);
        assert_eq!(io.pings_dropped(), 2);
    }

    #[test]
    fn headers_split_across_writes_are_read_whole() {
        let ping = header(TYPE_PING, FLAG_SYN, 0, 1);
        let data = header(TYPE_DATA, 0, 1, 3);
        let mut bytes = Vec::new();
        for part in [&ping[..], &data[..], b"abc", &ping[..]] {
            bytes.extend_from_slice(part);
        }
        // One byte at a time: every split point.
        let writes: Vec<Vec<u8>> = bytes.iter().map(|b| vec![*b]).collect();
        let (out, dropped) = collect(&writes);
        assert_eq!(out, bytes[..bytes.len() - HEADER].to_vec());
        assert_eq!(dropped, 1);
    }

    #[tokio::test]
    async fn pings_wait_for_the_first_other_frame() {
        use tokio::io::AsyncWriteExt;
        let ping = header(TYPE_PING, FLAG_SYN, 0, 1);
        let pong = header(TYPE_PING, 2, 0, 9);
        let data = header(TYPE_DATA, 0, 1, 3);
        let mut io = MuxIo::new(Vec::new(), true);
        io.write_all(&ping).await.unwrap();
        io.flush().await.unwrap();
        io.write_all(&pong).await.unwrap();
        io.flush().await.unwrap();
        assert!(io.io.is_empty(), "a ping and an answer alone wait");
        io.write_all(&data).await.unwrap();
        io.write_all(b"abc").await.unwrap();
        io.flush().await.unwrap();
        let mut want = Vec::new();
        for part in [&ping[..], &pong[..], &data[..], b"abc"] {
            want.extend_from_slice(part);
        }
        assert_eq!(io.io, want, "all of it in one write");
        // From then on an answer goes at its flush.
        io.write_all(&pong).await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(io.io.len(), want.len() + HEADER);
        // Shutting down sends whatever waits.
        let mut io = MuxIo::new(Vec::new(), true);
        io.write_all(&ping).await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(io.io, ping);
    }

    #[test]
    fn collecting_stops_at_the_limit() {
        let mut io = MuxIo::new((), true);
        let data = header(TYPE_DATA, 0, 1, u32::try_from(COLLECT).unwrap());
        assert_eq!(io.take(&data), HEADER);
        let body = vec![0u8; COLLECT];
        let n = io.take(&body);
        assert_eq!(n, COLLECT - HEADER);
        assert_eq!(io.take(&body[n..]), 0, "full until sent");
    }
}

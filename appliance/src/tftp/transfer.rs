//! One read transfer: option negotiation, then a sliding window of DATA blocks.
//!
//! Lockstep (RFC 1350) is the window-of-one case of RFC 7440. Loss is repaired go-back-N
//! from the oldest unacknowledged block, with exponential backoff, and a retry limit ends a
//! transfer whose client went away. A duplicate ACK never triggers a resend in lockstep mode
//! (that is the Sorcerer's Apprentice storm); with a window it triggers at most one resend
//! per window position, which is how RFC 7440 receivers report a gap. Block numbers roll
//! over from 65535 to 0, as tftp-hpa, curl and iPXE expect.
//!
//! A transfer runs on its own OS thread with a blocking socket, like tftpd-hpa's forked
//! child but without the fork: lockstep TFTP is bound by round-trip latency, and a thread
//! blocked in `recv` is woken by the kernel directly, where an async task pays for an
//! epoll wake-up and often a hop between runtime threads on every block.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::packet::{self, ClientPacket, ErrorCode, Mode, Request};
use super::{TftpError, TftpSettings};
use crate::files::{Contents, OpenFile};

/// Netascii files are converted in memory; bigger ones are refused (boot loaders ask
/// for octet; netascii is for small text files).
const NETASCII_MAX: u64 = 1 << 20;
/// Memory all netascii conversions may hold at once (a conversion holds up to twice its
/// file); past it a netascii request is refused as busy, so many of them at once cannot
/// exhaust memory.
const NETASCII_BUDGET: u64 = 32 << 20;
/// Bytes held by netascii conversions now.
static NETASCII_HELD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A share of [`NETASCII_BUDGET`], given back when the transfer ends.
pub struct NetasciiLease(u64);

impl NetasciiLease {
    fn take(bytes: u64) -> Option<NetasciiLease> {
        use std::sync::atomic::Ordering;
        NETASCII_HELD
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + bytes <= NETASCII_BUDGET).then_some(held + bytes)
            })
            .ok()
            .map(|_| NetasciiLease(bytes))
    }
}

impl Drop for NetasciiLease {
    fn drop(&mut self) {
        NETASCII_HELD.fetch_sub(self.0, std::sync::atomic::Ordering::AcqRel);
    }
}
/// Bytes read from disk at a time for files that are not held in memory.
const CHUNK_BYTES: u64 = 1 << 20;

/// What was agreed with the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Duration,
    /// Options to acknowledge in an OACK, in request order; empty means "send DATA 1".
    pub oack: Vec<(&'static str, String)>,
}

/// Applies RFC 2347/2348/2349/7440 to the requested options. Unknown or invalid options
/// are left out of the OACK (never acknowledge what the client did not send or what we
/// did not accept).
pub fn negotiate(req: &Request, size: u64, settings: &TftpSettings) -> Negotiated {
    let mut n = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout: settings.timeout,
        oack: Vec::new(),
    };
    for (name, value) in &req.options {
        match name.as_str() {
            "blksize" => {
                if let Ok(v) = value.parse::<u32>()
                    && v >= 8
                {
                    n.blksize = v.min(u32::from(settings.max_blksize)).min(65464) as u16;
                    n.oack.push(("blksize", n.blksize.to_string()));
                }
            }
            "windowsize" => {
                if let Ok(v) = value.parse::<u32>()
                    && v >= 1
                {
                    n.windowsize = v.min(u32::from(settings.max_windowsize)).min(65535) as u16;
                    n.oack.push(("windowsize", n.windowsize.to_string()));
                }
            }
            "timeout" => {
                if let Ok(v) = value.parse::<u8>()
                    && v >= 1
                {
                    n.timeout = Duration::from_secs(u64::from(v));
                    n.oack.push(("timeout", v.to_string()));
                }
            }
            // curl rejects `tsize 0` in an OACK; leaving the option out (RFC 2349 allows
            // it) tells every client the same thing: nothing to expect in advance.
            "tsize" if size > 0 => n.oack.push(("tsize", size.to_string())),
            _ => {}
        }
    }
    n
}

/// Converts to netascii: LF becomes CR LF, a bare CR becomes CR NUL (RFC 764).
pub fn to_netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 32);
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            _ => out.push(b),
        }
    }
    out
}

/// The bytes a transfer sends: the file itself, or its netascii conversion (in memory,
/// under a lease of the conversions' budget held for the transfer).
fn prepare(file: OpenFile, mode: Mode) -> Result<(OpenFile, Option<NetasciiLease>), TftpError> {
    match mode {
        Mode::Octet => Ok((file, None)),
        Mode::Netascii => {
            if file.len > NETASCII_MAX {
                return Err(TftpError::NetasciiTooLarge(file.len));
            }
            let lease = NetasciiLease::take(file.len * 2).ok_or(TftpError::Busy(
                "too many netascii transfers at once, try again",
            ))?;
            let raw = file.read_at(0, file.len as usize).map_err(TftpError::Io)?;
            let converted = Bytes::from(to_netascii(&raw));
            Ok((
                OpenFile {
                    len: converted.len() as u64,
                    contents: Contents::Memory(converted),
                    ..file
                },
                Some(lease),
            ))
        }
    }
}

/// Serves blocks of a file, reading on-disk files a chunk at a time.
struct Blocks {
    file: OpenFile,
    blksize: u64,
    chunk_start: u64,
    chunk: Bytes,
}

impl Blocks {
    fn new(file: OpenFile, blksize: u16) -> Self {
        Blocks {
            file,
            blksize: u64::from(blksize),
            chunk_start: 0,
            chunk: Bytes::new(),
        }
    }

    /// Blocks in the transfer: the last one is short, possibly empty.
    fn count(&self) -> u64 {
        self.file.len / self.blksize + 1
    }

    fn get(&mut self, block: u64) -> Result<Bytes, TftpError> {
        let start = (block - 1) * self.blksize;
        let end = (start + self.blksize).min(self.file.len);
        if let Contents::Memory(b) = &self.file.contents {
            return Ok(b.slice(start as usize..end as usize));
        }
        let chunk_end = self.chunk_start + self.chunk.len() as u64;
        if start < self.chunk_start || end > chunk_end {
            // Chunks are whole blocks, so a block never straddles two chunks.
            let span = (CHUNK_BYTES / self.blksize).max(1) * self.blksize;
            self.chunk = self
                .file
                .read_at(start, span as usize)
                .map_err(TftpError::Io)?;
            self.chunk_start = start;
            if (self.chunk.len() as u64) < end - start {
                return Err(TftpError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank during transfer",
                )));
            }
        }
        let off = (start - self.chunk_start) as usize;
        Ok(self.chunk.slice(off..off + (end - start) as usize))
    }
}

/// Counters of one finished transfer.
#[derive(Debug, Default, Clone, Copy)]
pub struct TransferStats {
    pub bytes: u64,
    pub retransmits: u64,
    /// The block size and window agreed on.
    pub blksize: u16,
    pub window: u16,
}

/// Maps a 16-bit ACK onto the absolute block range `lo..=hi` (at most 65536 wide).
fn resolve_ack(n: u16, lo: u64, hi: u64) -> Option<u64> {
    let a = lo + u64::from(n.wrapping_sub(lo as u16));
    (a <= hi).then_some(a)
}

/// A transfer's socket: blocking, connected to the client (its TID), and cancellable.
pub struct TransferSocket {
    sock: UdpSocket,
    cancel: CancellationToken,
    /// Spin this long on a non-blocking receive before blocking (zero: never spin).
    spin: Duration,
}

/// What waiting for a packet gave.
enum Received {
    Packet(usize),
    Timeout,
}

/// How often a blocked receive wakes up to check the deadline and cancellation.
const POLL: Duration = Duration::from_millis(100);

impl TransferSocket {
    /// Binds a fresh port on `local`'s address and connects it to `peer`.
    ///
    /// `spin` trades CPU for latency: lockstep TFTP waits one round trip per block, and on
    /// an otherwise idle machine most of that is the sleeping core waking up. Spinning
    /// briefly catches the ACK while still awake; the server turns it on only while few
    /// transfers run, since under load cores are awake anyway and the CPU is better spent.
    pub fn open(
        local: SocketAddr,
        peer: SocketAddr,
        cancel: CancellationToken,
        spin: Duration,
    ) -> std::io::Result<Self> {
        let sock = UdpSocket::bind(SocketAddr::new(local.ip(), 0))?;
        sock.connect(peer)?;
        sock.set_read_timeout(Some(POLL))?;
        Ok(TransferSocket { sock, cancel, spin })
    }

    fn send(&self, pkt: &[u8]) -> Result<(), TftpError> {
        self.sock.send(pkt).map(|_| ()).map_err(TftpError::Io)
    }

    /// Sends a DATA packet as two iovecs, header and payload: no copy into a packet buffer.
    fn send_data(&self, block: u16, data: &[u8]) -> Result<(), TftpError> {
        let b = block.to_be_bytes();
        let header = [0, packet::OP_DATA as u8, b[0], b[1]];
        let bufs = [std::io::IoSlice::new(&header), std::io::IoSlice::new(data)];
        socket2::SockRef::from(&self.sock)
            .send_vectored(&bufs)
            .map(|_| ())
            .map_err(TftpError::Io)
    }

    /// A non-blocking receive; `None` when nothing is queued.
    fn try_recv(&self, buf: &mut [u8]) -> Option<std::io::Result<usize>> {
        use std::os::fd::AsRawFd;
        // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes for the duration
        // of the call, and the descriptor belongs to `self.sock`, which outlives it.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Some(Ok(n as usize));
        }
        let e = std::io::Error::last_os_error();
        (e.kind() != ErrorKind::WouldBlock).then_some(Err(e))
    }

    fn recv_until(&self, buf: &mut [u8], deadline: Instant) -> Result<Received, TftpError> {
        if !self.spin.is_zero() {
            let spin_until = Instant::now() + self.spin;
            while Instant::now() < spin_until {
                match self.try_recv(buf) {
                    Some(Ok(n)) => return Ok(Received::Packet(n)),
                    Some(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => {
                        return Err(TftpError::ClientGone);
                    }
                    Some(Err(e)) => return Err(TftpError::Io(e)),
                    None => std::hint::spin_loop(),
                }
            }
        }
        loop {
            if self.cancel.is_cancelled() {
                return Err(TftpError::Cancelled);
            }
            if Instant::now() >= deadline {
                return Ok(Received::Timeout);
            }
            match self.sock.recv(buf) {
                Ok(n) => return Ok(Received::Packet(n)),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                // ICMP port unreachable: the client is gone; waiting for it is pointless.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    return Err(TftpError::ClientGone);
                }
                Err(e) => return Err(TftpError::Io(e)),
            }
        }
    }

    /// Sends an ERROR to the client; failures are not worth more than a debug line.
    pub fn send_error(&self, code: ErrorCode, msg: &str) {
        if let Err(e) = self.sock.send(&packet::encode_error(code, msg)) {
            tracing::debug!(error = %e, "could not send TFTP error");
        }
    }
}

/// Runs a read transfer (blocking). Returns when the last block is acknowledged, the
/// client aborts, or retries run out.
/// Resends of the first packet before the client has acknowledged anything: a forged
/// request earns two small packets toward its victim, no more.
pub const HANDSHAKE_RETRIES: u32 = 1;

/// Sends `file` to the client. `acknowledged` is called once, when the client first
/// acknowledges (ACK 0 of the OACK, or of DATA 1): until then the client may be a forged
/// address, so the first packet is resent at most [`HANDSHAKE_RETRIES`] times; its error
/// ends the transfer.
pub fn send_file(
    sock: &TransferSocket,
    req: &Request,
    file: OpenFile,
    settings: &TftpSettings,
    stats: &mut TransferStats,
    acknowledged: &mut dyn FnMut() -> Result<(), TftpError>,
) -> Result<(), TftpError> {
    let handshake_retries = settings.retries.min(HANDSHAKE_RETRIES);
    let mut acked = false;
    let (file, _netascii) = prepare(file, req.mode)?;
    // tsize announces what will be sent, which netascii conversion may have lengthened.
    let neg = negotiate(req, file.len, settings);
    stats.blksize = neg.blksize;
    stats.window = neg.windowsize;
    let mut blocks = Blocks::new(file, neg.blksize);
    let mut buf = vec![0u8; 2048];

    if !neg.oack.is_empty() {
        let oack = packet::encode_oack(&neg.oack);
        let mut wait = neg.timeout;
        let mut tries = 0;
        sock.send(&oack)?;
        let mut deadline = Instant::now() + wait;
        loop {
            match sock.recv_until(&mut buf, deadline)? {
                Received::Packet(n) => match packet::decode_client(&buf[..n]) {
                    Ok(ClientPacket::Ack(0)) => {
                        acknowledged()?;
                        acked = true;
                        break;
                    }
                    Ok(ClientPacket::Error { code, message }) => {
                        // EDK2 and others probe tsize and abort: a normal end, not a failure.
                        return Err(TftpError::ClientAborted { code, message });
                    }
                    _ => continue,
                },
                Received::Timeout => {
                    tries += 1;
                    if tries > handshake_retries {
                        return Err(TftpError::Timeout);
                    }
                    stats.retransmits += 1;
                    wait = (wait * 2).min(settings.max_timeout);
                    sock.send(&oack)?;
                    deadline = Instant::now() + wait;
                }
            }
        }
    }

    let window = u64::from(neg.windowsize);
    let last = blocks.count();
    let mut base: u64 = 1; // oldest unacknowledged block
    let mut next: u64 = 1; // next block to send
    let mut highest_sent: u64 = 0;
    let mut resent_for_dup = false;
    let mut wait = neg.timeout;
    let mut tries = 0;
    let mut deadline = Instant::now() + wait;
    loop {
        while next < base + window && next <= last {
            let data = blocks.get(next)?;
            sock.send_data(next as u16, &data)?;
            if next <= highest_sent {
                stats.retransmits += 1;
            } else {
                highest_sent = next;
                stats.bytes += data.len() as u64;
            }
            next += 1;
        }
        match sock.recv_until(&mut buf, deadline)? {
            Received::Packet(n) => match packet::decode_client(&buf[..n]) {
                Ok(ClientPacket::Ack(ack)) => match resolve_ack(ack, base - 1, next - 1) {
                    Some(a) if a >= base => {
                        if !acked {
                            acknowledged()?;
                            acked = true;
                        }
                        base = a + 1;
                        if base > last {
                            return Ok(());
                        }
                        next = next.max(base);
                        resent_for_dup = false;
                        tries = 0;
                        wait = neg.timeout;
                        deadline = Instant::now() + wait;
                    }
                    Some(_) if window > 1 && !resent_for_dup && next > base => {
                        // The receiver saw a gap and re-acknowledged its last good block.
                        next = base;
                        resent_for_dup = true;
                    }
                    // Duplicate or stale ACK: ignoring it is what prevents the storm.
                    _ => {}
                },
                Ok(ClientPacket::Error { code, message }) => {
                    return Err(TftpError::ClientAborted { code, message });
                }
                Err(_) => {}
            },
            Received::Timeout => {
                tries += 1;
                if tries
                    > if acked {
                        settings.retries
                    } else {
                        handshake_retries
                    }
                {
                    return Err(TftpError::Timeout);
                }
                wait = (wait * 2).min(settings.max_timeout);
                deadline = Instant::now() + wait;
                next = base;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(options: &[(&str, &str)]) -> Request {
        Request {
            write: false,
            filename: "f".into(),
            mode: Mode::Octet,
            options: options
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    #[test]
    fn netascii_conversions_share_a_bounded_budget() {
        let leases: Vec<_> = std::iter::from_fn(|| NetasciiLease::take(NETASCII_MAX * 2))
            .take(100)
            .collect();
        assert_eq!(leases.len() as u64, NETASCII_BUDGET / (NETASCII_MAX * 2));
        assert!(
            NetasciiLease::take(NETASCII_MAX * 2).is_none(),
            "the budget is spent"
        );
        drop(leases);
        assert!(
            NetasciiLease::take(NETASCII_MAX * 2).is_some(),
            "given back"
        );
    }

    #[test]
    fn negotiation_clamps_and_ignores() {
        let s = TftpSettings {
            max_blksize: 1468,
            max_windowsize: 16,
            ..TftpSettings::default()
        };
        let n = negotiate(
            &req(&[
                ("blksize", "65464"),
                ("windowsize", "64"),
                ("tsize", "0"),
                ("msftwindow", "31416"),
            ]),
            1234,
            &s,
        );
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.windowsize, 16);
        assert_eq!(
            n.oack,
            vec![
                ("blksize", "1468".into()),
                ("windowsize", "16".into()),
                ("tsize", "1234".into())
            ]
        );
        let n = negotiate(
            &req(&[("blksize", "4"), ("timeout", "0"), ("windowsize", "x")]),
            1,
            &s,
        );
        assert!(n.oack.is_empty(), "invalid values are not acknowledged");
        assert_eq!((n.blksize, n.windowsize), (512, 1));
    }

    #[test]
    fn ack_resolution_handles_rollover() {
        assert_eq!(resolve_ack(0, 65535, 65540), Some(65536));
        assert_eq!(resolve_ack(65535, 65535, 65540), Some(65535));
        assert_eq!(resolve_ack(10, 65535, 65540), None);
        assert_eq!(resolve_ack(3, 0, 3), Some(3));
    }

    #[test]
    fn netascii_conversion() {
        assert_eq!(to_netascii(b"a\nb\rc"), b"a\r\nb\r\0c".to_vec());
    }
}

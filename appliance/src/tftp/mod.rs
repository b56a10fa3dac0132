//! TFTP server (RFC 1350, 2347, 2348, 2349, 7440): read-only, tokio, root-confined.
//!
//! Why our own engine: the Rust crates evaluated fall short of what boot storms need.
//! `async-tftp` has no windowsize (RFC 7440) and no per-client limits; `tftpd` is
//! thread-per-transfer and blocking; `tftp_server` is unmaintained and lockstep-only. The
//! wire format and the window logic are small (see [`packet`] and [`transfer`]); owning them
//! lets us serve hot files from memory and keep the engine measurable as a library.
//!
//! Requests arrive on the well-known port in a tokio task; each granted transfer then runs
//! on its own OS thread with a blocking socket bound to a fresh port (its TID), connected
//! to the client so stray datagrams from other hosts never reach it (see [`transfer`] for
//! why a thread: lockstep TFTP is round-trip bound). A retransmitted RRQ from a client
//! whose transfer is already running is dropped rather than starting a second one.
//!
//! UDP lets anyone send an RRQ from any source address, so a request alone earns only a
//! **handshake**: the first packet (OACK, or DATA 1 of at most 512 bytes), resent once.
//! Handshakes have their own bound (`max_handshakes`); when it is reached the oldest is
//! dropped, so forged requests can delay nobody whose client answers within a round trip.
//! Only once the client acknowledges does the transfer take a **slot**, counted against
//! the global and per-address caps. A forged source therefore costs a thread for a couple
//! of seconds and two small packets, never a slot or a stream of DATA to a victim.

pub mod config;
pub mod packet;
pub mod transfer;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::files::{FileError, FileRoot};
use crate::limits::LogGate;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::timeline::{Step, Timeline, Who};
use packet::ErrorCode;

/// How long a transfer may spin for an ACK before blocking (see `TransferSocket::open`).
const SPIN: Duration = Duration::from_micros(150);

/// Stack of a transfer thread: the loop needs little, and there may be thousands.
const TRANSFER_STACK: usize = 256 << 10;
/// How long a request from a client whose transfer is still running waits for it to end.
const DUPLICATE_GRACE: Duration = Duration::from_millis(50);
/// Receive buffer asked for on the well-known port, so a boot storm's burst of requests is
/// queued rather than dropped (the kernel caps it at `net.core.rmem_max`).
const LISTEN_RCVBUF: usize = 8 << 20;

/// Tunables of the TFTP engine.
#[derive(Debug, Clone)]
pub struct TftpSettings {
    /// Transfers in progress at once, across all clients.
    pub max_transfers: usize,
    /// Transfers in progress at once from one client address.
    pub max_transfers_per_client: usize,
    /// Requests not yet acknowledged by their client, at once; past it the oldest gives
    /// way.
    pub max_handshakes: usize,
    /// First retransmission timeout (a client's `timeout` option overrides it).
    pub timeout: Duration,
    /// Backoff ceiling.
    pub max_timeout: Duration,
    /// Retransmissions of one packet before giving up.
    pub retries: u32,
    /// Largest block size granted (8..=65464).
    pub max_blksize: u16,
    /// Largest window granted.
    pub max_windowsize: u16,
}

impl Default for TftpSettings {
    fn default() -> Self {
        TftpSettings {
            max_transfers: 2000,
            max_transfers_per_client: 32,
            max_handshakes: 1024,
            timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(4),
            retries: 5,
            max_blksize: 65464,
            max_windowsize: 256,
        }
    }
}

/// Why a transfer ended without delivering the file.
#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("client aborted with error {code}: {message}")]
    ClientAborted { code: u16, message: String },
    #[error("client stopped answering")]
    Timeout,
    #[error("client went away (port unreachable)")]
    ClientGone,
    #[error("cancelled by shutdown")]
    Cancelled,
    #[error("netascii file of {0} bytes is too large to convert")]
    NetasciiTooLarge(u64),
    /// The client acknowledged, but no slot was free for its transfer.
    #[error("{0}")]
    Busy(&'static str),
    /// Newer requests pushed this handshake out before the client acknowledged.
    #[error("handshake dropped for newer requests before the client acknowledged")]
    Evicted,
    #[error("socket error: {0}")]
    Io(#[source] std::io::Error),
}

impl TftpError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TftpError::File(e) => e.kind(),
            TftpError::ClientAborted { .. } => "client_aborted",
            TftpError::Timeout => "timeout",
            TftpError::ClientGone => "client_gone",
            TftpError::Cancelled => "cancelled",
            TftpError::NetasciiTooLarge(_) => "netascii_too_large",
            TftpError::Busy(_) => "busy",
            TftpError::Evicted => "evicted",
            TftpError::Io(_) => "io",
        }
    }
}

/// Transfers and handshakes under way.
#[derive(Default)]
struct Active {
    /// Every client with a transfer or a handshake, by the id of that claim (a second RRQ
    /// from it is a duplicate).
    clients: HashMap<SocketAddr, u64>,
    /// Acknowledged transfers per client address.
    per_ip: HashMap<IpAddr, usize>,
    /// Acknowledged transfers in all.
    transfers: usize,
    /// Handshakes, oldest first: (client, claim id, what ends it).
    handshakes: VecDeque<(SocketAddr, u64, CancellationToken)>,
    next_id: u64,
}

/// One client's claim, released when its thread ends, however it ends: a handshake until
/// the client acknowledges, then a transfer slot.
struct Slot {
    server: Arc<TftpServer>,
    client: SocketAddr,
    id: u64,
    acknowledged: bool,
    /// Fired when a newer request pushes this handshake out.
    evicted: CancellationToken,
}

impl Slot {
    /// The client acknowledged: the handshake becomes a transfer, if a slot is free.
    fn acknowledge(&mut self) -> Result<(), TftpError> {
        let server = Arc::clone(&self.server);
        let mut active = server.active.lock().unwrap_or_else(|p| p.into_inner());
        let Some(at) = active.handshakes.iter().position(|h| h.1 == self.id) else {
            return Err(TftpError::Evicted);
        };
        active.handshakes.remove(at);
        let settings = &server.settings;
        let busy = if active.transfers >= settings.max_transfers {
            Some("server busy, try again")
        } else if active.per_ip.get(&self.client.ip()).copied().unwrap_or(0)
            >= settings.max_transfers_per_client
        {
            Some("too many transfers from this client")
        } else {
            None
        };
        if let Some(why) = busy {
            Metrics::inc(&server.metrics.tftp_requests, "result", "busy");
            return Err(TftpError::Busy(why));
        }
        active.transfers += 1;
        *active.per_ip.entry(self.client.ip()).or_default() += 1;
        self.acknowledged = true;
        server.metrics.tftp_active.inc();
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut active = self.server.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.clients.get(&self.client) == Some(&self.id) {
            active.clients.remove(&self.client);
        }
        if self.acknowledged {
            active.transfers -= 1;
            if let Some(n) = active.per_ip.get_mut(&self.client.ip()) {
                *n -= 1;
                if *n == 0 {
                    active.per_ip.remove(&self.client.ip());
                }
            }
            self.server.metrics.tftp_active.dec();
        } else if let Some(at) = active.handshakes.iter().position(|h| h.1 == self.id) {
            active.handshakes.remove(at);
        }
    }
}

/// A TFTP server over one file root.
pub struct TftpServer {
    settings: TftpSettings,
    files: Arc<FileRoot>,
    metrics: Arc<Metrics>,
    /// Each transfer is a step of its client's boot.
    timeline: Arc<Timeline>,
    active: Mutex<Active>,
    /// Transfers may spin for ACKs while at most this many run.
    spin_below: usize,
}

impl TftpServer {
    /// A server for `files`, recording each transfer into `timeline`.
    pub fn new(
        settings: TftpSettings,
        files: Arc<FileRoot>,
        metrics: Arc<Metrics>,
        timeline: Arc<Timeline>,
    ) -> Arc<Self> {
        let spin_below = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(TftpServer {
            settings,
            files,
            metrics,
            timeline,
            active: Mutex::new(Active::default()),
            spin_below,
        })
    }

    /// Serves requests arriving on `socket` until the shutdown's stop; transfers running
    /// then go on until they end or the drain deadline cuts them.
    pub async fn serve(
        self: Arc<Self>,
        socket: UdpSocket,
        shutdown: Shutdown,
    ) -> std::io::Result<()> {
        let local = socket.local_addr()?;
        if let Err(e) = socket2::SockRef::from(&socket).set_recv_buffer_size(LISTEN_RCVBUF) {
            tracing::debug!(error = %e, "cannot enlarge the TFTP receive buffer");
        }
        tracing::info!(%local, "TFTP listening");
        let mut buf = vec![0u8; packet::MAX_REQUEST_LEN + 1];
        loop {
            let (n, peer) = tokio::select! {
                _ = shutdown.stop().cancelled() => return Ok(()),
                r = socket.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP errors surface here on some kernels; never stop serving for them.
                        tracing::debug!(error = %e, "TFTP receive error");
                        continue;
                    }
                },
            };
            self.handle_request(&socket, local, &buf[..n], peer, &shutdown)
                .await;
        }
    }

    async fn handle_request(
        self: &Arc<Self>,
        socket: &UdpSocket,
        local: SocketAddr,
        raw: &[u8],
        peer: SocketAddr,
        shutdown: &Shutdown,
    ) {
        let req = match packet::decode_request(raw) {
            Ok(r) => r,
            Err(e) => {
                Metrics::inc(&self.metrics.tftp_errors, "kind", e.kind());
                static GATE: LogGate = LogGate::new(10, Duration::from_secs(60));
                if let Some(held_back) = GATE.check() {
                    tracing::warn!(%peer, error = %e, held_back, "malformed TFTP request");
                }
                send_error_to(socket, peer, ErrorCode::IllegalOperation, &e.to_string()).await;
                return;
            }
        };
        if req.write {
            Metrics::inc(&self.metrics.tftp_requests, "result", "write_refused");
            static GATE: LogGate = LogGate::new(10, Duration::from_secs(60));
            if let Some(held_back) = GATE.check() {
                tracing::warn!(%peer, file = %req.filename, held_back, "TFTP write refused");
            }
            send_error_to(
                socket,
                peer,
                ErrorCode::AccessViolation,
                "server is read-only",
            )
            .await;
            return;
        }
        match self.claim(peer, shutdown.abort()) {
            Claim::Granted(slot) => self.start(slot, local, req, shutdown),
            Claim::Duplicate => {
                // Either a retransmitted RRQ (the running transfer answers it by its own
                // retransmission) or a new request racing the end of the previous one, as
                // after an EDK2 tsize probe. Give the old one a moment to finish.
                let server = Arc::clone(self);
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(DUPLICATE_GRACE).await;
                    if shutdown.stopping() {
                        return;
                    }
                    match server.claim(peer, shutdown.abort()) {
                        Claim::Granted(slot) => server.start(slot, local, req, &shutdown),
                        _ => Metrics::inc(&server.metrics.tftp_requests, "result", "duplicate"),
                    }
                });
            }
        }
    }

    /// Runs a granted transfer on its own thread (see [`transfer`] for why), as work in
    /// flight: a stop lets it finish, the drain deadline cuts it.
    fn start(
        self: &Arc<Self>,
        slot: Slot,
        local: SocketAddr,
        req: packet::Request,
        shutdown: &Shutdown,
    ) {
        Metrics::inc(&self.metrics.tftp_requests, "result", "accepted");
        let server = Arc::clone(self);
        // Ends the transfer at the drain deadline, or the handshake when it is evicted (a
        // child of the abort token: see `claim`).
        let cancel = slot.evicted.clone();
        let in_flight = shutdown.token();
        let spawned = std::thread::Builder::new()
            .name("tftp-transfer".into())
            .stack_size(TRANSFER_STACK)
            .spawn(move || {
                let mut slot = slot;
                let _in_flight = in_flight;
                server.run_transfer(local, req, &mut slot, cancel);
            });
        if let Err(e) = spawned {
            // The closure (and with it the slot) is dropped: the client may retry.
            Metrics::inc(&self.metrics.tftp_transfers, "outcome", "no_thread");
            tracing::error!(error = %e, "cannot start a TFTP transfer thread");
        }
    }

    /// A handshake for `peer`'s request; the oldest gives way when they are at their bound.
    fn claim(self: &Arc<Self>, peer: SocketAddr, abort: &CancellationToken) -> Claim {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.clients.contains_key(&peer) {
            return Claim::Duplicate;
        }
        if active.handshakes.len() >= self.settings.max_handshakes.max(1)
            && let Some((old, id, evicted)) = active.handshakes.pop_front()
        {
            evicted.cancel();
            if active.clients.get(&old) == Some(&id) {
                active.clients.remove(&old);
            }
            Metrics::inc(&self.metrics.tftp_requests, "result", "handshake_evicted");
        }
        active.next_id += 1;
        let id = active.next_id;
        let evicted = abort.child_token();
        active.clients.insert(peer, id);
        active.handshakes.push_back((peer, id, evicted.clone()));
        Claim::Granted(Slot {
            server: Arc::clone(self),
            client: peer,
            id,
            acknowledged: false,
            evicted,
        })
    }

    /// One transfer, start to end (blocking: runs on the transfer's thread).
    fn run_transfer(
        &self,
        local: SocketAddr,
        req: packet::Request,
        slot: &mut Slot,
        cancel: CancellationToken,
    ) {
        let peer = slot.client;
        // Spin for ACKs only while transfers are few: one per core at most.
        let few = self
            .active
            .lock()
            .map(|a| a.transfers)
            .unwrap_or(usize::MAX)
            < self.spin_below;
        let spin = if few { SPIN } else { Duration::ZERO };
        let sock = match transfer::TransferSocket::open(local, peer, cancel, spin) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(%peer, error = %e, "cannot open a TFTP transfer socket");
                return;
            }
        };
        let file = match self.files.open(&req.filename) {
            Ok(f) => f,
            Err(e) => {
                let code = match e {
                    FileError::Forbidden(_) => ErrorCode::AccessViolation,
                    FileError::NotFound(_) => ErrorCode::FileNotFound,
                    FileError::Io { .. } => ErrorCode::NotDefined,
                };
                Metrics::inc(&self.metrics.tftp_transfers, "outcome", e.kind());
                static GATE: LogGate = LogGate::new(20, Duration::from_secs(60));
                if let Some(held_back) = GATE.check() {
                    tracing::warn!(%peer, file = %req.filename, error = %e, held_back, "TFTP request refused");
                }
                sock.send_error(code, &e.to_string());
                return;
            }
        };
        let mut stats = transfer::TransferStats::default();
        let started = std::time::Instant::now();
        let result =
            transfer::send_file(&sock, &req, file, &self.settings, &mut stats, &mut || {
                slot.acknowledge()
            });
        self.metrics.tftp_bytes_sent.inc_by(stats.bytes);
        self.metrics.tftp_retransmits.inc_by(stats.retransmits);
        self.timeline.witness(
            Who::Address(peer.ip()),
            Step::Tftp {
                file: req.filename.clone(),
                blksize: stats.blksize,
                window: stats.window,
                bytes: stats.bytes,
                retransmits: stats.retransmits,
                millis: started.elapsed().as_millis() as u64,
                outcome: match &result {
                    Ok(()) => "complete",
                    Err(e) => e.kind(),
                }
                .into(),
            },
        );
        match result {
            Ok(()) => {
                Metrics::inc(&self.metrics.tftp_transfers, "outcome", "complete");
                tracing::debug!(%peer, file = %req.filename, bytes = stats.bytes, retransmits = stats.retransmits, "TFTP transfer complete");
            }
            Err(
                e @ (TftpError::ClientAborted { .. } | TftpError::Cancelled | TftpError::Evicted),
            ) => {
                Metrics::inc(&self.metrics.tftp_transfers, "outcome", e.kind());
                tracing::debug!(%peer, file = %req.filename, error = %e, "TFTP transfer ended early");
            }
            Err(e) => {
                Metrics::inc(&self.metrics.tftp_transfers, "outcome", e.kind());
                static GATE: LogGate = LogGate::new(20, Duration::from_secs(60));
                if let Some(held_back) = GATE.check() {
                    tracing::warn!(%peer, file = %req.filename, error = %e, held_back, "TFTP transfer failed");
                }
                if !matches!(e, TftpError::Timeout | TftpError::ClientGone) {
                    sock.send_error(ErrorCode::NotDefined, &e.to_string());
                }
            }
        }
    }
}

/// Sends an ERROR from the well-known port (malformed, refused and busy requests).
async fn send_error_to(socket: &UdpSocket, peer: SocketAddr, code: ErrorCode, msg: &str) {
    if let Err(e) = socket.send_to(&packet::encode_error(code, msg), peer).await {
        tracing::debug!(%peer, error = %e, "could not send TFTP error");
    }
}

enum Claim {
    Granted(Slot),
    Duplicate,
}

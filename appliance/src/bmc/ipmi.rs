//! IPMI 2.0 over LAN, async: RMCP+ sessions over UDP with retransmission, privilege
//! escalation, and a Close Session on every path; [`IpmiClient`] makes sure a BMC never
//! sees two sessions from us at once and is not hammered.
//!
//! The wire format and crypto live in [`super::rmcp`]; this file owns the exchange:
//! Open Session → RAKP 1/2 → RAKP 3/4 → Set Session Privilege Level → commands → Close
//! Session. Credentials stay here: a plugin only ever sees raw `netfn/cmd/data`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::{Instant, timeout};

use super::PowerFailure;
use super::rmcp::{self, Handshake, Keys, Payload, Suite, WireError};

/// IPMI network functions used by the host.
pub mod netfn {
    pub const CHASSIS: u8 = 0x00;
    pub const APP: u8 = 0x06;
}

/// How to reach and log in to one BMC.
#[derive(Clone)]
pub struct IpmiTarget {
    pub addr: SocketAddr,
    pub user: String,
    pub password: String,
    /// Cipher suites to try, in order (17 first where the BMC has it, then 3).
    pub suites: Vec<Suite>,
    /// Wait for one answer before resending.
    pub timeout: Duration,
    /// Resends of one packet before giving up.
    pub retries: u32,
}

impl std::fmt::Debug for IpmiTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never reaches a log.
        f.debug_struct("IpmiTarget")
            .field("addr", &self.addr)
            .field("user", &self.user)
            .field("suites", &self.suites)
            .finish_non_exhaustive()
    }
}

impl IpmiTarget {
    /// A target with the usual settings: suites 17 then 3, 1 s per try, 3 resends.
    pub fn new(addr: SocketAddr, user: &str, password: &str) -> Self {
        IpmiTarget {
            addr,
            user: user.into(),
            password: password.into(),
            suites: vec![Suite::Seventeen, Suite::Three],
            timeout: Duration::from_secs(1),
            retries: 3,
        }
    }
}

/// Why an IPMI exchange failed (each is a metric label and a clear log line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpmiError {
    #[error("BMC {0} did not answer (no reply after resending)")]
    Timeout(SocketAddr),
    #[error("BMC {0} refused the connection (nothing listens there)")]
    Unreachable(SocketAddr),
    #[error("BMC {addr} rejected the credentials of user {user:?}: {why}")]
    Credentials {
        addr: SocketAddr,
        user: String,
        why: String,
    },
    #[error("BMC {addr} supports none of cipher suites {suites:?}")]
    NoSuite { addr: SocketAddr, suites: Vec<u8> },
    #[error("BMC {addr} refused the session: RMCP+ status {status:#04x} ({meaning})")]
    Session {
        addr: SocketAddr,
        status: u8,
        meaning: &'static str,
    },
    #[error("BMC {addr}: command {netfn:#04x}/{cmd:#04x} failed with completion code {code:#04x}")]
    Completion {
        addr: SocketAddr,
        netfn: u8,
        cmd: u8,
        code: u8,
    },
    #[error("BMC {addr}: {why}")]
    Protocol { addr: SocketAddr, why: String },
    #[error("BMC {addr}: {why}")]
    Io { addr: SocketAddr, why: String },
}

impl IpmiError {
    /// What kind of failure this is.
    pub fn kind(&self) -> PowerFailure {
        match self {
            IpmiError::Timeout(_) => PowerFailure::Timeout,
            IpmiError::Unreachable(_) => PowerFailure::Unreachable,
            IpmiError::Credentials { .. } => PowerFailure::Credentials,
            IpmiError::NoSuite { .. } => PowerFailure::CipherSuite,
            IpmiError::Session { .. } => PowerFailure::Session,
            IpmiError::Completion { .. } => PowerFailure::CompletionCode,
            IpmiError::Protocol { .. } => PowerFailure::Protocol,
            IpmiError::Io { .. } => PowerFailure::Io,
        }
    }
}

fn status_meaning(s: u8) -> &'static str {
    match s {
        0x01 => "insufficient resources to create a session",
        0x02 => "invalid session id",
        0x04 => "invalid authentication algorithm",
        0x05 => "invalid integrity algorithm",
        0x09 => "invalid role",
        0x0A => "unauthorized role or privilege level",
        0x0B => "insufficient resources for the requested role",
        0x0C => "invalid name length",
        0x0D => "unauthorized name",
        0x0E => "unauthorized GUID",
        0x0F => "invalid integrity check value",
        0x10 => "invalid confidentiality algorithm",
        0x11 => "no cipher suite match",
        0x12 => "illegal or unrecognized parameter",
        _ => "unknown status",
    }
}

/// An open, authenticated RMCP+ session with administrator privilege.
pub struct Session {
    sock: UdpSocket,
    target: IpmiTarget,
    keys: Keys,
    bmc_id: u32,
    seq: u32,
    rq_seq: u8,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("bmc", &self.target.addr)
            .field("suite", &self.keys.suite)
            .finish_non_exhaustive()
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the operating system's random number generator failed");
    u32::from_le_bytes(b) | 1
}

/// Sends `packet` and waits for an answer `accept` takes, resending on silence.
async fn exchange<T>(
    sock: &UdpSocket,
    target: &IpmiTarget,
    mut packet: impl FnMut() -> Vec<u8>,
    mut accept: impl FnMut(&[u8]) -> Option<T>,
) -> Result<T, IpmiError> {
    let addr = target.addr;
    let mut buf = vec![0u8; 1024];
    for _ in 0..=target.retries {
        let p = packet();
        match sock.send(&p).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(IpmiError::Unreachable(addr));
            }
            Err(e) => {
                return Err(IpmiError::Io {
                    addr,
                    why: e.to_string(),
                });
            }
        }
        let deadline = Instant::now() + target.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, sock.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err(IpmiError::Unreachable(addr));
                }
                Ok(Err(e)) => {
                    return Err(IpmiError::Io {
                        addr,
                        why: e.to_string(),
                    });
                }
                // Stray or stale datagrams (an answer to a resent packet) are skipped.
                Ok(Ok(n)) => {
                    if let Some(v) = accept(&buf[..n]) {
                        return Ok(v);
                    }
                }
            }
        }
    }
    Err(IpmiError::Timeout(addr))
}

/// One step of the session handshake: send `payload` as `kind`, await the `answer`
/// carrying our message `tag`.
async fn step(
    sock: &UdpSocket,
    target: &IpmiTarget,
    kind: Payload,
    payload: &[u8],
    answer: Payload,
    tag: u8,
) -> Result<Vec<u8>, IpmiError> {
    let packet = rmcp::frame(kind, 0, 0, payload, None);
    exchange(
        sock,
        target,
        || packet.clone(),
        |p| {
            rmcp::unframe(p, None)
                .ok()
                .filter(|r| r.payload_type == answer && r.payload.first() == Some(&tag))
                .map(|r| r.payload)
        },
    )
    .await
}

impl Session {
    /// Opens a session, trying the target's suites in order.
    pub async fn open(target: &IpmiTarget) -> Result<Session, IpmiError> {
        let addr = target.addr;
        let io = |e: std::io::Error| IpmiError::Io {
            addr,
            why: e.to_string(),
        };
        let local: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal address")
        } else {
            "[::]:0".parse().expect("literal address")
        };
        let sock = UdpSocket::bind(local).await.map_err(io)?;
        sock.connect(addr).await.map_err(io)?;
        let mut refused = Vec::new();
        for &suite in &target.suites {
            match Self::handshake(&sock, target, suite).await {
                Ok((keys, bmc_id)) => {
                    let mut s = Session {
                        sock,
                        target: target.clone(),
                        keys,
                        bmc_id,
                        seq: 0,
                        rq_seq: 0,
                    };
                    // Chassis commands need more than the default user privilege.
                    if let Err(e) = s.raw(netfn::APP, 0x3B, &[0x04]).await {
                        let _ = s.close().await;
                        return Err(e);
                    }
                    return Ok(s);
                }
                // Algorithms the BMC does not have: try the next suite.
                Err(IpmiError::Session {
                    status: 0x04 | 0x05 | 0x10 | 0x11,
                    ..
                }) => {
                    refused.push(suite.id());
                }
                Err(e) => return Err(e),
            }
        }
        Err(IpmiError::NoSuite {
            addr,
            suites: refused,
        })
    }

    async fn handshake(
        sock: &UdpSocket,
        target: &IpmiTarget,
        suite: Suite,
    ) -> Result<(Keys, u32), IpmiError> {
        let addr = target.addr;
        let protocol = |why: &str| IpmiError::Protocol {
            addr,
            why: why.into(),
        };
        let console_id = random_u32();
        let tag = (console_id & 0x3F) as u8;
        let resp = step(
            sock,
            target,
            Payload::OpenSessionRequest,
            &rmcp::open_session_request(tag, console_id, suite),
            Payload::OpenSessionResponse,
            tag,
        )
        .await?;
        if resp.len() < 2 {
            return Err(protocol("short Open Session Response"));
        }
        if resp[1] != 0 {
            return Err(IpmiError::Session {
                addr,
                status: resp[1],
                meaning: status_meaning(resp[1]),
            });
        }
        if resp.len() < 12 {
            return Err(protocol("short Open Session Response"));
        }
        let bmc_id = u32::from_le_bytes([resp[8], resp[9], resp[10], resp[11]]);
        let mut console_random = [0u8; 16];
        getrandom::fill(&mut console_random)
            .expect("the operating system's random number generator failed");
        let mut h = Handshake {
            suite,
            console_id,
            bmc_id,
            console_random,
            bmc_random: [0; 16],
            bmc_guid: [0; 16],
            // Administrator, looked up by name only.
            role: 0x14,
            user: target.user.as_bytes().iter().copied().take(16).collect(),
        };
        let r2 = step(
            sock,
            target,
            Payload::Rakp1,
            &rmcp::rakp1(tag, &h),
            Payload::Rakp2,
            tag,
        )
        .await?;
        let credentials = |why: &str| IpmiError::Credentials {
            addr,
            user: target.user.clone(),
            why: why.into(),
        };
        match r2.get(1) {
            Some(0) => {}
            Some(0x0D) => return Err(credentials("unknown user")),
            Some(&s) => {
                return Err(IpmiError::Session {
                    addr,
                    status: s,
                    meaning: status_meaning(s),
                });
            }
            None => return Err(protocol("empty RAKP 2")),
        }
        if r2.len() < 40 {
            return Err(protocol("short RAKP 2"));
        }
        h.bmc_random.copy_from_slice(&r2[8..24]);
        h.bmc_guid.copy_from_slice(&r2[24..40]);
        let password = target.password.as_bytes();
        if !h.bmc_proof_ok(password, &r2[40..]) {
            // The BMC keyed its proof with another password than ours.
            return Err(credentials("wrong password"));
        }
        let r4 = step(
            sock,
            target,
            Payload::Rakp3,
            &rmcp::rakp3(tag, &h, password),
            Payload::Rakp4,
            tag,
        )
        .await?;
        match r4.get(1) {
            Some(0) => {}
            Some(&s) if s == 0x0F || s == 0x0D => return Err(credentials(status_meaning(s))),
            Some(&s) => {
                return Err(IpmiError::Session {
                    addr,
                    status: s,
                    meaning: status_meaning(s),
                });
            }
            None => return Err(protocol("empty RAKP 4")),
        }
        let (sik, keys) = h.keys(password);
        if r4.len() < 8 || !h.rakp4_ok(&sik, &r4[8..]) {
            return Err(protocol("RAKP 4 integrity check failed"));
        }
        Ok((keys, bmc_id))
    }

    /// One command; returns its data when the completion code is 0.
    pub async fn raw(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Result<Vec<u8>, IpmiError> {
        let (code, out) = self.raw_with_code(netfn, cmd, data).await?;
        if code != 0 {
            return Err(IpmiError::Completion {
                addr: self.target.addr,
                netfn,
                cmd,
                code,
            });
        }
        Ok(out)
    }

    /// One command; returns the completion code and data, whatever the code.
    pub async fn raw_with_code(
        &mut self,
        netfn: u8,
        cmd: u8,
        data: &[u8],
    ) -> Result<(u8, Vec<u8>), IpmiError> {
        self.rq_seq = (self.rq_seq + 1) & 0x3F;
        let rq_seq = self.rq_seq;
        let msg = rmcp::ipmi_request(netfn, cmd, rq_seq, data);
        let (keys, bmc_id) = (self.keys.clone(), self.bmc_id);
        let seq = &mut self.seq;
        let target = self.target.clone();
        exchange(
            &self.sock,
            &target,
            || {
                // A resend is a new packet to the BMC's replay window: next sequence.
                *seq = seq.wrapping_add(1).max(1);
                rmcp::frame(Payload::Ipmi, bmc_id, *seq, &msg, Some(&keys))
            },
            |p| match rmcp::unframe(p, Some(&keys)) {
                Ok(r) if r.payload_type == Payload::Ipmi => rmcp::ipmi_response(&r.payload)
                    .ok()
                    .filter(|(nf, s, c, _, _)| *nf == (netfn | 1) && *s == rq_seq && *c == cmd)
                    .map(|(_, _, _, code, data)| (code, data)),
                Ok(_) => None,
                Err(WireError::Integrity) => {
                    tracing::warn!(bmc = %target.addr, "dropped a packet that failed its integrity check");
                    None
                }
                Err(_) => None,
            },
        )
        .await
    }

    /// Closes the session (the BMC frees its slot at once instead of at its timeout).
    pub async fn close(mut self) -> Result<(), IpmiError> {
        let id = self.bmc_id.to_le_bytes();
        self.raw(netfn::APP, 0x3C, &id).await.map(|_| ())
    }

    /// The BMC this session is with.
    pub fn addr(&self) -> SocketAddr {
        self.target.addr
    }

    /// The cipher suite in use.
    pub fn suite(&self) -> Suite {
        self.keys.suite
    }
}

/// Sessions to many BMCs, one at a time per BMC, at a bounded rate.
#[derive(Debug, Default)]
pub struct IpmiClient {
    locks: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<Instant>>>>>,
}

/// Pause between the end of one session to a BMC and the start of the next.
const MIN_GAP: Duration = Duration::from_millis(50);

impl IpmiClient {
    /// Waits for this BMC's turn: until every earlier holder is done and the gap since
    /// the last session has passed. The turn ends when the returned guard drops.
    pub async fn turn(&self, addr: SocketAddr) -> IpmiTurn {
        let lock = Arc::clone(
            self.locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(addr)
                .or_default(),
        );
        let last = lock.lock_owned().await;
        if let Some(t) = *last {
            let since = t.elapsed();
            if since < MIN_GAP {
                tokio::time::sleep(MIN_GAP - since).await;
            }
        }
        IpmiTurn { last }
    }

    /// Runs `f` inside a session to `target` and closes the session afterwards, whatever
    /// `f` returned. Other callers for the same BMC wait their turn.
    pub async fn with_session<T>(
        &self,
        target: &IpmiTarget,
        f: impl AsyncFnOnce(&mut Session) -> Result<T, IpmiError>,
    ) -> Result<T, IpmiError> {
        let _turn = self.turn(target.addr).await;
        let mut s = Session::open(target).await?;
        let r = f(&mut s).await;
        let closed = s.close().await;
        match (r, closed) {
            (Ok(v), Ok(())) => Ok(v),
            (Ok(v), Err(e)) => {
                tracing::warn!(bmc = %target.addr, error = %e, "could not close the IPMI session");
                Ok(v)
            }
            (Err(e), _) => Err(e),
        }
    }
}

/// One holder's turn at a BMC (see [`IpmiClient::turn`]); its end is remembered for the gap.
pub struct IpmiTurn {
    last: tokio::sync::OwnedMutexGuard<Option<Instant>>,
}

impl Drop for IpmiTurn {
    fn drop(&mut self) {
        *self.last = Some(Instant::now());
    }
}

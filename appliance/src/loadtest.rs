//! `arges loadtest`: a boot storm. N simulated machines do what real firmware and the
//! discovery agent do, against a running appliance: TFTP fetch of the iPXE binary (as iPXE
//! asks: blksize 1432, tsize, lockstep, retransmitting on loss), `/boot.ipxe`, the kernel
//! and initrds the script names over HTTP, then registration. Reports machines per second,
//! time to "registered" (p50, p99), errors by kind and TFTP retransmits.
//!
//! Bounded in count (`--machines`), concurrency and time (`--max-seconds`), and it refuses
//! any target that is not a loopback address: it is a load generator for this machine only.
//! Each simulated machine speaks from its own loopback address (127.1.x.y; all of 127/8 is
//! loopback on Linux), as real machines each have their own, so per-client limits apply
//! per machine as in a real rack.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use crate::tftp::packet::{self, ClientPacket, encode_ack, encode_rrq};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadtestOptions {
    pub http: SocketAddr,
    pub tftp: SocketAddr,
    pub token: String,
    pub tftp_file: String,
    pub machines: u32,
    pub concurrency: usize,
    pub max_duration: Duration,
    /// Distinguishes this storm's machines from earlier ones (random by default).
    pub run_id: u16,
}

/// A random run id.
pub fn random_run_id() -> u16 {
    let mut b = [0u8; 2];
    // Any value works; a failing RNG only makes runs share machine names.
    let _ = getrandom::fill(&mut b);
    u16::from_le_bytes(b)
}

/// What happened.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LoadtestReport {
    pub machines: u32,
    pub registered: u32,
    pub failed: u32,
    pub seconds: f64,
    pub machines_per_second: f64,
    pub p50_seconds: f64,
    pub p99_seconds: f64,
    pub max_seconds: f64,
    pub tftp_retransmits: u64,
    pub bytes: u64,
    pub errors: BTreeMap<String, u32>,
}

#[derive(Debug, thiserror::Error)]
enum MachineError {
    #[error("tftp: {0}")]
    Tftp(String),
    #[error("http: {0}")]
    Http(String),
    #[error("boot script: {0}")]
    Script(String),
}

impl MachineError {
    fn kind(&self) -> &'static str {
        match self {
            MachineError::Tftp(_) => "tftp",
            MachineError::Http(_) => "http",
            MachineError::Script(_) => "script",
        }
    }
}

/// Runs the storm.
pub async fn run(opts: LoadtestOptions) -> anyhow::Result<LoadtestReport> {
    for addr in [opts.http, opts.tftp] {
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "refusing to load {addr}: the load test only targets loopback addresses"
        );
    }
    let started = Instant::now();
    let deadline = started + opts.max_duration;
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let retransmits = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.machines {
        let (opts, permits, retransmits, bytes) = (
            opts.clone(),
            Arc::clone(&permits),
            Arc::clone(&retransmits),
            Arc::clone(&bytes),
        );
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.ok();
            let t0 = Instant::now();
            let left = deadline.saturating_duration_since(t0);
            let r = match tokio::time::timeout(left, machine(&opts, i, &retransmits, &bytes)).await
            {
                Ok(r) => r,
                Err(_) => Err(MachineError::Http("the load test's time ran out".into())),
            };
            (t0.elapsed(), r)
        });
    }
    let mut report = LoadtestReport {
        machines: opts.machines,
        ..Default::default()
    };
    let mut times = Vec::new();
    let mut last_progress = Instant::now();
    let mut done = 0u32;
    while let Some(res) = tasks.join_next().await {
        done += 1;
        match res {
            Ok((took, Ok(()))) => {
                report.registered += 1;
                times.push(took.as_secs_f64());
            }
            Ok((_, Err(e))) => {
                report.failed += 1;
                *report.errors.entry(e.kind().to_string()).or_default() += 1;
                if report.failed <= 5 {
                    tracing::warn!(error = %e, "machine failed");
                }
            }
            Err(e) => {
                report.failed += 1;
                *report.errors.entry("task".into()).or_default() += 1;
                tracing::warn!(error = %e, "machine task failed");
            }
        }
        if last_progress.elapsed() > Duration::from_secs(2) {
            last_progress = Instant::now();
            tracing::info!(
                done,
                of = opts.machines,
                registered = report.registered,
                failed = report.failed,
                "boot storm progress"
            );
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.machines_per_second = f64::from(report.registered) / report.seconds.max(1e-9);
    times.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        times
            .get(((times.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    report.p50_seconds = pct(0.50);
    report.p99_seconds = pct(0.99);
    report.max_seconds = times.last().copied().unwrap_or_default();
    report.tftp_retransmits = retransmits.load(Ordering::Relaxed);
    report.bytes = bytes.load(Ordering::Relaxed);
    Ok(report)
}

/// The loopback address machine `i` speaks from (IPv6 targets: `::1` for all).
fn machine_ip(i: u32, target: SocketAddr) -> std::net::IpAddr {
    if target.is_ipv6() {
        return std::net::Ipv6Addr::LOCALHOST.into();
    }
    std::net::Ipv4Addr::new(
        127,
        1 + (i / 62_500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250 + 2) as u8,
    )
    .into()
}

async fn machine(
    opts: &LoadtestOptions,
    i: u32,
    retransmits: &AtomicU64,
    bytes: &AtomicU64,
) -> Result<(), MachineError> {
    // A run id keeps storms against the same appliance from reusing each other's machines.
    let run = opts.run_id;
    let uuid = format!("10adbeef-{run:04x}-4000-8000-{i:012x}");
    let mac = format!(
        "52:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        run & 0xff,
        run >> 8,
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    );
    let got = tftp_fetch(
        machine_ip(i, opts.tftp),
        opts.tftp,
        &opts.tftp_file,
        retransmits,
    )
    .await?;
    bytes.fetch_add(got, Ordering::Relaxed);
    let mut http = HttpConn::connect(machine_ip(i, opts.http), opts.http).await?;
    let (status, script) = http
        .get(
            &format!("/boot.ipxe?uuid={uuid}&mac={mac}&arch=x86_64"),
            None,
        )
        .await?;
    if status != 200 {
        return Err(MachineError::Http(format!("/boot.ipxe answered {status}")));
    }
    let script = String::from_utf8_lossy(&script).into_owned();
    let urls: Vec<String> = script
        .lines()
        .filter(|l| l.starts_with("kernel ") || l.starts_with("initrd "))
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("http://"))
                .map(String::from)
        })
        .collect();
    if urls.is_empty() {
        return Err(MachineError::Script(format!("no kernel in {script:?}")));
    }
    for url in urls {
        let path = url
            .splitn(4, '/')
            .nth(3)
            .map(|p| format!("/{p}"))
            .ok_or_else(|| MachineError::Script(url.clone()))?;
        let path = percent_encoding::percent_decode_str(&path)
            .decode_utf8_lossy()
            .into_owned();
        let mut counted = 0u64;
        let (status, _) = http.get(&path, Some(&mut counted)).await?;
        if status != 200 {
            return Err(MachineError::Http(format!("{path} answered {status}")));
        }
        bytes.fetch_add(counted, Ordering::Relaxed);
    }
    let body = serde_json::json!({
        "uuid": uuid, "mode": "discover",
        "hardware": {"vendor": "QEMU", "product": "Standard PC", "nics": [{"name": "eth0", "mac": mac}], "memory_bytes": 1u64 << 31},
    });
    let (status, answer) = http
        .post(
            "/api/v1/register",
            &opts.token,
            serde_json::to_vec(&body).unwrap_or_default(),
        )
        .await?;
    if status != 200 {
        return Err(MachineError::Http(format!(
            "registration answered {status}: {}",
            String::from_utf8_lossy(&answer)
        )));
    }
    Ok(())
}

/// A lockstep TFTP read as iPXE does it. Returns the bytes received.
async fn tftp_fetch(
    from: std::net::IpAddr,
    server: SocketAddr,
    file: &str,
    retransmits: &AtomicU64,
) -> Result<u64, MachineError> {
    let err = |m: String| MachineError::Tftp(m);
    let sock = UdpSocket::bind(SocketAddr::new(from, 0))
        .await
        .map_err(|e| err(e.to_string()))?;
    let rrq = encode_rrq(file, "octet", &[("blksize", "1432"), ("tsize", "0")]);
    let mut last_sent = rrq.clone();
    let mut dest = server;
    sock.send_to(&rrq, dest)
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut buf = vec![0u8; 2048];
    let (mut expect, mut got, mut tries) = (1u16, 0u64, 0u32);
    let mut blksize = 512usize;
    let mut tid: Option<SocketAddr> = None;
    loop {
        let (n, from) =
            match tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await {
                Ok(r) => r.map_err(|e| err(e.to_string()))?,
                Err(_) => {
                    tries += 1;
                    if tries > 8 {
                        return Err(err(format!(
                            "no answer after {tries} tries at block {expect}"
                        )));
                    }
                    retransmits.fetch_add(1, Ordering::Relaxed);
                    sock.send_to(&last_sent, dest)
                        .await
                        .map_err(|e| err(e.to_string()))?;
                    continue;
                }
            };
        if tid.is_some_and(|t| t != from) {
            continue;
        }
        tid = Some(from);
        dest = from;
        let pkt = &buf[..n];
        match pkt.get(1).copied().map(u16::from) {
            Some(packet::OP_OACK) => {
                let fields: Vec<&[u8]> = pkt[2..].split(|b| *b == 0).collect();
                for pair in fields.chunks(2) {
                    if let [k, v] = pair
                        && k.eq_ignore_ascii_case(b"blksize")
                    {
                        blksize = std::str::from_utf8(v)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(512);
                    }
                }
                last_sent = encode_ack(0).to_vec();
            }
            Some(packet::OP_DATA) if n >= 4 => {
                let block = u16::from_be_bytes([pkt[2], pkt[3]]);
                if block == expect {
                    got += (n - 4) as u64;
                    tries = 0;
                    last_sent = encode_ack(block).to_vec();
                    sock.send_to(&last_sent, dest)
                        .await
                        .map_err(|e| err(e.to_string()))?;
                    if n - 4 < blksize {
                        return Ok(got);
                    }
                    expect = expect.wrapping_add(1);
                    continue;
                }
                // A duplicate: the server did not get our ACK; answer it again.
                last_sent = encode_ack(expect.wrapping_sub(1)).to_vec();
            }
            _ => {
                if let Ok(ClientPacket::Error { code, message }) = packet::decode_client(pkt) {
                    return Err(err(format!("error {code}: {message}")));
                }
                continue;
            }
        }
        sock.send_to(&last_sent, dest)
            .await
            .map_err(|e| err(e.to_string()))?;
    }
}

/// One keep-alive HTTP/1.1 connection, as iPXE uses for a script and its files.
struct HttpConn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl HttpConn {
    async fn connect(from: std::net::IpAddr, addr: SocketAddr) -> Result<Self, MachineError> {
        let http = |e: std::io::Error| MachineError::Http(e.to_string());
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(http)?;
        socket.bind(SocketAddr::new(from, 0)).map_err(http)?;
        let stream = socket.connect(addr).await.map_err(http)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| MachineError::Http(e.to_string()))?;
        tokio::spawn(conn);
        Ok(HttpConn {
            sender,
            host: addr.to_string(),
        })
    }

    async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
        count_only: Option<&mut u64>,
    ) -> Result<(u16, Bytes), MachineError> {
        let http = |e: String| MachineError::Http(e);
        self.sender.ready().await.map_err(|e| http(e.to_string()))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        match count_only {
            Some(n) => {
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.map_err(|e| http(e.to_string()))?.into_data() {
                        *n += data.len() as u64;
                    }
                }
                Ok((status, Bytes::new()))
            }
            None => Ok((
                status,
                body.collect()
                    .await
                    .map_err(|e| http(e.to_string()))?
                    .to_bytes(),
            )),
        }
    }

    async fn get(
        &mut self,
        path: &str,
        count_only: Option<&mut u64>,
    ) -> Result<(u16, Bytes), MachineError> {
        let req = Request::get(path)
            .header(hyper::header::HOST, &self.host)
            .body(Full::new(Bytes::new()))
            .map_err(|e| MachineError::Http(e.to_string()))?;
        self.send(req, count_only).await
    }

    async fn post(
        &mut self,
        path: &str,
        token: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), MachineError> {
        let req = Request::post(path)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| MachineError::Http(e.to_string()))?;
        self.send(req, None).await
    }
}

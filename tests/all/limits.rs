//! Abuse limits at the HTTP edge, tried as a hostile neighbour on the provisioning
//! network would: a slowloris of hundreds of connections and a flood of registrations
//! while a machine boots over TFTP and HTTP, stalled bodies and readers, and more
//! registered-but-unaccepted machines than the cap. Every flood is bounded in count and
//! time, and sent to loopback.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use test_support::{Appliance, REG_TOKEN, Registration, curl, random_file, raw_http};

/// A TCP connection to `to` from loopback address `from`.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(IpAddr::V4(from), 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

/// Whether the server closed `s` (EOF or reset) within `secs`.
fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

const LIMITS: &str = "http.max_connections = 512\nhttp.max_connections_per_source = 64\nhttp.header_secs = 3\nhttp.idle_secs = 4\nhttp.body_secs = 2\nhttp.registrations_per_source_per_sec = 0.5\nhttp.registrations_per_source_burst = 10\n";

#[test]
fn a_slowloris_and_a_registration_flood_do_not_stop_a_machine_booting() {
    let a = Appliance::start_in(Appliance::prepare_with(LIMITS, ""), &[]);
    let kernel = random_file(&a.data().join("assets/talos/vmlinuz"), 8 << 20, 3);
    let ipxe = random_file(&a.tftp_root().join("undionly.kpxe"), 300_000, 4);
    // 300 connections that start a request and never finish its headers: 200 from
    // one address (most are refused at once: per-source cap), 100 from 10 others.
    let mut slow = Vec::new();
    for i in 0..300u32 {
        let from = if i < 200 {
            Ipv4Addr::new(127, 3, 0, 1)
        } else {
            Ipv4Addr::new(127, 3, 1, (i % 10 + 1) as u8)
        };
        if let Ok(mut s) = connect_from(from, a.http) {
            let _ = s.write_all(b"GET /boot.ipxe HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            slow.push(s);
        }
    }
    // 300 registrations from one address: its burst, then 429.
    let flood: Vec<u16> = (0..300u32)
        .map(|i| {
            let body = Registration::numbered(10_000 + i).body();
            let s = connect_from(Ipv4Addr::new(127, 3, 2, 1), a.http);
            s.ok()
                .and_then(|mut s| {
                    write!(
                        s,
                        "POST /api/v1/register HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {REG_TOKEN}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .ok()?;
                    s.write_all(&body).ok()?;
                    let mut resp = String::new();
                    s.read_to_string(&mut resp).ok()?;
                    resp.split_whitespace().nth(1)?.parse().ok()
                })
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(flood.iter().filter(|c| **c == 200).count(), 10, "the burst");
    assert!(flood.iter().filter(|c| **c == 429).count() >= 280);

    // Meanwhile a machine (another address) boots: iPXE over TFTP, its script, its
    // kernel over HTTP, and registers.
    let tftp = format!("tftp://{}/undionly.kpxe", a.tftp);
    let (_, got, _) = curl(&["--interface", "127.0.0.1", &tftp]);
    assert!(got == ipxe, "iPXE over TFTP");
    let (status, script, _) = curl(&[
        "--interface",
        "127.0.0.1",
        &a.url("/boot.ipxe?uuid=4c4c4544-0042-3510-8051-b4c04f595031&mac=b8:ca:3a:00:00:0a"),
    ]);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&script));
    let (status, got, _) = curl(&["--interface", "127.0.0.1", &a.url("/env/talos/vmlinuz")]);
    assert_eq!(status, 200);
    assert!(got == kernel, "the kernel arrived whole");
    assert_eq!(
        a.register(&Registration::numbered(1)),
        Registration::numbered(1).uuid()
    );

    // The slowloris connections were cut by the header timeout.
    let cut = slow
        .iter_mut()
        .map(|s| closed_within(s, 10))
        .filter(|c| *c)
        .count();
    assert_eq!(cut, slow.len(), "every stalled request was closed");
    let m = a.metrics();
    for limit in ["per_source_connections", "registration_rate"] {
        assert!(
            m.contains(&format!(
                "arges_limited_total{{edge=\"http\",limit=\"{limit}\"}}"
            )),
            "{limit}: {m}"
        );
    }
    let lines = a.log().matches("HTTP refused by an abuse limit").count();
    assert!(
        lines <= 20,
        "refusals are logged at a bounded rate: {lines} lines"
    );
}

#[test]
fn stalled_bodies_and_stalled_readers_are_cut() {
    let a = Appliance::start_in(Appliance::prepare_with(LIMITS, ""), &[]);
    random_file(&a.data().join("assets/talos/vmlinuz"), 64 << 20, 5);
    // A body announced and never sent: 408 once body_secs pass.
    let mut s = TcpStream::connect(a.http).unwrap();
    write!(
        s,
        "POST /api/v1/register HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {REG_TOKEN}\r\nContent-Length: 100\r\n\r\n{{\"uu"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut resp = vec![0u8; 512];
    let n = s.read(&mut resp).unwrap();
    assert!(
        String::from_utf8_lossy(&resp[..n]).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&resp[..n])
    );
    // A reader that stops reading a large file: closed once nothing moves for idle_secs.
    let mut r = TcpStream::connect(a.http).unwrap();
    write!(r, "GET /env/talos/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut first = vec![0u8; 64 << 10];
    r.read_exact(&mut first).unwrap();
    a.wait_metric("arges_limited_total{edge=\"http\",limit=\"idle\"} 1");
}

#[test]
fn registrations_past_the_unaccepted_cap_wait_for_an_operator() {
    let a = Appliance::start("[policy]\nmax_unaccepted = 3\n");
    for i in 1..=3 {
        a.register(&Registration::numbered(i));
    }
    let fourth = Registration::numbered(4);
    let (code, body) = raw_http(
        a.http,
        "POST",
        "/api/v1/register",
        Some(REG_TOKEN),
        &fourth.body(),
    )
    .unwrap();
    assert_eq!(code, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("policy.max_unaccepted"));
    // A known machine registering again is not a new one.
    a.register(&Registration::numbered(2));
    let (code, _) = a.request(
        "POST",
        &format!(
            "/api/v1/servers/{}/accept",
            Registration::numbered(1).uuid()
        ),
        Some(test_support::ADMIN_TOKEN),
        b"",
    );
    assert_eq!(code, 200);
    a.register(&fourth);
    a.wait_metric("arges_limited_total{edge=\"core\",limit=\"unaccepted\"} 1");
}

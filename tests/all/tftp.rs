//! TFTP against real clients (curl, tftp-hpa, atftp) and a raw client for the protocol's
//! corners and for abuse.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use arges::tftp::packet::{self, encode_ack, encode_rrq};

use test_support::{Appliance, random_file, require, run};

fn curl_get(
    a: &Appliance,
    file: &str,
    blksize: Option<u32>,
    host: &str,
) -> (bool, Vec<u8>, String) {
    require("curl");
    let out = a.dir.path().join(format!(
        "curl-{}-{}",
        file.replace('/', "_"),
        blksize.unwrap_or(0)
    ));
    let mut cmd = Command::new("curl");
    cmd.arg("-sS")
        .arg("--max-time")
        .arg("120")
        .arg("-o")
        .arg(&out);
    if let Some(b) = blksize {
        cmd.arg("--tftp-blksize").arg(b.to_string());
    }
    cmd.arg(format!("tftp://{host}:{}/{file}", a.tftp.port()));
    let o = run(&mut cmd);
    (
        o.status.success(),
        std::fs::read(&out).unwrap_or_default(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn curl_fetches_byte_for_byte_at_every_block_size() {
    let a = Appliance::start("");
    // 40 MiB at blksize 512 is 81921 blocks: the block number rolls over past 65535.
    let big = random_file(&a.tftp_root().join("big.bin"), 40 << 20, 1);
    let small = random_file(&a.tftp_root().join("ipxe/undionly.kpxe"), 70_000, 2);
    let exact = random_file(&a.tftp_root().join("exact.bin"), 1468 * 3, 3);
    let empty = random_file(&a.tftp_root().join("empty.bin"), 0, 4);
    // 1432 is what iPXE itself asks for.
    for blksize in [512, 1432, 1468, 65464] {
        let (ok, got, err) = curl_get(&a, "big.bin", Some(blksize), "127.0.0.1");
        assert!(ok, "blksize {blksize}: {err}\n{}", a.log());
        assert!(
            got == big,
            "blksize {blksize}: content differs ({} of {} bytes)",
            got.len(),
            big.len()
        );
    }
    for (name, want) in [
        ("ipxe/undionly.kpxe", &small),
        ("exact.bin", &exact),
        ("empty.bin", &empty),
    ] {
        let (ok, got, err) = curl_get(&a, name, Some(1468), "127.0.0.1");
        assert!(ok && &got == want, "{name}: {err}");
    }
    // No options at all: plain RFC 1350, DATA 1 straight away.
    let (ok, got, err) = curl_get(&a, "exact.bin", None, "127.0.0.1");
    assert!(ok && got == exact, "{err}");
}

#[test]
fn tftp_hpa_octet_and_netascii() {
    require("tftp");
    let a = Appliance::start("");
    let data = random_file(&a.tftp_root().join("pxelinux.0"), 300_000, 5);
    std::fs::write(
        a.tftp_root().join("menu.txt"),
        "line one\nline two\r\nend\n",
    )
    .unwrap();
    // tftp-hpa's client, `get` in the given mode.
    let get = |mode: &str, file: &str, out: &std::path::Path| {
        run(Command::new("tftp")
            .args([
                "127.0.0.1",
                &a.tftp.port().to_string(),
                "-m",
                mode,
                "-c",
                "get",
                file,
            ])
            .arg(out))
    };
    let out = a.dir.path().join("hpa.out");
    let o = get("binary", "pxelinux.0", &out);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let txt = a.dir.path().join("menu.out");
    let o = get("ascii", "menu.txt", &txt);
    assert!(o.status.success(), "{o:?}");
    // The client converts netascii back to local line ends: the round trip is exact.
    assert_eq!(
        std::fs::read_to_string(&txt).unwrap(),
        "line one\nline two\r\nend\n"
    );
}

#[test]
fn atftp_with_windowsize() {
    require("atftp");
    let a = Appliance::start("");
    let data = random_file(&a.tftp_root().join("initrd.img"), 12 << 20, 6);
    for window in [1, 8, 16, 64] {
        let out = a.dir.path().join(format!("atftp-{window}"));
        let o = run(Command::new("atftp")
            .args(["-g", "-r", "initrd.img", "-l"])
            .arg(&out)
            .args([
                "--option",
                "blksize 1468",
                "--option",
                &format!("windowsize {window}"),
                "127.0.0.1",
                &a.tftp.port().to_string(),
            ]));
        assert!(
            o.status.success(),
            "windowsize {window}: {o:?}\n{}",
            a.log()
        );
        assert!(
            std::fs::read(&out).unwrap() == data,
            "windowsize {window}: content differs"
        );
    }
}

#[test]
fn ipv6_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("appliance.toml"),
        test_support::appliance::config(""),
    )
    .unwrap();
    let a = Appliance::start_in(tmp, &["--tftp", "[::1]:0"]);
    assert!(a.tftp.is_ipv6());
    let data = random_file(&a.tftp_root().join("v6.bin"), 100_000, 7);
    let (ok, got, err) = curl_get(&a, "v6.bin", Some(1468), "[::1]");
    assert!(ok && got == data, "{err}\n{}", a.log());
}

fn client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 70_000];
    let (n, from) = s.recv_from(&mut buf).expect("an answer from the server");
    buf.truncate(n);
    (buf, from)
}

fn error_code(pkt: &[u8]) -> Option<u16> {
    (pkt.len() >= 4 && pkt[1] == packet::OP_ERROR as u8)
        .then(|| u16::from_be_bytes([pkt[2], pkt[3]]))
}

#[test]
fn refuses_escapes_writes_and_garbage_and_keeps_serving() {
    let a = Appliance::start("");
    let data = random_file(&a.tftp_root().join("ok.bin"), 5000, 8);
    std::fs::write(a.dir.path().join("secret"), b"outside the root").unwrap();
    std::os::unix::fs::symlink(a.dir.path().join("secret"), a.tftp_root().join("link")).unwrap();
    let s = client();
    for (name, code) in [
        ("../appliance.toml", 2),
        ("../../../../etc/passwd", 2),
        ("..\\..\\secret", 2),
        ("/etc/passwd", 1),
        ("link", 2),
        ("missing", 1),
    ] {
        s.send_to(&encode_rrq(name, "octet", &[]), a.tftp).unwrap();
        let (pkt, _) = recv(&s);
        assert_eq!(error_code(&pkt), Some(code), "{name}: {pkt:?}");
    }
    // Write requests: refused, nothing created.
    let mut wrq = encode_rrq("new.bin", "octet", &[]);
    wrq[1] = packet::OP_WRQ as u8;
    s.send_to(&wrq, a.tftp).unwrap();
    assert_eq!(error_code(&recv(&s).0), Some(2));
    assert!(!a.tftp_root().join("new.bin").exists());
    // Malformed and oversized: each answered with an error, none crashes anything.
    let long_opts: Vec<(String, String)> = (0..40)
        .map(|i| (format!("opt{i}"), "x".repeat(40)))
        .collect();
    let long_opts: Vec<(&str, &str)> = long_opts
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let garbage: Vec<Vec<u8>> = vec![
        vec![0],
        vec![0, 1],
        vec![0, 1, b'a'],
        vec![0, 1, b'a', 0, b'o', b'c'],
        vec![0, 9, 0, 0],
        vec![0, 3, 0, 1, 1, 2, 3],
        vec![0, 1, 0xff, 0xfe, 0, b'o', b'c', b't', b'e', b't', 0],
        encode_rrq("ok.bin", "mail", &[]),
        encode_rrq("ok.bin", "octet", &long_opts),
        vec![0xab; 3000],
        encode_rrq("ok.bin", "octet", &[("blksize", "99999999999999999999")]),
    ];
    for g in &garbage {
        s.send_to(g, a.tftp).unwrap();
    }
    let mut answers = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 2048];
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while Instant::now() < deadline {
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            if error_code(&buf[..n]).is_some() {
                answers += 1;
            } else if buf[1] == packet::OP_DATA as u8 || buf[1] == packet::OP_OACK as u8 {
                answers += 1; // the absurd blksize is ignored and the file is served
            }
        }
    }
    assert!(
        answers >= garbage.len() - 1,
        "each bad packet gets an answer ({answers} of {})",
        garbage.len()
    );
    let (ok, got, err) = curl_get(&a, "ok.bin", Some(1468), "127.0.0.1");
    assert!(ok && got == data, "still serving after abuse: {err}");
    let metrics = a.request("GET", "/metrics", None, b"").1;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("arges_tftp_errors_total{kind=\"truncated\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("arges_tftp_requests_total{result=\"write_refused\"} 1"),
        "{metrics}"
    );
}

#[test]
fn oack_only_for_options_sent_and_tsize_probe_abort() {
    let a = Appliance::start("");
    random_file(&a.tftp_root().join("f.bin"), 10_000, 9);
    let s = client();
    s.send_to(
        &encode_rrq(
            "f.bin",
            "octet",
            &[("tsize", "0"), ("msftwindow", "31416"), ("blksize", "1432")],
        ),
        a.tftp,
    )
    .unwrap();
    let (pkt, tid) = recv(&s);
    assert_ne!(tid.port(), a.tftp.port(), "a fresh port per transfer");
    assert_eq!(&pkt[..2], &[0, 6]);
    assert_eq!(&pkt[2..], b"tsize\x0010000\x00blksize\x001432\x00");
    // EDK2 style: abort after the size probe with error 8.
    s.send_to(
        &packet::encode_error(packet::ErrorCode::OptionRefused, "probe only"),
        tid,
    )
    .unwrap();
    // The real request follows and works.
    s.send_to(
        &encode_rrq("f.bin", "octet", &[("blksize", "1432")]),
        a.tftp,
    )
    .unwrap();
    let (pkt, tid2) = recv(&s);
    assert_eq!(&pkt[..2], &[0, 6]);
    s.send_to(&encode_ack(0), tid2).unwrap();
    let (pkt, _) = recv(&s);
    assert_eq!(&pkt[..4], &[0, 3, 0, 1]);
    assert_eq!(pkt.len(), 4 + 1432);
}

#[test]
fn duplicate_acks_cause_no_storm_and_gaps_are_resent() {
    let a = Appliance::start("");
    let data = random_file(&a.tftp_root().join("f.bin"), 512 * 10 + 7, 10);
    // Lockstep: ACK 1 three times; DATA 2 must come exactly once.
    let s = client();
    s.send_to(&encode_rrq("f.bin", "octet", &[]), a.tftp)
        .unwrap();
    let (pkt, tid) = recv(&s);
    assert_eq!(&pkt[..4], &[0, 3, 0, 1]);
    for _ in 0..3 {
        s.send_to(&encode_ack(1), tid).unwrap();
    }
    s.set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    let mut data2 = 0;
    let mut buf = [0u8; 1024];
    while let Ok((n, _)) = s.recv_from(&mut buf) {
        if n >= 4 && buf[..4] == [0, 3, 0, 2] {
            data2 += 1;
        }
    }
    assert_eq!(
        data2, 1,
        "a duplicate ACK must not trigger a resend in lockstep mode"
    );

    // Windowed: take blocks 1..4 but pretend 3 was lost; ACK 2; the server resends from 3.
    let s = client();
    s.send_to(
        &encode_rrq("f.bin", "octet", &[("windowsize", "4")]),
        a.tftp,
    )
    .unwrap();
    let (_, tid) = recv(&s);
    s.send_to(&encode_ack(0), tid).unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(recv(&s).0);
    }
    assert_eq!(
        got.iter().map(|p| p[3]).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    s.send_to(&encode_ack(2), tid).unwrap();
    let mut file = Vec::new();
    file.extend_from_slice(&got[0][4..]);
    file.extend_from_slice(&got[1][4..]);
    let mut expect = 3u16;
    loop {
        let (p, _) = recv(&s);
        let block = u16::from_be_bytes([p[2], p[3]]);
        if block != expect {
            continue;
        }
        file.extend_from_slice(&p[4..]);
        let last = p.len() < 4 + 512;
        if (expect - 2).is_multiple_of(4) || last {
            s.send_to(&encode_ack(expect), tid).unwrap();
        }
        if last {
            break;
        }
        expect += 1;
    }
    assert_eq!(file, data);
}

#[test]
fn forged_requests_take_no_slot_and_stream_nothing_while_a_real_client_gets_its_file() {
    let a = Appliance::start(
        "[tftp]\nmax_transfers = 8\nmax_handshakes = 32\ntimeout_ms = 200\nmax_timeout_ms = 400\nretries = 2\n",
    );
    let data = random_file(&a.tftp_root().join("ipxe.efi"), 200_000, 11);
    // 300 requests from 300 loopback addresses (a forged source looks like this: it never
    // acknowledges), half asking for the largest blocks, half for plain DATA.
    let flood: Vec<UdpSocket> = (0..300u32)
        .map(|i| {
            let s = UdpSocket::bind((
                std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8),
                0,
            ))
            .unwrap();
            let options: &[(&str, &str)] = if i % 2 == 0 {
                &[("blksize", "65464"), ("windowsize", "64")]
            } else {
                &[]
            };
            s.send_to(&encode_rrq("ipxe.efi", "octet", options), a.tftp)
                .unwrap();
            s
        })
        .collect();
    // Another machine (another loopback address) still gets its file at once.
    let s = UdpSocket::bind("127.0.0.2:0").unwrap();
    // Like real firmware, retransmit the request until something answers.
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut first = None;
    for _ in 0..6 {
        s.send_to(&encode_rrq("ipxe.efi", "octet", &[]), a.tftp)
            .unwrap();
        let mut buf = vec![0u8; 2048];
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            buf.truncate(n);
            first = Some((buf, from));
            break;
        }
    }
    let (p, tid) = first.expect("the other machine got no answer");
    assert_eq!(p[1], 3, "expected DATA, got {p:?}");
    let mut file = p[4..].to_vec();
    s.send_to(&[0, 4, p[2], p[3]], tid).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut expect = 2u16;
    loop {
        let (p, tid) = recv(&s);
        assert_eq!(p[1], 3, "expected DATA, got {p:?}");
        s.send_to(&[0, 4, p[2], p[3]], tid).unwrap();
        if u16::from_be_bytes([p[2], p[3]]) != expect {
            continue; // a retransmission of a block we already have
        }
        file.extend_from_slice(&p[4..]);
        expect += 1;
        if p.len() < 516 {
            break;
        }
    }
    assert_eq!(file, data);
    // What a forged source's victim received: the first packet, resent once at most,
    // never a stream of DATA (and never a large block: those wait for an ACK).
    for (i, f) in flood.iter().enumerate() {
        f.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok((n, _)) = f.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        assert!(got.len() <= 2, "source {i} got {} packets", got.len());
        for p in &got {
            assert!(p.len() <= 516, "source {i} got a {}-byte packet", p.len());
        }
    }
    // The flood took no slot: handshakes were bounded (the oldest gave way) and ended
    // by themselves.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = a.metrics();
        if m.contains("arges_tftp_active_transfers 0") && m.contains("outcome=\"timeout\"") {
            assert!(
                m.contains("arges_tftp_requests_total{result=\"handshake_evicted\"}"),
                "{m}"
            );
            assert!(
                !m.contains("result=\"busy\""),
                "the flood filled no slot: {m}"
            );
            assert!(
                m.contains("arges_tftp_transfers_total{outcome=\"complete\"} 1"),
                "{m}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "forged handshakes were not reaped:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

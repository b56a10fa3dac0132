//! proxyDHCP on loopback: the PXE port (4011) answers a ProxyDHCP REQUEST by unicast, and
//! garbage is counted, never fatal. (Broadcast answers on port 67 need an interface of
//! their own: the QEMU tests in `tests/netboot` cover them.)

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use dhcproto::v4::{Architecture, DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};

use test_support::Appliance;

fn pxe_request(xid: u32, arch: u16, user_class: Option<&[u8]>) -> Vec<u8> {
    let mut m = Message::new_with_id(
        xid,
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &[0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc],
    );
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(MessageType::Request));
    o.insert(DhcpOption::ClassIdentifier(
        format!("PXEClient:Arch:{arch:05}:UNDI:003016").into_bytes(),
    ));
    o.insert(DhcpOption::ClientSystemArchitecture(Architecture(arch)));
    o.insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
    if let Some(uc) = user_class {
        o.insert(DhcpOption::UserClass(uc.to_vec()));
    }
    m.to_vec().unwrap()
}

fn exchange(sock: &UdpSocket, to: std::net::SocketAddr, pkt: &[u8]) -> Message {
    sock.send_to(pkt, to).unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = sock.recv_from(&mut buf).expect("a proxyDHCP answer");
    assert_eq!(from, to, "answered from the port asked");
    Message::from_bytes(&buf[..n]).unwrap()
}

#[test]
fn pxe_port_acks_with_the_boot_file_for_the_architecture() {
    let a =
        Appliance::start("[dhcp]\nmode = \"proxy\"\nlisten = []\npxe_listen = [\"127.0.0.1:0\"]\n");
    let to = a.dhcp.expect("a proxyDHCP socket");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let m = exchange(&sock, to, &pxe_request(7, 7, None));
    assert_eq!(m.opcode(), Opcode::BootReply);
    assert_eq!(m.xid(), 7);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.siaddr(), Ipv4Addr::LOCALHOST, "we are the boot server");
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED, "a proxy leases nothing");
    assert_eq!(
        m.opts().get(OptionCode::BootfileName),
        Some(&DhcpOption::BootfileName(b"ipxe.efi".to_vec()))
    );

    // iPXE gets the boot script on the HTTP address it can reach.
    let m = exchange(&sock, to, &pxe_request(8, 0, Some(b"iPXE")));
    let want = format!(
        "http://127.0.0.1:{}/boot.ipxe?uuid=${{uuid}}&mac=${{netX/mac}}&arch=${{buildarch}}",
        a.http.port()
    );
    assert_eq!(
        m.opts().get(OptionCode::BootfileName),
        Some(&DhcpOption::BootfileName(want.into_bytes()))
    );

    // Garbage and non-PXE clients get nothing, and the server keeps answering.
    for junk in [
        vec![],
        vec![0u8; 3],
        vec![0xff; 1400],
        pxe_request(9, 7, None)[..200].to_vec(),
    ] {
        sock.send_to(&junk, to).unwrap();
    }
    let m = exchange(&sock, to, &pxe_request(10, 9, None));
    assert_eq!(
        m.xid(),
        10,
        "the first answer after the garbage is to the good request"
    );
    let metrics = a.wait_metric("arges_dhcp_requests_total{result=\"malformed\"}");
    assert!(
        metrics.contains("arges_dhcp_requests_total{result=\"answered\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("arges_dhcp_replies_total{client=\"ipxe\",firmware=\"bios\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_request_naming_a_relay_the_config_does_not_name_gets_no_answer() {
    let a = Appliance::start(
        "[dhcp]\nmode = \"proxy\"\nlisten = []\npxe_listen = [\"127.0.0.1:0\"]\nrelays = [\"127.0.0.77\"]\n",
    );
    let to = a.dhcp.expect("a proxyDHCP socket");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A forged relay (on loopback, so a wrong answer could not leave this machine):
    // no reply is sent to it, and a flood of them is one counter, not a log flood.
    let forged = |xid| {
        let mut m = Message::from_bytes(&pxe_request(xid, 7, None)).unwrap();
        m.set_giaddr(Ipv4Addr::new(127, 0, 0, 66));
        m.to_vec().unwrap()
    };
    for xid in 100..300 {
        sock.send_to(&forged(xid), to).unwrap();
    }
    // The flood may overrun the socket's buffer (the kernel drops the rest, as it
    // would in the field); the honest client asks until it is answered, as PXE ROMs do.
    a.wait_metric("arges_dhcp_requests_total{result=\"relay_refused\"}");
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut honest = 0;
    let answered = (0..5).find_map(|_| {
        honest += 1;
        sock.send_to(&pxe_request(11, 7, None), to).unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        Some(Message::from_bytes(&buf[..n]).unwrap())
    });
    let m = answered.expect("the honest request is answered");
    assert_eq!(m.xid(), 11, "no forged request was answered");
    // Every answer went to an honest request (a late answer may have crossed a resend).
    // The counter moves just after the reply is sent: wait for it.
    let metrics = a.wait_metric("arges_dhcp_requests_total{result=\"answered\"}");
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("arges_dhcp_requests_total{result=\"answered\"} "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(
        (1..=honest).contains(&count),
        "{count} answers to {honest} honest requests: {metrics}"
    );
    let refusals = a.log().matches("proxyDHCP reply not sent").count();
    assert!(
        (1..=10).contains(&refusals),
        "refusals are logged at a bounded rate: {refusals} lines"
    );
}

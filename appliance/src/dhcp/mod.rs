//! proxyDHCP edge: tells network-boot clients what to boot, beside the site's DHCP server.
//!
//! Two roles share one handler: the DHCP port (67), where firmware broadcasts DISCOVER and
//! we answer with a ProxyDHCP OFFER, and the PXE port (4011), where PXE clients send their
//! ProxyDHCP REQUEST and get an ACK. [`answer`] holds the pure part (packet in, packet
//! out, via `dhcproto`); this file owns the sockets.
//!
//! Sockets are plain UDP with `IP_PKTINFO`: every request tells us the interface it came
//! in on and our address there, which becomes the boot server address, so one wildcard
//! socket serves every interface correctly (and interface selection is a filter on that
//! index). Broadcast replies leave through the interface the request came from, which
//! works without any route in the network. No raw sockets: a proxy never unicasts to an
//! address the client does not have yet.
//!
//! Nothing here can be aimed at a third party: a relayed request is answered only when
//! its relay is one the config names, and a unicast reply (to a client that has an
//! address, or to a request on the PXE port) only to an address on the subnet of the
//! interface the request came in on. Refusals are counted; their log lines are rate
//! limited.

pub mod answer;
pub mod config;

use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, sendmsg, setsockopt,
    sockopt,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::DhcpConfig;
use crate::core::Core;
use crate::limits::LogGate;
use crate::metrics::Metrics;
use crate::timeline::Step;
pub use answer::{Arrival, ClientKind, Firmware, Ignored, Reply};

const DHCP_CLIENT_PORT: u16 = 68;
const DHCP_SERVER_PORT: u16 = 67;
/// Largest request we read; anything longer is not DHCP from a boot ROM.
const MAX_PACKET: usize = 1500;

/// Which port a socket plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The DHCP server port: broadcasts from clients without an address.
    Dhcp,
    /// The PXE port: ProxyDHCP requests addressed to us.
    Pxe,
}

/// The proxyDHCP server.
pub struct DhcpServer {
    config: DhcpConfig,
    core: Arc<Core>,
    /// HTTP addresses actually bound (the port goes into the URLs we hand out).
    http: Vec<SocketAddr>,
    /// `http.public_url`, if set: used as is.
    public_url: Option<String>,
}

/// Binds a proxyDHCP socket: address reuse (a site DHCP server may share the host),
/// broadcast, and packet info.
pub fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let SocketAddr::V4(_) = addr else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "proxyDHCP is IPv4 only (DHCPv6 boot is not supported)",
        ));
    };
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    setsockopt(&s, sockopt::Ipv4PacketInfo, &true).map_err(std::io::Error::from)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// One received datagram with where it arrived.
struct Received {
    len: usize,
    from: SocketAddrV4,
    ifindex: u32,
    /// Our address on the arrival interface.
    local: Ipv4Addr,
}

fn receive(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Received> {
    let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrIn>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_TRUNC,
    )
    .map_err(std::io::Error::from)?;
    let mut ifindex = 0;
    let mut local = Ipv4Addr::UNSPECIFIED;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::Ipv4PacketInfo(info) = c {
                ifindex = info.ipi_ifindex as u32;
                local = Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr));
            }
        }
    }
    let from = msg
        .address
        .map(|a| SocketAddrV4::new(a.ip(), a.port()))
        .unwrap_or_else(|| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    Ok(Received {
        len: msg.bytes,
        from,
        ifindex,
        local,
    })
}

/// Whether `ip` is on a subnet of interface `ifindex` (one of its IPv4 addresses with
/// its netmask). Read per call: interfaces and their addresses change.
fn on_interface_subnet(ip: Ipv4Addr, ifindex: u32) -> bool {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    addrs
        .filter(|a| {
            nix::net::if_::if_nametoindex(a.interface_name.as_str()).is_ok_and(|i| i == ifindex)
        })
        .any(|a| {
            let v4 = |s: Option<nix::sys::socket::SockaddrStorage>| {
                s.and_then(|s| s.as_sockaddr_in().map(|a| a.ip()))
            };
            match (v4(a.address), v4(a.netmask)) {
                (Some(addr), Some(mask)) => {
                    let m = u32::from(mask);
                    u32::from(addr) & m == u32::from(ip) & m
                }
                _ => false,
            }
        })
}

fn send(
    sock: &UdpSocket,
    bytes: &[u8],
    to: SocketAddrV4,
    ifindex: u32,
    source: Ipv4Addr,
) -> std::io::Result<usize> {
    let info = libc::in_pktinfo {
        ipi_ifindex: ifindex as i32,
        ipi_spec_dst: libc::in_addr {
            s_addr: u32::from(source).to_be(),
        },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
    let dest = SockaddrIn::from(to);
    sendmsg(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &cmsg,
        MsgFlags::empty(),
        Some(&dest),
    )
    .map_err(std::io::Error::from)
}

impl DhcpServer {
    /// A server answering with `config`; `http` are the bound HTTP addresses.
    pub fn new(
        config: DhcpConfig,
        core: Arc<Core>,
        http: Vec<SocketAddr>,
        public_url: Option<String>,
    ) -> Arc<Self> {
        Arc::new(DhcpServer {
            config,
            core,
            http,
            public_url,
        })
    }

    fn metrics(&self) -> &Metrics {
        self.core.metrics()
    }

    /// The appliance's URL as a machine that reached us at `server` sees it.
    fn http_base(&self, server: Ipv4Addr) -> Option<String> {
        if let Some(url) = &self.public_url {
            return Some(url.clone());
        }
        self.http
            .iter()
            .find(|a| a.ip() == std::net::IpAddr::V4(server))
            .or_else(|| self.http.iter().find(|a| a.ip().is_unspecified()))
            .map(|a| format!("http://{server}:{}", a.port()))
    }

    /// Whether requests arriving on `ifindex` are ours to answer.
    fn interface_allowed(&self, ifindex: u32) -> bool {
        // Names are resolved per request: interfaces (bridges, VLANs) come and go.
        self.config.interfaces.is_empty()
            || self.config.interfaces.iter().any(|name| {
                nix::net::if_::if_nametoindex(name.as_str()).is_ok_and(|i| i == ifindex)
            })
    }

    /// Serves `sock` in `role` until `cancel` fires.
    pub async fn serve(
        self: Arc<Self>,
        sock: UdpSocket,
        role: Role,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        tracing::info!(local = %sock.local_addr()?, ?role, "proxyDHCP listening");
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let got = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = sock.async_io(Interest::READABLE, || receive(&sock, &mut buf)) => r,
            };
            let r = match got {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "proxyDHCP receive failed");
                    Metrics::inc(&self.metrics().dhcp_requests, "result", "receive_error");
                    continue;
                }
            };
            if r.len > buf.len() {
                Metrics::inc(&self.metrics().dhcp_requests, "result", "oversized");
                tracing::debug!(from = %r.from, len = r.len, "oversized DHCP packet dropped");
                continue;
            }
            self.handle(&sock, role, &buf[..r.len], &r);
        }
    }

    /// Why a reply may not go to `to`, if it may not: a relay the config does not name,
    /// or a unicast address off the arrival interface's subnets.
    fn refuse_destination(
        &self,
        reply: &Reply,
        to: Ipv4Addr,
        ifindex: u32,
    ) -> Option<&'static str> {
        if let Some(relay) = reply.relay {
            return (!self.config.relays.contains(&relay)).then_some("relay_refused");
        }
        if to == Ipv4Addr::BROADCAST || on_interface_subnet(to, ifindex) {
            None
        } else {
            Some("off_subnet")
        }
    }

    fn handle(&self, sock: &UdpSocket, role: Role, packet: &[u8], r: &Received) {
        let m = self.metrics();
        if !self.interface_allowed(r.ifindex) {
            Metrics::inc(&m.dhcp_requests, "result", "interface");
            return;
        }
        let server = self.config.server_address.unwrap_or(r.local);
        let Some(http_base) = self.http_base(server) else {
            Metrics::inc(&m.dhcp_requests, "result", "http_unreachable");
            tracing::error!(%server, http = ?self.http, "a network-boot client reached us at an address HTTP does not listen on; set http.listen or http.public_url");
            return;
        };
        let arrival = Arrival {
            server,
            pxe_port: role == Role::Pxe,
        };
        let reply = match answer::answer(packet, arrival, &http_base, &self.config) {
            Ok(reply) => reply,
            Err(why) => {
                Metrics::inc(&m.dhcp_requests, "result", why.kind());
                match why {
                    Ignored::Malformed(_) | Ignored::Architecture(_) => {
                        static GATE: LogGate = LogGate::new(10, Duration::from_secs(60));
                        if let Some(held_back) = GATE.check() {
                            tracing::warn!(from = %r.from, reason = %why, held_back, "DHCP request not answered");
                        }
                    }
                    _ => tracing::trace!(from = %r.from, reason = %why, "DHCP request not ours"),
                }
                return;
            }
        };
        let (to, ifindex) = if let Some(relay) = reply.relay {
            (SocketAddrV4::new(relay, DHCP_SERVER_PORT), 0)
        } else if role == Role::Pxe {
            (r.from, r.ifindex)
        } else if let Some(ip) = reply.client_addr {
            (SocketAddrV4::new(ip, DHCP_CLIENT_PORT), r.ifindex)
        } else {
            (
                SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_CLIENT_PORT),
                r.ifindex,
            )
        };
        if let Some(why) = self.refuse_destination(&reply, *to.ip(), r.ifindex) {
            Metrics::inc(&m.dhcp_requests, "result", why);
            static GATE: LogGate = LogGate::new(10, Duration::from_secs(60));
            if let Some(held_back) = GATE.check() {
                tracing::warn!(from = %r.from, %to, reason = why, held_back, "proxyDHCP reply not sent: it would go to a relay the config does not name (dhcp.relays) or off the interface's subnets");
            }
            return;
        }
        if let Err(e) = send(sock, &reply.bytes, to, ifindex, server) {
            Metrics::inc(&m.dhcp_requests, "result", "send_error");
            tracing::warn!(%to, error = %e, "cannot send the proxyDHCP reply");
            return;
        }
        Metrics::inc(&m.dhcp_requests, "result", "answered");
        m.dhcp_replies
            .get_or_create(&[
                ("client", reply.client.kind.name()),
                ("firmware", reply.client.firmware.name()),
            ])
            .inc();
        // On the PXE port, or with an address of its own, the client is at `r.from`.
        let from = (role == Role::Pxe || reply.client_addr.is_some())
            .then_some(std::net::IpAddr::V4(*r.from.ip()));
        self.core.network_boot_seen(
            &reply.client.mac,
            from,
            Step::Dhcp {
                client: reply.client.kind.name().into(),
                firmware: reply.client.firmware.name().into(),
                boot_file: reply.boot_file.clone(),
            },
        );
        tracing::info!(
            mac = %reply.client.mac,
            arch = reply.client.arch,
            client = reply.client.kind.name(),
            message = ?reply.message,
            boot_file = %reply.boot_file,
            %to,
            "proxyDHCP answered"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicast_replies_stay_on_the_arrival_interfaces_subnets() {
        let lo = nix::net::if_::if_nametoindex("lo").expect("a loopback interface");
        assert!(on_interface_subnet(Ipv4Addr::new(127, 0, 0, 9), lo));
        // TEST-NET-1: checked, never sent to.
        assert!(!on_interface_subnet(Ipv4Addr::new(192, 0, 2, 1), lo));
        assert!(!on_interface_subnet(Ipv4Addr::new(127, 0, 0, 9), 0));
    }
}

//! Listening sockets, bound the same way everywhere.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Pending connections a listener queues (the kernel caps it at
/// `net.core.somaxconn`): a burst of new connections, such as a client's
/// pool opening at once, waits instead of being refused.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Binds a TCP listener on `addr` with `SO_REUSEADDR` (a restart does not
/// wait out `TIME_WAIT`). An unspecified IPv6 address (`[::]`) is
/// explicitly dual-stack, so IPv4 connections reach it too whatever the
/// node's `net.ipv6.bindv6only` says.
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket2::SockRef::from(&socket).set_only_v6(false)?;
    }
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unspecified_ipv6_listener_takes_ipv4_too() {
        let listener = bind_listener("[::]:0".parse().expect("addr")).expect("bind");
        assert_eq!(
            socket2::SockRef::from(&listener).only_v6().ok(),
            Some(false),
            "IPV6_V6ONLY is cleared"
        );
        let port = listener.local_addr().expect("addr").port();
        let client = tokio::net::TcpStream::connect(("127.0.0.1", port));
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        connected.expect("an IPv4 client connects");
        let (_, peer) = accepted.expect("accepted");
        // Seen as an IPv4-mapped IPv6 address.
        assert_eq!(peer.ip().to_canonical(), std::net::Ipv4Addr::LOCALHOST);
        let v4 = bind_listener("127.0.0.1:0".parse().expect("addr")).expect("bind");
        assert!(v4.local_addr().expect("addr").is_ipv4());
    }
}

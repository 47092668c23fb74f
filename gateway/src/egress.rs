//! Egress listeners: one TCP listener on `VIP:port` for every imported
//! port, following the import table as it changes. Each accepted
//! connection becomes one tunnel stream to an exporting peer.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::catalog::ServiceKey;
use crate::gateway::Shared;
use crate::imports::{tcp_ports, ImportTable};
use crate::tunnel::io::{relay, reset_tcp, PeerInfo};
use crate::tunnel::{frame, QuicIo};

/// How often bind failures are retried even if imports do not change.
const RETRY: Duration = Duration::from_secs(5);

struct Listener {
    key: ServiceKey,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The listeners the table asks for.
pub fn desired(table: &ImportTable) -> HashMap<SocketAddr, (ServiceKey, u16)> {
    table
        .values()
        .flat_map(|import| {
            tcp_ports(import).map(move |p| {
                (
                    SocketAddr::V4(SocketAddrV4::new(import.vip, p.port)),
                    (import.key.clone(), p.port),
                )
            })
        })
        .collect()
}

/// Keeps the listeners in line with the import table until aborted.
pub async fn run(shared: Arc<Shared>) {
    let mut rx = shared.imports.watch();
    let mut listeners: HashMap<SocketAddr, Listener> = HashMap::new();
    loop {
        let table = rx.borrow_and_update().clone();
        let want = desired(&table);
        listeners.retain(|addr, l| want.get(addr).is_some_and(|(k, _)| *k == l.key));
        for (addr, (key, port)) in want {
            if listeners.contains_key(&addr) {
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, service = %key, "egress listener up");
                    let task = tokio::spawn(accept(listener, key.clone(), port, shared.clone()));
                    listeners.insert(addr, Listener { key, task });
                }
                Err(error) => {
                    tracing::warn!(%addr, service = %key, %error, "cannot bind egress listener; will retry");
                    shared.metrics.egress_bind_errors.inc();
                }
            }
        }
        shared.metrics.egress_listeners.set(listeners.len() as i64);
        // Announce the table once DNS answers it too (bounded: DNS is
        // built off the async workers and normally lands within ms).
        let mut dns = shared.dns_synced.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            dns.wait_for(|t| Arc::ptr_eq(t, &table) || **t == *table),
        )
        .await;
        shared.egress_synced.send_replace(table);
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn accept(listener: TcpListener, key: ServiceKey, port: u16, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(forward(tcp, key.clone(), port, shared.clone()));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(%error, "egress accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long opening a stream (peer flow-control credit) may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

async fn forward(mut tcp: TcpStream, key: ServiceKey, port: u16, shared: Arc<Shared>) {
    // Only peers exporting this port: services merged from several
    // clusters may have ports that only some of them export.
    let candidates = match shared.imports.current().get(&key) {
        Some(import) => import.peers_for(port),
        None => {
            reset_tcp(&tcp);
            return;
        }
    };
    let Some((peer, conn)) = shared.peers.pick(&candidates) else {
        tracing::info!(service = %key, "no live tunnel to any exporting peer");
        let peer = candidates.first().cloned().unwrap_or_default();
        shared.metrics.stream_done(&peer, "outbound", "no_tunnel");
        reset_tcp(&tcp);
        return;
    };
    let header = match frame::encode(&frame::tcp_header(&key, port, shared.certs.id().as_str())) {
        Ok(h) => h,
        Err(error) => {
            tracing::warn!(%error, "cannot encode stream header");
            reset_tcp(&tcp);
            return;
        }
    };
    let opened = async {
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(&header).await?;
        Ok::<_, std::io::Error>((send, recv))
    };
    let (send, recv) = match tokio::time::timeout(OPEN_TIMEOUT, opened).await {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            tracing::info!(%peer, %error, "cannot open tunnel stream");
            shared.metrics.stream_done(&peer, "outbound", "error");
            reset_tcp(&tcp);
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "opening a tunnel stream timed out");
            shared
                .metrics
                .stream_done(&peer, "outbound", "open_timeout");
            reset_tcp(&tcp);
            return;
        }
    };
    let mut io = QuicIo {
        send,
        recv,
        peer: PeerInfo {
            name: peer,
            identity: String::new(),
        },
    };
    relay(&mut tcp, &mut io, &shared.metrics, "outbound").await;
}

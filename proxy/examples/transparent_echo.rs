//! A toy transparent proxy and its companions, for trying transparent mode
//! by hand and for `tests/transparent_netns.rs`.
//!
//! ```text
//! transparent_echo init --proxy-uid UID [--inbound-port P] [--outbound-port P]
//!                       [--admin-port P] [--skip-inbound P,P] [--skip-outbound P,P] [--ipv6]
//!     installs the nat rules in the current network namespace (root)
//! transparent_echo proxy OUTBOUND_LISTEN INBOUND_LISTEN
//!     accepts redirected connections; answers "orig=<original destination>\n",
//!     then forwards to the original destination (inbound too: the
//!     application is reached at the pod's own address, as the real proxy
//!     does)
//! transparent_echo serve LISTEN MESSAGE
//!     answers every connection with "MESSAGE\n" and closes it
//! transparent_echo connect ADDR
//!     prints everything ADDR sends until it closes (5 s at most)
//! ```
//!
//! Listening roles print `ready` once bound. Errors go to stderr with a
//! non-zero exit. `tests/transparent_netns.rs` compiles this file into the
//! test (so it never runs a stale build) and has it print on stderr.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use strait_proxy::transparent::{self, InitConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args, to_stdout).await {
        eprintln!("transparent_echo: {e:#}");
        std::process::exit(1);
    }
}

/// Where the example's results go.
fn to_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Runs one role (`args` without the program name), writing its results
/// with `out`.
pub async fn run(args: &[String], out: fn(&str)) -> Result<()> {
    match args {
        [cmd, rest @ ..] if cmd == "init" => init(rest, out),
        [cmd, outbound, inbound] if cmd == "proxy" => proxy(outbound, inbound, out).await,
        [cmd, listen, message] if cmd == "serve" => serve(listen, message, out).await,
        [cmd, addr] if cmd == "connect" => connect(addr, out).await,
        _ => bail!("usage: transparent_echo init|proxy|serve|connect ... (see the source)"),
    }
}

fn init(args: &[String], out: fn(&str)) -> Result<()> {
    let mut cfg = InitConfig::new(u32::MAX);
    let mut uid = None;
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        if flag == "--ipv6" {
            cfg.ipv6 = true;
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--proxy-uid" => uid = Some(value.parse().context("--proxy-uid")?),
            "--inbound-port" => cfg.inbound_port = value.parse().context(flag.clone())?,
            "--outbound-port" => cfg.outbound_port = value.parse().context(flag.clone())?,
            "--admin-port" => cfg.admin_port = value.parse().context(flag.clone())?,
            "--skip-inbound" => cfg.skip_inbound_ports = ports(value)?,
            "--skip-outbound" => cfg.skip_outbound_ports = ports(value)?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    cfg.proxy_uid = uid.context("--proxy-uid is required")?;
    let applied = transparent::apply(&cfg)?;
    out(&format!("{applied}\n"));
    Ok(())
}

fn ports(list: &str) -> Result<Vec<u16>> {
    list.split(',')
        .map(|p| p.parse().with_context(|| format!("bad port {p:?}")))
        .collect()
}

async fn proxy(outbound: &str, inbound: &str, out: fn(&str)) -> Result<()> {
    let outbound = TcpListener::bind(outbound)
        .await
        .with_context(|| format!("bind {outbound}"))?;
    let inbound = TcpListener::bind(inbound)
        .await
        .with_context(|| format!("bind {inbound}"))?;
    out("ready\n");
    loop {
        tokio::select! {
            accepted = outbound.accept() => {
                let (tcp, _) = accepted.context("accept outbound")?;
                tokio::spawn(forward(tcp, Direction::Outbound));
            }
            accepted = inbound.accept() => {
                let (tcp, _) = accepted.context("accept inbound")?;
                tokio::spawn(forward(tcp, Direction::Inbound));
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Outbound,
    Inbound,
}

async fn forward(mut client: TcpStream, direction: Direction) {
    if let Err(e) = try_forward(&mut client, direction).await {
        let _ = client.write_all(format!("error={e:#}\n").as_bytes()).await;
    }
}

async fn try_forward(client: &mut TcpStream, direction: Direction) -> Result<()> {
    let orig = transparent::original_dst(client).context("SO_ORIGINAL_DST")?;
    client
        .write_all(format!("orig={orig}\n").as_bytes())
        .await?;
    let local = client.local_addr()?;
    if orig == SocketAddr::new(local.ip().to_canonical(), local.port()) {
        bail!("not redirected: connected to the proxy itself");
    }
    // Both directions go where the client was going; the proxy's own
    // connections are never redirected, so the inbound side's reach the
    // application directly.
    let target = orig;
    if direction == Direction::Inbound && target.ip().to_canonical().is_loopback() {
        bail!("refusing an inbound connection to loopback");
    }
    let mut upstream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {target}"))?;
    strait_proxy::forward::splice(client, &mut upstream)
        .await
        .1?;
    Ok(())
}

async fn serve(listen: &str, message: &str, out: fn(&str)) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    out("ready\n");
    let reply = format!("{message}\n");
    loop {
        let (mut tcp, _) = listener.accept().await.context("accept")?;
        let reply = reply.clone();
        tokio::spawn(async move {
            let _ = tcp.write_all(reply.as_bytes()).await;
            let _ = tcp.shutdown().await;
        });
    }
}

async fn connect(addr: &str, out: fn(&str)) -> Result<()> {
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad address {addr}"))?;
    let received = tokio::time::timeout(Duration::from_secs(5), async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let mut received = String::new();
        tcp.read_to_string(&mut received)
            .await
            .context("read to end")?;
        anyhow::Ok(received)
    })
    .await
    .with_context(|| format!("{addr} did not close within 5 s"))??;
    out(&received);
    Ok(())
}

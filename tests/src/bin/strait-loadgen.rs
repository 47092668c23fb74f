//! A small load generator for Strait's benchmarks.
//!
//! `strait-loadgen echo ADDR` serves TCP echo on ADDR.
//! `strait-loadgen http-server ADDR` serves HTTP/1.1 and HTTP/2 (`ok`).
//! `strait-loadgen http ADDR --rate R --seconds S --connections C
//! [--host H]` sends keep-alive HTTP/1.1 GETs at a fixed total rate and
//! prints latency percentiles like `rr`.
//! `strait-loadgen idle ADDR --connections N --seconds S` opens N
//! keep-alive connections, sends one request on each, and holds them idle.
//! `strait-loadgen rr ADDR --rate R --seconds S --size B --connections C`
//! sends fixed-size requests at a fixed total rate over C connections,
//! waits for each echo, and prints latency percentiles measured from each
//! request's send (the rate is far below saturation, so queueing behind a
//! late request is not hidden).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> anyhow::Result<T> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} needs a value")),
        None => Ok(default),
    }
}

async fn echo(addr: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await?;
    loop {
        let (mut s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// One request/response on a load-generator connection.
#[derive(Clone)]
enum Exchange {
    /// `size` bytes out, the same `size` bytes back (TCP echo).
    Echo(usize),
    /// A keep-alive `GET /` for `host`, its response read whole.
    Http(String),
}

/// Requests at a fixed total `rate` for `seconds` over `conns` connections
/// (each its share, staggered), each timed from its send; prints the
/// latency percentiles.
async fn fixed_rate(
    addr: SocketAddr,
    rate: u64,
    seconds: u64,
    conns: u64,
    exchange: Exchange,
) -> anyhow::Result<()> {
    let per_conn = Duration::from_secs_f64(conns as f64 / rate as f64);
    let total = rate * seconds / conns;
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        let offset = per_conn.mul_f64(c as f64 / conns as f64);
        let exchange = exchange.clone();
        tasks.push(tokio::spawn(async move {
            let (req, mut resp) = match &exchange {
                Exchange::Echo(size) => (vec![0x5a; *size], vec![0; *size]),
                Exchange::Http(host) => (
                    format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n").into_bytes(),
                    Vec::new(),
                ),
            };
            let mut lat = Vec::with_capacity(total as usize);
            for i in 0..total {
                let due = start + offset + per_conn * i as u32;
                tokio::time::sleep_until(due.into()).await;
                // Timed from the send, not the schedule: tokio's timer has
                // millisecond granularity, which would swamp the figures.
                let sent = Instant::now();
                s.write_all(&req).await?;
                match exchange {
                    Exchange::Echo(_) => {
                        s.read_exact(&mut resp).await?;
                    }
                    Exchange::Http(_) => read_response(&mut s, &mut resp).await?,
                }
                lat.push(sent.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    report(all, start)
}

async fn http_server(addr: SocketAddr) -> anyhow::Result<()> {
    use http_body_util::Full;
    let l = TcpListener::bind(addr).await?;
    loop {
        let (s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
        });
    }
}

/// Reads one HTTP/1.1 response with a content-length body.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])?.to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let total = end + 4 + len;
            while buf.len() < total {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    bail!("connection closed mid-response");
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..total);
            return Ok(());
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn idle(addr: SocketAddr, conns: u64, seconds: u64, host: String) -> anyhow::Result<()> {
    // Idle keep-alive connections, as clients leave them: one request
    // each, then nothing.
    let mut held = Vec::new();
    let req = format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n").into_bytes();
    for _ in 0..conns {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        s.write_all(&req).await?;
        read_response(&mut s, &mut Vec::new()).await?;
        held.push(s);
    }
    println!("{{\"idle_connections\": {}}}", held.len());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    Ok(())
}

fn report(mut all: Vec<Duration>, start: Instant) -> anyhow::Result<()> {
    if all.is_empty() {
        bail!("no samples");
    }
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e6;
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{{\"requests\": {}, \"rate\": {:.0}, \"p50_us\": {:.1}, \"p90_us\": {:.1}, \"p99_us\": {:.1}, \"max_us\": {:.1}}}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        all.last().map_or(0.0, |d| d.as_secs_f64() * 1e6)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr: SocketAddr = args
        .get(1)
        .context("usage: strait-loadgen echo|rr ADDR [...]")?
        .parse()
        .context("ADDR must be ip:port")?;
    match args.first().map(String::as_str) {
        Some("echo") => echo(addr).await,
        Some("rr") => {
            fixed_rate(
                addr,
                arg(&args, "--rate", 1000)?,
                arg(&args, "--seconds", 5)?,
                arg(&args, "--connections", 4)?,
                Exchange::Echo(arg(&args, "--size", 64)?),
            )
            .await
        }
        Some("http-server") => http_server(addr).await,
        Some("http") => {
            fixed_rate(
                addr,
                arg(&args, "--rate", 1000)?,
                arg(&args, "--seconds", 5)?,
                arg(&args, "--connections", 4)?,
                Exchange::Http(arg(&args, "--host", "bench".to_string())?),
            )
            .await
        }
        Some("idle") => {
            idle(
                addr,
                arg(&args, "--connections", 10_000)?,
                arg(&args, "--seconds", 10)?,
                arg(&args, "--host", "bench".to_string())?,
            )
            .await
        }
        _ => bail!("usage: strait-loadgen echo|rr|http-server|http|idle ADDR [...]"),
    }
}

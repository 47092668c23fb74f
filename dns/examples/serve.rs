//! Serves a synthetic `clusterset.local` zone, for benchmarks (`bench/dns.sh`)
//! and manual testing.
//!
//! ```text
//! cargo run --release -p strait-dns --example serve -- \
//!     [--services N] [--listen ADDR] [--threads T] [--write-zone PATH]
//! ```
//!
//! The zone holds `N` services (default 10000) named
//! `svc-<i>.ns-<i % 100>.svc.clusterset.local`, each with one IPv4 VIP
//! (`10.<i / 65536>.<i / 256 % 256>.<i % 256>`) and one TCP port named `http`
//! (80), so `_http._tcp.svc-<i>.ns-<i % 100>.svc.clusterset.local` has an SRV
//! record. The SOA serial is fixed (1), so two runs build the same zone.
//!
//! * `--listen ADDR` (default `127.0.0.1:5353`): UDP and TCP address.
//! * `--threads T` (default 1): tokio worker threads.
//! * `--write-zone PATH`: write the zone as an RFC 1035 master file to PATH
//!   (`-` for stdout) and exit instead of serving.
//!
//! Serves until interrupted (Ctrl-C or SIGTERM).

use std::error::Error;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Instant;

use prometheus_client::registry::Registry;
use strait_dns::{
    DnsMetrics, DnsServer, PortProtocol, ServiceKind, ServicePort, ServiceRecord, Zone, ZoneHandle,
};

const USAGE: &str =
    "usage: serve [--services N] [--listen ADDR] [--threads T] [--write-zone PATH|-]";

/// The SOA serial of the synthetic zone.
const SERIAL: u32 = 1;
/// Record TTL of the synthetic zone, in seconds.
const TTL: u32 = 30;

struct Options {
    services: u32,
    listen: SocketAddr,
    threads: usize,
    write_zone: Option<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        services: 10_000,
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 5353)),
        threads: 1,
        write_zone: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_string());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let invalid = |e: &dyn std::fmt::Display| format!("invalid {flag} {value:?}: {e}");
        match flag.as_str() {
            "--services" => options.services = value.parse().map_err(|e| invalid(&e))?,
            "--listen" => options.listen = value.parse().map_err(|e| invalid(&e))?,
            "--threads" => {
                options.threads = value.parse().map_err(|e| invalid(&e))?;
                if options.threads == 0 {
                    return Err(invalid(&"at least one thread"));
                }
            }
            "--write-zone" => options.write_zone = Some(value),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(options)
}

/// The `i`th synthetic service.
fn service(i: u32) -> ServiceRecord {
    let [_, b, c, d] = i.to_be_bytes();
    ServiceRecord {
        namespace: format!("ns-{}", i % 100),
        name: format!("svc-{i}"),
        kind: ServiceKind::ClusterSetIp,
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, b, c, d))],
        ports: vec![ServicePort {
            name: "http".to_string(),
            port: 80,
            protocol: PortProtocol::Tcp,
        }],
        endpoints: vec![],
    }
}

fn run(options: Options) -> Result<(), Box<dyn Error>> {
    let services: Vec<ServiceRecord> = (0..options.services).map(service).collect();
    let start = Instant::now();
    let zone = Zone::build_with_serial("clusterset.local", &services, TTL, SERIAL)?;
    let built = start.elapsed();

    if let Some(path) = &options.write_zone {
        let text = zone.to_master_file();
        if path == "-" {
            print!("{text}");
        } else {
            std::fs::write(path, text)?;
            eprintln!("wrote {} records to {path}", zone.record_count());
        }
        return Ok(());
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let records = zone.record_count();
        let start = Instant::now();
        let handle = ZoneHandle::new(zone);
        let precomputed = start.elapsed();
        let metrics = DnsMetrics::register(&mut Registry::default());
        let server = DnsServer::bind(options.listen, handle, metrics).await?;
        println!(
            "serving {} services ({records} records, zone built in {} ms, answers precomputed in {} ms) on {} with {} thread(s)",
            options.services,
            built.as_millis(),
            precomputed.as_millis(),
            server.local_addr(),
            options.threads
        );
        tokio::signal::ctrl_c().await?;
        server.shutdown().await;
        Ok(())
    })
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("serve: {error}");
            ExitCode::FAILURE
        }
    }
}

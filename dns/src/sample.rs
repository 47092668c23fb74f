//! A small zone with every kind of answer, shared by the tests, the fuzz
//! target and the examples so that they exercise the same shapes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{HeadlessEndpoint, PortProtocol, ServiceKind, ServicePort, ServiceRecord};

/// Services giving A and AAAA answers, SRV answers with additional records
/// (an unnamed UDP port among them), headless endpoint names (with and
/// without hostnames), an answer too big for a 512-octet UDP message
/// (`big.default`), and empty non-terminals.
pub fn every_kind_of_answer() -> Vec<ServiceRecord> {
    let http = ServicePort {
        name: "http".into(),
        port: 80,
        protocol: PortProtocol::Tcp,
    };
    vec![
        ServiceRecord {
            namespace: "default".into(),
            name: "web".into(),
            kind: ServiceKind::ClusterSetIp,
            ips: vec![
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            ],
            ports: vec![
                http.clone(),
                ServicePort {
                    name: String::new(),
                    port: 8080,
                    protocol: PortProtocol::Udp,
                },
            ],
            endpoints: vec![],
        },
        ServiceRecord {
            namespace: "default".into(),
            name: "big".into(),
            kind: ServiceKind::ClusterSetIp,
            ips: (0..100u8)
                .map(|i| IpAddr::V4(Ipv4Addr::new(10, 2, 0, i)))
                .collect(),
            ports: vec![http.clone()],
            endpoints: vec![],
        },
        ServiceRecord {
            namespace: "prod".into(),
            name: "db".into(),
            kind: ServiceKind::Headless,
            ips: vec![],
            ports: vec![http],
            endpoints: (0..20u8)
                .map(|i| HeadlessEndpoint {
                    cluster: "east".into(),
                    hostname: (i == 0).then(|| "db-0".to_string()),
                    ips: vec![IpAddr::V4(Ipv4Addr::new(10, 1, 0, i))],
                })
                .collect(),
        },
    ]
}

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

use super::*;
use crate::{Zone, ZoneHandle};

fn encoded(registry: &Registry) -> String {
    let mut text = String::new();
    encode(&mut text, registry).expect("registry encodes");
    text
}

#[test]
fn metric_names_are_exact() {
    let mut registry = Registry::default();
    let metrics = DnsMetrics::register(&mut registry);
    metrics.record_query(
        Some(RecordType::A),
        ResponseCode::NoError,
        Duration::from_micros(20),
    );
    metrics.record_query(
        Some(RecordType::SRV),
        ResponseCode::NXDomain,
        Duration::from_millis(2),
    );
    metrics.record_query(None, ResponseCode::FormErr, Duration::from_micros(1));
    metrics.record_zone(17, UNIX_EPOCH + Duration::from_secs(1_700_000_000));

    let text = encoded(&registry);
    for line in [
        "# TYPE strait_dns_queries counter",
        "strait_dns_queries_total{type=\"A\",rcode=\"noerror\"} 1",
        "strait_dns_queries_total{type=\"SRV\",rcode=\"nxdomain\"} 1",
        "strait_dns_queries_total{type=\"other\",rcode=\"formerr\"} 1",
        "# TYPE strait_dns_query_duration_seconds histogram",
        "strait_dns_query_duration_seconds_bucket{le=\"0.00001\"} 1",
        "strait_dns_query_duration_seconds_bucket{le=\"0.1\"} 3",
        "strait_dns_query_duration_seconds_count 3",
        "# TYPE strait_dns_zone_records gauge",
        "strait_dns_zone_records 17",
        "# TYPE strait_dns_zone_last_update_timestamp_seconds gauge",
        "strait_dns_zone_last_update_timestamp_seconds 1700000000.0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}

#[test]
fn labels_are_bounded() {
    assert_eq!(type_label(Some(RecordType::AAAA)), "AAAA");
    assert_eq!(type_label(Some(RecordType::ANY)), "ANY");
    assert_eq!(type_label(Some(RecordType::MX)), "other");
    assert_eq!(type_label(Some(RecordType::AXFR)), "other");
    assert_eq!(type_label(None), "other");
    assert_eq!(rcode_label(ResponseCode::Refused), "refused");
    assert_eq!(rcode_label(ResponseCode::NotImp), "notimp");
    assert_eq!(rcode_label(ResponseCode::ServFail), "servfail");
    assert_eq!(rcode_label(ResponseCode::BADVERS), "badvers");
    assert_eq!(rcode_label(ResponseCode::YXDomain), "other");
    assert_eq!(rcode_label(ResponseCode::Unknown(3000)), "other");
}

#[test]
fn zone_handle_reports_zone_gauges() {
    let mut registry = Registry::default();
    let metrics = DnsMetrics::register(&mut registry);
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after epoch")
        .as_secs_f64();

    let zone = Zone::build("clusterset.local", &[], 30).expect("zone builds");
    let handle = ZoneHandle::with_metrics(zone, metrics.clone());
    assert_eq!(metrics.zone_records.get(), 3);
    assert!(metrics.zone_last_update.get() >= before.floor());

    let services = [crate::ServiceRecord {
        namespace: "ns".into(),
        name: "svc".into(),
        kind: crate::ServiceKind::ClusterSetIp,
        endpoints: Vec::new(),
        ips: vec!["10.0.0.1".parse().expect("ip")],
        ports: vec![],
    }];
    handle.publish(Zone::build("clusterset.local", &services, 30).expect("zone builds"));
    assert_eq!(metrics.zone_records.get(), 4);
    assert!(encoded(&registry)
        .lines()
        .any(|l| l == "strait_dns_zone_records 4"));

    // Later attachments are ignored.
    let mut other_registry = Registry::default();
    let other = DnsMetrics::register(&mut other_registry);
    handle.attach_metrics(&other);
    assert_eq!(other.zone_records.get(), 0);
}

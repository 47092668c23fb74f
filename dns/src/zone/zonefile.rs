//! [`Zone::to_master_file`]: the snapshot as an RFC 1035 master file, so that
//! another server (e.g. Knot DNS in `bench/dns.sh`) can serve exactly the
//! same records; and [`Zone::owners`], the read-only walk over every name
//! that both the master file and the server's precomputed answers
//! ([`crate::Responder`]) are built from.

use std::fmt::Write as _;

use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

use super::Zone;

impl Zone {
    /// Every name of the zone with all its records (none for an empty
    /// non-terminal), in no particular order.
    pub(crate) fn owners(&self) -> impl Iterator<Item = (&LowerName, &[Record])> {
        self.nodes
            .iter()
            .map(|(name, node)| (name, node.all.as_slice()))
    }

    /// Every record of this snapshot as an RFC 1035 master file.
    ///
    /// The SOA comes first, then every other record sorted by owner name
    /// (canonical order is not needed, only determinism), one record per
    /// line with a fully qualified owner, its TTL and class `IN`. A, AAAA,
    /// NS, CNAME, PTR, SOA, SRV and TXT are written in their usual
    /// presentation format; any other type in the RFC 3597 generic form
    /// (`TYPE<n> \# <len> <hex>`). Empty non-terminals have no records and
    /// so no lines; a server loading the file derives them itself.
    pub fn to_master_file(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "; {origin} serial {serial}, {records} records, written by strait-dns",
            origin = self.origin,
            serial = self.serial,
            records = self.record_count,
        );
        let _ = writeln!(out, "$ORIGIN {}", Name::from(&self.origin).to_ascii());

        let mut owners: Vec<_> = self.owners().filter(|(_, r)| !r.is_empty()).collect();
        // Canonical (RFC 4034) order: the apex sorts first.
        owners.sort_by_key(|(name, _)| *name);
        let records = owners.iter().flat_map(|(_, records)| records.iter());
        let (soa, rest): (Vec<&Record>, Vec<&Record>) =
            records.partition(|r| r.record_type() == RecordType::SOA);
        for record in soa.into_iter().chain(rest) {
            write_record(&mut out, record);
        }
        out
    }
}

fn write_record(out: &mut String, record: &Record) {
    let owner = record.name.to_ascii();
    let ttl = record.ttl;
    let _ = match &record.data {
        RData::A(a) => writeln!(out, "{owner} {ttl} IN A {}", a.0),
        RData::AAAA(aaaa) => writeln!(out, "{owner} {ttl} IN AAAA {}", aaaa.0),
        RData::NS(ns) => writeln!(out, "{owner} {ttl} IN NS {}", ns.0.to_ascii()),
        RData::CNAME(cname) => writeln!(out, "{owner} {ttl} IN CNAME {}", cname.0.to_ascii()),
        RData::PTR(ptr) => writeln!(out, "{owner} {ttl} IN PTR {}", ptr.0.to_ascii()),
        RData::SOA(soa) => writeln!(
            out,
            "{owner} {ttl} IN SOA {} {} {} {} {} {} {}",
            soa.mname.to_ascii(),
            soa.rname.to_ascii(),
            soa.serial,
            soa.refresh,
            soa.retry,
            soa.expire,
            soa.minimum,
        ),
        RData::SRV(srv) => writeln!(
            out,
            "{owner} {ttl} IN SRV {} {} {} {}",
            srv.priority,
            srv.weight,
            srv.port,
            srv.target.to_ascii(),
        ),
        RData::TXT(txt) => {
            let _ = write!(out, "{owner} {ttl} IN TXT");
            for string in &txt.txt_data {
                out.push(' ');
                quote(out, string);
            }
            writeln!(out)
        }
        other => {
            let mut wire = Vec::new();
            let mut encoder = BinEncoder::new(&mut wire);
            match other.emit(&mut encoder) {
                Ok(()) => {
                    let _ = write!(
                        out,
                        "{owner} {ttl} IN TYPE{} \\# {}",
                        u16::from(record.record_type()),
                        wire.len()
                    );
                    if !wire.is_empty() {
                        out.push(' ');
                        for byte in &wire {
                            let _ = write!(out, "{byte:02x}");
                        }
                    }
                    writeln!(out)
                }
                // Only pseudo-records (OPT, update placeholders) cannot be
                // encoded, and a zone never holds them.
                Err(error) => writeln!(out, "; {owner} {ttl} IN {}: {error}", record.record_type()),
            }
        }
    };
}

/// Writes `bytes` as a quoted `<character-string>`: `"` and `\` escaped with
/// a backslash, anything outside printable ASCII as `\DDD`.
fn quote(out: &mut String, bytes: &[u8]) {
    out.push('"');
    for &byte in bytes {
        match byte {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(byte));
            }
            0x20..=0x7e => out.push(char::from(byte)),
            _ => {
                let _ = write!(out, "\\{byte:03}");
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use hickory_proto::rr::rdata::TXT;
    use hickory_proto::serialize::txt::Parser;
    use std::collections::BTreeSet;

    use super::*;
    use crate::ServiceRecord;

    fn services() -> Vec<ServiceRecord> {
        crate::sample::every_kind_of_answer()
    }

    /// Every record of `zone` as comparable text (hickory's presentation,
    /// TTL included).
    fn zone_records(zone: &Zone) -> BTreeSet<String> {
        zone.owners()
            .flat_map(|(_, records)| records.iter())
            .map(Record::to_string)
            .collect()
    }

    #[test]
    fn master_file_parses_back_to_the_same_records() {
        let zone = Zone::build_with_serial("clusterset.local", &services(), 30, 7).expect("zone");
        let text = zone.to_master_file();

        let first = text
            .lines()
            .find(|l| !l.starts_with(';') && !l.starts_with('$'))
            .expect("a record line");
        assert!(
            first.starts_with("clusterset.local. 30 IN SOA ns.dns.clusterset.local. hostmaster.clusterset.local. 7 "),
            "{first}"
        );
        assert!(
            text.contains("dns-version.clusterset.local. 30 IN TXT \"1.0.0\"\n"),
            "{text}"
        );
        assert!(text.contains(
            "_http._tcp.db.prod.svc.clusterset.local. 30 IN SRV 0 100 80 db-0.east.db.prod.svc.clusterset.local.\n"
        ), "{text}");

        let (origin, rrsets) = Parser::new(text.as_str(), None, None)
            .parse()
            .expect("master file parses");
        assert_eq!(origin.to_ascii(), "clusterset.local.");
        let parsed: BTreeSet<String> = rrsets
            .values()
            .flat_map(|set| set.records_without_rrsigs())
            .map(Record::to_string)
            .collect();
        assert_eq!(parsed, zone_records(&zone));
        assert_eq!(parsed.len(), zone.record_count());
    }

    #[test]
    fn other_types_use_the_generic_syntax_and_strings_are_escaped() {
        let owner = Name::from_ascii("x.clusterset.local.").expect("name");
        let mut out = String::new();
        write_record(
            &mut out,
            &Record::from_rdata(
                owner.clone(),
                5,
                RData::TXT(TXT::from_bytes(vec![&b"a \"q\" \\ \x01\xff"[..], b""])),
            ),
        );
        assert_eq!(
            out,
            "x.clusterset.local. 5 IN TXT \"a \\\"q\\\" \\\\ \\001\\255\" \"\"\n"
        );

        out.clear();
        let unknown = RData::Unknown {
            code: RecordType::Unknown(65_280),
            rdata: hickory_proto::rr::rdata::NULL::with(vec![0xde, 0xad]),
        };
        write_record(&mut out, &Record::from_rdata(owner, 5, unknown));
        assert_eq!(out, "x.clusterset.local. 5 IN TYPE65280 \\# 2 dead\n");
    }
}

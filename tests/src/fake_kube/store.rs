//! The stored objects, the global resourceVersion, the event history that
//! watches replay and lists page through, and the fan-out to open watches.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::resources::RESOURCES;
use super::status::{ApiError, ApiResult};

/// Where an object lives: its kind (index into `RESOURCES`), namespace
/// ("" when cluster-scoped) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ObjKey {
    /// Index into `RESOURCES`.
    pub rt: usize,
    /// Namespace, "" for cluster-scoped kinds.
    pub ns: String,
    /// Name.
    pub name: String,
}

/// The type of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Deleted.
    Deleted,
}

/// One change, as kept in the history and sent to watches.
#[derive(Debug)]
pub(crate) struct Event {
    /// The resourceVersion the change made.
    pub rv: u64,
    /// The object changed.
    pub key: ObjKey,
    /// What happened.
    pub typ: EventType,
    /// The object before (None when added).
    pub old: Option<Value>,
    /// The object after (for a deletion: the last state, with the
    /// deletion's resourceVersion).
    pub new: Value,
}

/// 10.96.0.0/12, the default service CIDR.
const SERVICE_NET: u32 = 0x0A60_0000;
const SERVICE_NET_SIZE: u32 = 1 << 20;

/// All state of one fake cluster.
pub(crate) struct Store {
    rv: u64,
    compacted: u64,
    objects: BTreeMap<ObjKey, Value>,
    history: Vec<Arc<Event>>,
    watchers: Vec<mpsc::UnboundedSender<Arc<Event>>>,
    ips: BTreeSet<u32>,
    next_ip: u32,
    uids: u64,
    seed: u64,
    /// Requests counted by (verb, plural).
    pub requests: BTreeMap<(String, String), u64>,
}

/// Now, as a Kubernetes timestamp (RFC 3339, whole seconds, UTC).
pub(crate) fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl Store {
    /// An empty cluster.
    pub fn new() -> Self {
        use std::hash::{BuildHasher, RandomState};
        Self {
            rv: 1,
            compacted: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            watchers: Vec::new(),
            ips: BTreeSet::new(),
            next_ip: 10,
            uids: 0,
            seed: RandomState::new().hash_one(std::process::id()),
            requests: BTreeMap::new(),
        }
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// A fresh uid, shaped like a UUID.
    pub fn new_uid(&mut self) -> String {
        self.uids += 1;
        let a = self.seed ^ self.uids.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let b = self.uids;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0xfff,
            b & 0xffff_ffff_ffff
        )
    }

    /// A short random-looking suffix for `generateName`.
    pub fn name_suffix(&mut self) -> String {
        self.uids += 1;
        let mut x = self.seed ^ self.uids.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let alphabet = b"bcdfghjklmnpqrstvwxz2456789";
        (0..5)
            .map(|_| {
                let c = alphabet[(x % alphabet.len() as u64) as usize] as char;
                x /= alphabet.len() as u64;
                c
            })
            .collect()
    }

    /// One object.
    pub fn get(&self, key: &ObjKey) -> Option<&Value> {
        self.objects.get(key)
    }

    /// The current objects of a kind, in one namespace or all, in key order.
    pub fn list(&self, rt: usize, ns: Option<&str>) -> Vec<(ObjKey, Value)> {
        self.objects
            .iter()
            .filter(|(k, _)| k.rt == rt && ns.is_none_or(|n| k.ns == n))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The objects of a kind as they were at resourceVersion `at`, rebuilt
    /// by undoing the history; 410 Expired if `at` was compacted away.
    pub fn snapshot(&self, rt: usize, at: u64) -> ApiResult<BTreeMap<ObjKey, Value>> {
        if at < self.compacted {
            return Err(ApiError::expired(format!(
                "too old resource version: {at} ({})",
                self.compacted
            )));
        }
        let mut objs: BTreeMap<ObjKey, Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.rt == rt)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ev in self.history.iter().rev().take_while(|e| e.rv > at) {
            if ev.key.rt != rt {
                continue;
            }
            match &ev.old {
                None => objs.remove(&ev.key),
                Some(old) => objs.insert(ev.key.clone(), old.clone()),
            };
        }
        Ok(objs)
    }

    /// The history after `from`, for a watch to replay; 410 Expired if
    /// that part of history was compacted away.
    pub fn since(&self, from: u64) -> ApiResult<Vec<Arc<Event>>> {
        if from < self.compacted {
            return Err(ApiError::expired(format!(
                "too old resource version: {from} ({})",
                self.compacted
            )));
        }
        let start = self.history.partition_point(|e| e.rv <= from);
        Ok(self.history[start..].to_vec())
    }

    /// A channel of every change from now on, until `drop_watches`.
    pub fn subscribe(&mut self) -> mpsc::UnboundedReceiver<Arc<Event>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push(tx);
        rx
    }

    /// Ends every watch.
    pub fn drop_watches(&mut self) {
        self.watchers.clear();
    }

    /// Forgets the history. The resourceVersion moves on by one first, so
    /// that every version handed out so far is now too old to watch from.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.compacted = self.rv;
        self.history.clear();
    }

    fn emit(&mut self, ev: Event) {
        let ev = Arc::new(ev);
        self.history.push(ev.clone());
        self.watchers.retain(|w| w.send(ev.clone()).is_ok());
    }

    /// Stores an object (created or changed) under a new resourceVersion
    /// and tells the watches; returns it as stored.
    pub fn write(&mut self, key: ObjKey, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let old = self.objects.insert(key.clone(), obj.clone());
        let typ = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.emit(Event {
            rv: self.rv,
            key,
            typ,
            old,
            new: obj.clone(),
        });
        obj
    }

    /// Deletes an object, then (like the garbage collector and the
    /// namespace controller, but at once) what it owns or contains.
    pub fn delete(&mut self, key: &ObjKey) -> Option<Value> {
        let old = self.objects.remove(key)?;
        self.rv += 1;
        let mut last = old.clone();
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.emit(Event {
            rv: self.rv,
            key: key.clone(),
            typ: EventType::Deleted,
            old: Some(old.clone()),
            new: last.clone(),
        });
        if RESOURCES[key.rt].plural == "services" {
            if let Some(ip) = old.pointer("/spec/clusterIP").and_then(Value::as_str) {
                self.free_ip(ip);
            }
        }
        if RESOURCES[key.rt].plural == "namespaces" && RESOURCES[key.rt].group.is_empty() {
            let inside: Vec<ObjKey> = self
                .objects
                .keys()
                .filter(|k| RESOURCES[k.rt].namespaced && k.ns == key.name)
                .cloned()
                .collect();
            for k in inside {
                self.delete(&k);
            }
        }
        if let Some(uid) = old.pointer("/metadata/uid").and_then(Value::as_str) {
            self.collect_dependents(uid);
        }
        Some(last)
    }

    /// Background cascading deletion: dependents left without any living
    /// owner go; those with another living owner lose the dangling reference.
    fn collect_dependents(&mut self, uid: &str) {
        let owned_by = |v: &Value, uid: &str| {
            v.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
        };
        let dependents: Vec<ObjKey> = self
            .objects
            .iter()
            .filter(|(_, v)| owned_by(v, uid))
            .map(|(k, _)| k.clone())
            .collect();
        for k in dependents {
            let Some(mut obj) = self.objects.get(&k).cloned() else {
                continue;
            };
            let Some(refs) = obj["metadata"]["ownerReferences"].as_array_mut() else {
                continue;
            };
            refs.retain(|r| r["uid"] != uid);
            let alive = refs.iter().any(|r| {
                let u = r["uid"].as_str().unwrap_or_default();
                self.objects
                    .values()
                    .any(|o| o.pointer("/metadata/uid").and_then(Value::as_str) == Some(u))
            });
            if alive {
                self.write(k, obj);
            } else {
                self.delete(&k);
            }
        }
    }

    /// Allocates a ClusterIP: the one asked for if free and in range, else
    /// the next free one.
    pub fn allocate_ip(&mut self, requested: Option<&str>) -> Result<String, String> {
        if let Some(req) = requested {
            let ip: std::net::Ipv4Addr = req
                .parse()
                .map_err(|_| format!("spec.clusterIP: Invalid value: \"{req}\""))?;
            let n = u32::from(ip);
            if n & !(SERVICE_NET_SIZE - 1) != SERVICE_NET {
                return Err(format!(
                    "spec.clusterIP: Invalid value: \"{req}\": provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12"
                ));
            }
            if !self.ips.insert(n) {
                return Err(format!(
                    "spec.clusterIP: Invalid value: \"{req}\": provided IP is already allocated"
                ));
            }
            return Ok(req.to_string());
        }
        for _ in 0..SERVICE_NET_SIZE {
            let off = self.next_ip;
            self.next_ip = if off + 2 >= SERVICE_NET_SIZE {
                10
            } else {
                off + 1
            };
            let n = SERVICE_NET + off;
            if self.ips.insert(n) {
                return Ok(std::net::Ipv4Addr::from(n).to_string());
            }
        }
        Err("spec.clusterIP: Internal error: range is full".into())
    }

    fn free_ip(&mut self, ip: &str) {
        if let Ok(ip) = ip.parse::<std::net::Ipv4Addr>() {
            self.ips.remove(&u32::from(ip));
        }
    }
}

//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Simplifications: maps are granular (each key owned on its own), every
//! list is atomic (owned and replaced whole: `ports`, `containers`,
//! `conditions`, `ownerReferences`...), and strategic merge keys are not
//! used. The stored FieldsV1 therefore has the real shape for maps
//! (`{"f:spec":{"f:selector":{"f:app":{}}}}`) and lists appear as leaves
//! (`{"f:spec":{"f:ports":{}}}`).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// A field path, as object keys.
pub(crate) type Path = Vec<String>;

/// A set of fields, as a tree; a node without children is an owned leaf.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldSet(BTreeMap<String, FieldSet>);

impl FieldSet {
    /// Adds a leaf.
    pub fn insert(&mut self, path: &[String]) {
        if let Some((first, rest)) = path.split_first() {
            self.0.entry(first.clone()).or_default().insert(rest);
        }
    }

    /// Every leaf.
    pub fn leaves(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.walk(&mut Vec::new(), &mut out);
        out
    }

    fn walk(&self, prefix: &mut Path, out: &mut Vec<Path>) {
        for (k, child) in &self.0 {
            prefix.push(k.clone());
            if child.0.is_empty() {
                out.push(prefix.clone());
            } else {
                child.walk(prefix, out);
            }
            prefix.pop();
        }
    }

    /// Whether there are no leaves.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A leaf equal to `path`, inside it or containing it: the shorter of
    /// the two paths.
    pub fn overlap(&self, path: &[String]) -> Option<Path> {
        let mut node = self;
        for (i, seg) in path.iter().enumerate() {
            match node.0.get(seg) {
                None => return None,
                Some(child) if child.0.is_empty() => return Some(path[..=i].to_vec()),
                Some(child) => node = child,
            }
        }
        Some(path.to_vec())
    }

    /// Removes every leaf equal to, inside or containing `path`.
    pub fn remove_overlapping(&mut self, path: &[String]) {
        let Some((first, rest)) = path.split_first() else {
            self.0.clear();
            return;
        };
        let Some(child) = self.0.get_mut(first) else {
            return;
        };
        if rest.is_empty() || child.0.is_empty() {
            self.0.remove(first);
            return;
        }
        child.remove_overlapping(rest);
        if child.0.is_empty() {
            self.0.remove(first);
        }
    }

    /// The FieldsV1 JSON.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (format!("f:{k}"), v.to_json()))
                .collect(),
        )
    }

    /// Reads FieldsV1 JSON (ignoring the `.` and `k:`/`v:` entries this
    /// fake never writes).
    pub fn from_json(v: &Value) -> Self {
        let mut set = FieldSet::default();
        if let Some(m) = v.as_object() {
            for (k, child) in m {
                if let Some(name) = k.strip_prefix("f:") {
                    set.0.insert(name.to_string(), FieldSet::from_json(child));
                }
            }
        }
        set
    }
}

/// Which part of an object a request may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The whole object.
    All,
    /// Everything but `status` (main resource of a kind with a status
    /// subresource).
    NoStatus,
    /// Only `status` (the status subresource).
    Status,
}

impl Scope {
    /// Keeps of `obj` only the top-level keys this scope may change.
    pub fn allows(self, top: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::NoStatus => top != "status",
            Scope::Status => top == "status",
        }
    }

    /// The managedFields `subresource` value.
    pub fn subresource(self) -> &'static str {
        if self == Scope::Status {
            "status"
        } else {
            ""
        }
    }
}

/// The fields an object sets, within `scope`. Server-owned metadata is
/// left out; of metadata only labels, annotations, ownerReferences and
/// finalizers count.
pub(crate) fn fields_of(obj: &Value, scope: Scope) -> FieldSet {
    let mut set = FieldSet::default();
    let Some(m) = obj.as_object() else {
        return set;
    };
    for (k, v) in m {
        if k == "apiVersion" || k == "kind" || !scope.allows(k) {
            continue;
        }
        let mut path = vec![k.clone()];
        if k == "metadata" {
            for mk in ["labels", "annotations", "ownerReferences", "finalizers"] {
                if let Some(mv) = v.get(mk) {
                    path.push(mk.to_string());
                    walk(mv, &mut path, &mut set);
                    path.pop();
                }
            }
        } else {
            walk(v, &mut path, &mut set);
        }
    }
    set
}

fn walk(v: &Value, path: &mut Path, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                path.push(k.clone());
                walk(c, path, out);
                path.pop();
            }
        }
        _ => out.insert(path),
    }
}

/// The value at a path.
pub(crate) fn get_path<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(obj, |v, k| v.get(k))
}

/// Sets the value at a path, making maps on the way. An empty map does
/// not replace a map already there.
pub(crate) fn set_path(obj: &mut Value, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = obj;
    for k in parents {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        node = node
            .as_object_mut()
            .map(|m| m.entry(k.clone()).or_insert_with(|| json!({})))
            .expect("made an object above");
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
    }
    if let Some(m) = node.as_object_mut() {
        let keep = value.as_object().is_some_and(Map::is_empty)
            && m.get(last).is_some_and(Value::is_object);
        if !keep {
            m.insert(last.clone(), value);
        }
    }
}

/// Removes the value at a path, and maps the removal leaves empty.
pub(crate) fn remove_path(obj: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(m) = obj.as_object_mut() else {
        return;
    };
    if rest.is_empty() {
        m.remove(first);
        return;
    }
    if let Some(child) = m.get_mut(first) {
        remove_path(child, rest);
        if child.as_object().is_some_and(Map::is_empty) {
            m.remove(first);
        }
    }
}

/// `.spec.ports`, as in conflict messages.
pub(crate) fn dotted(path: &[String]) -> String {
    path.iter().map(|p| format!(".{p}")).collect()
}

/// One managedFields entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Managed {
    /// The field manager.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// "" or "status".
    pub subresource: String,
    /// The apiVersion the manager used.
    pub api_version: String,
    /// When the entry last changed.
    pub time: String,
    /// The fields owned.
    pub fields: FieldSet,
}

impl Managed {
    fn same_owner(&self, manager: &str, operation: &str, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }
}

/// The entries stored in an object.
pub(crate) fn read_managed(obj: &Value) -> Vec<Managed> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    let s = |e: &Value, k: &str| e[k].as_str().unwrap_or_default().to_string();
    list.iter()
        .map(|e| Managed {
            manager: s(e, "manager"),
            operation: s(e, "operation"),
            subresource: s(e, "subresource"),
            api_version: s(e, "apiVersion"),
            time: s(e, "time"),
            fields: FieldSet::from_json(&e["fieldsV1"]),
        })
        .collect()
}

/// Stores entries into an object, leaving out those owning nothing.
pub(crate) fn write_managed(obj: &mut Value, entries: &[Managed]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({"manager": e.manager, "operation": e.operation,
                "apiVersion": e.api_version, "time": e.time, "fieldsType": "FieldsV1",
                "fieldsV1": e.fields.to_json()});
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if list.is_empty() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        obj["metadata"]["managedFields"] = Value::Array(list);
    }
}

/// Who is changing what, for the ownership bookkeeping.
pub(crate) struct Writer<'a> {
    /// The field manager.
    pub manager: &'a str,
    /// The part of the object the request may change.
    pub scope: Scope,
    /// The request's apiVersion.
    pub api_version: &'a str,
    /// Now.
    pub time: &'a str,
}

impl Writer<'_> {
    fn entry<'e>(&self, entries: &'e mut Vec<Managed>, operation: &str) -> &'e mut Managed {
        let sub = self.scope.subresource();
        let pos = match entries
            .iter()
            .position(|e| e.same_owner(self.manager, operation, sub))
        {
            Some(p) => p,
            None => {
                entries.push(Managed {
                    manager: self.manager.to_string(),
                    operation: operation.to_string(),
                    subresource: sub.to_string(),
                    api_version: String::new(),
                    time: String::new(),
                    fields: FieldSet::default(),
                });
                entries.len() - 1
            }
        };
        let e = &mut entries[pos];
        e.api_version = self.api_version.to_string();
        e.time = self.time.to_string();
        e
    }

    /// Ownership after a create, update or patch (operation `Update`): the
    /// writer takes every field it changed; fields removed are owned by
    /// no one.
    pub fn record_update(&self, entries: &mut Vec<Managed>, old: Option<&Value>, new: &Value) {
        let null = Value::Null;
        let old = old.unwrap_or(&null);
        let changed: Vec<Path> = fields_of(new, self.scope)
            .leaves()
            .into_iter()
            .filter(|p| get_path(old, p) != get_path(new, p))
            .collect();
        let removed: Vec<Path> = fields_of(old, self.scope)
            .leaves()
            .into_iter()
            .filter(|p| get_path(new, p).is_none())
            .collect();
        if changed.is_empty() && removed.is_empty() {
            return;
        }
        for e in entries.iter_mut() {
            for p in changed.iter().chain(&removed) {
                e.fields.remove_overlapping(p);
            }
        }
        let mine = self.entry(entries, "Update");
        for p in &changed {
            mine.fields.insert(p);
        }
    }

    /// Server-side apply of `applied` onto `current` (`{}`-like when the
    /// object is new). Returns the merged object, or the conflicts as
    /// `(manager, .field.path)` unless `force`.
    pub fn apply(
        &self,
        current: &Value,
        applied: &Value,
        entries: &mut Vec<Managed>,
        force: bool,
    ) -> Result<Value, Vec<(String, String)>> {
        let sub = self.scope.subresource();
        let new_set = fields_of(applied, self.scope);
        let new_leaves = new_set.leaves();
        let mut conflicts: Vec<(usize, Path)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.same_owner(self.manager, "Apply", sub) {
                continue;
            }
            for p in &new_leaves {
                if let Some(r) = e.fields.overlap(p) {
                    let differs = get_path(current, &r) != get_path(applied, &r);
                    if differs && !conflicts.contains(&(i, r.clone())) {
                        conflicts.push((i, r));
                    }
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(conflicts
                .into_iter()
                .map(|(i, p)| (entries[i].manager.clone(), dotted(&p)))
                .collect());
        }
        for (i, p) in &conflicts {
            entries[*i].fields.remove_overlapping(p);
        }
        let old_set = entries
            .iter()
            .find(|e| e.same_owner(self.manager, "Apply", sub))
            .map(|e| e.fields.clone())
            .unwrap_or_default();
        let mut merged = current.clone();
        for p in old_set.leaves() {
            let others_own = entries
                .iter()
                .filter(|e| !e.same_owner(self.manager, "Apply", sub))
                .any(|e| e.fields.overlap(&p).is_some());
            if new_set.overlap(&p).is_none() && !others_own {
                remove_path(&mut merged, &p);
            }
        }
        for p in &new_leaves {
            if let Some(v) = get_path(applied, p) {
                set_path(&mut merged, p, v.clone());
            }
        }
        let mine = self.entry(entries, "Apply");
        mine.fields = new_set;
        Ok(merged)
    }
}

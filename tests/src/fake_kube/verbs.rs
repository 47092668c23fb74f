//! The verbs on stored objects: get, list, create, update, patch (merge,
//! JSON and server-side apply) and delete, with the metadata the server
//! keeps (uid, resourceVersion, generation, managedFields) and the
//! Service ClusterIP defaults.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::apply::{read_managed, write_managed, Managed, Scope, Writer};
use super::resources::{ResourceType, RESOURCES};
use super::selector::Selector;
use super::status::{ApiError, ApiResult};
use super::store::{now, ObjKey, Store};

/// Query parameters.
pub(crate) type Query = HashMap<String, String>;

/// What a request addresses.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// Index into `RESOURCES`.
    pub rt: usize,
    /// The namespace in the path, if any.
    pub ns: Option<String>,
    /// The name in the path, if any.
    pub name: Option<String>,
    /// Whether the path ends in `/status`.
    pub status: bool,
}

impl Target {
    /// The kind.
    pub fn rtype(&self) -> &'static ResourceType {
        &RESOURCES[self.rt]
    }

    fn key(&self, name: &str) -> ObjKey {
        ObjKey {
            rt: self.rt,
            ns: self.ns.clone().unwrap_or_default(),
            name: name.to_string(),
        }
    }

    /// What part of an object this request may change.
    pub fn scope(&self) -> Scope {
        match (self.status, self.rtype().status) {
            (true, _) => Scope::Status,
            (false, true) => Scope::NoStatus,
            (false, false) => Scope::All,
        }
    }
}

fn q<'a>(query: &'a Query, k: &str) -> Option<&'a str> {
    query.get(k).map(String::as_str).filter(|s| !s.is_empty())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn validate_name(rt: &ResourceType, name: &str) -> ApiResult<()> {
    let ok = if rt.plural == "namespaces" {
        is_dns_label(name)
    } else {
        name.len() <= 253 && name.split('.').all(is_dns_label)
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            rt,
            name,
            &format!("metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
        ))
    }
}

/// Checks a request body is an object of the right kind, and fills in
/// `apiVersion`, `kind` and the path's namespace.
fn check_body(t: &Target, mut body: Value) -> ApiResult<Value> {
    let rt = t.rtype();
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    for (field, want) in [
        ("apiVersion", rt.api_version()),
        ("kind", rt.kind.to_string()),
    ] {
        match body.get(field).and_then(Value::as_str) {
            None | Some("") => body[field] = json!(want),
            Some(got) if got == want => {}
            Some(got) => {
                return Err(ApiError::bad_request(format!(
                    "{field} {got:?} does not match the expected {want:?}"
                )))
            }
        }
    }
    if !body.get("metadata").is_some_and(Value::is_object) {
        body["metadata"] = json!({});
    }
    let body_ns = body
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    match (&t.ns, body_ns) {
        (Some(path_ns), Some(ns)) if path_ns != ns => return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        (Some(path_ns), _) => body["metadata"]["namespace"] = json!(path_ns),
        (None, _) => {
            if let Some(m) = body["metadata"].as_object_mut() {
                m.remove("namespace");
            }
        }
    }
    if let Some(name) = &t.name {
        match body.pointer("/metadata/name").and_then(Value::as_str) {
            None | Some("") => body["metadata"]["name"] = json!(name),
            Some(n) if n == name => {}
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )))
            }
        }
    }
    Ok(body)
}

fn manager(query: &Query, user_agent: &str) -> String {
    q(query, "fieldManager")
        .map(str::to_string)
        .unwrap_or_else(|| match user_agent.split('/').next() {
            Some(ua) if !ua.is_empty() => ua.to_string(),
            _ => "unknown".to_string(),
        })
}

/// `GET .../<plural>/<name>`.
pub(crate) fn get(store: &Store, t: &Target, name: &str) -> ApiResult<Value> {
    store
        .get(&t.key(name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(t.rtype(), name))
}

/// `GET .../<plural>`: selectors, `limit`/`continue` pages over the
/// snapshot of the first page, `resourceVersion` with
/// `resourceVersionMatch=Exact`.
pub(crate) fn list(store: &Store, t: &Target, query: &Query) -> ApiResult<Value> {
    let rt = t.rtype();
    let sel = Selector::parse(q(query, "labelSelector"), q(query, "fieldSelector"))
        .map_err(ApiError::bad_request)?;
    let limit = match q(query, "limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        None => 0,
    };
    let parse_rv = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version {s:?}")))
    };
    let (at, after, objects) = if let Some(c) = q(query, "continue") {
        let mut parts = c.splitn(3, '/');
        let (Some(rv), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ApiError::bad_request(format!(
                "invalid continue token {c:?}"
            )));
        };
        let at = parse_rv(rv)?;
        let objects = store.snapshot(t.rt, at).map_err(|_| {
            ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.")
        })?;
        let after = (ns.to_string(), name.to_string());
        (at, Some(after), objects.into_iter().collect::<Vec<_>>())
    } else if let (Some(rv), Some("Exact")) = (
        q(query, "resourceVersion"),
        q(query, "resourceVersionMatch"),
    ) {
        let at = parse_rv(rv)?;
        (at, None, store.snapshot(t.rt, at)?.into_iter().collect())
    } else {
        (store.rv(), None, store.list(t.rt, None))
    };
    let mut items: Vec<Value> = objects
        .into_iter()
        .filter(|(k, _)| t.ns.as_ref().is_none_or(|n| *n == k.ns))
        .filter(|(k, _)| {
            after
                .as_ref()
                .is_none_or(|(ns, name)| (&k.ns, &k.name) > (ns, name))
        })
        .filter(|(_, v)| sel.matches(v))
        .map(|(_, v)| v)
        .collect();
    let mut meta = json!({"resourceVersion": at.to_string()});
    if limit > 0 && items.len() > limit {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let last = &items[limit - 1]["metadata"];
        let token = format!(
            "{at}/{}/{}",
            last["namespace"].as_str().unwrap_or_default(),
            last["name"].as_str().unwrap_or_default()
        );
        meta["continue"] = json!(token);
        meta["remainingItemCount"] = json!(remaining);
    }
    Ok(
        json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
        "metadata": meta, "items": items}),
    )
}

/// Services: default port protocol and targetPort (also applied to
/// server-side apply bodies, so that defaulted lists compare equal).
fn default_ports(obj: &mut Value) {
    if let Some(ports) = obj.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter(|p| p.is_object()) {
            if p.get("protocol").is_none() {
                p["protocol"] = json!("TCP");
            }
            if p.get("targetPort").is_none() {
                if let Some(port) = p.get("port").cloned() {
                    p["targetPort"] = port;
                }
            }
        }
    }
}

/// Services: type, ClusterIP allocation on create, ClusterIP kept (and
/// immutable) on update.
fn default_service(store: &mut Store, obj: &mut Value, old: Option<&Value>) -> ApiResult<()> {
    let rt = &RESOURCES[0];
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !obj.get("spec").is_some_and(Value::is_object) {
        obj["spec"] = json!({});
    }
    default_ports(obj);
    let spec = &mut obj["spec"];
    if spec.get("type").is_none() {
        spec["type"] = json!("ClusterIP");
    }
    if spec.get("sessionAffinity").is_none() {
        spec["sessionAffinity"] = json!("None");
    }
    let asked = spec["clusterIP"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    if let Some(old) = old {
        let old_ip = old
            .pointer("/spec/clusterIP")
            .cloned()
            .unwrap_or(Value::Null);
        match asked {
            None => {
                spec["clusterIP"] = old_ip;
                spec["clusterIPs"] = old
                    .pointer("/spec/clusterIPs")
                    .cloned()
                    .unwrap_or(Value::Null);
            }
            Some(ip) if old_ip.as_str() != Some(ip.as_str()) => {
                return Err(ApiError::invalid(
                    rt,
                    &name,
                    "spec.clusterIP: Invalid value: field is immutable",
                ));
            }
            Some(_) => {}
        }
        return Ok(());
    }
    if spec["type"] == "ExternalName" {
        return Ok(());
    }
    let ip = match asked.as_deref() {
        Some("None") => "None".to_string(),
        other => store
            .allocate_ip(other)
            .map_err(|e| ApiError::invalid(rt, &name, &e))?,
    };
    spec["clusterIP"] = json!(ip);
    spec["clusterIPs"] = json!([ip]);
    if ip != "None" {
        spec["ipFamilies"] = json!(["IPv4"]);
        spec["ipFamilyPolicy"] = json!("SingleStack");
    }
    Ok(())
}

/// Stamps a new object's server-owned metadata and stores it.
fn finish_create(
    store: &mut Store,
    t: &Target,
    key: ObjKey,
    mut obj: Value,
    entries: &[Managed],
) -> ApiResult<Value> {
    let rt = t.rtype();
    validate_name(rt, &key.name)?;
    if store.get(&key).is_some() {
        return Err(ApiError::already_exists(rt, &key.name));
    }
    if let Some(m) = obj["metadata"].as_object_mut() {
        for k in [
            "resourceVersion",
            "deletionTimestamp",
            "managedFields",
            "selfLink",
        ] {
            m.remove(k);
        }
    }
    let uid = store.new_uid();
    let meta = &mut obj["metadata"];
    meta["name"] = json!(key.name);
    meta["uid"] = json!(uid);
    meta["creationTimestamp"] = json!(now());
    meta["generation"] = json!(1);
    if rt.plural == "services" && rt.group.is_empty() {
        default_service(store, &mut obj, None)?;
    }
    if rt.plural == "namespaces" && rt.group.is_empty() {
        obj["status"] = json!({"phase": "Active"});
    }
    if rt.plural == "customresourcedefinitions" {
        // The real server accepts the names and serves the kind at once
        // (the fake serves only the kinds it knows, whatever the CRD says).
        let now = now();
        obj["status"] = json!({"conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "lastTransitionTime": now},
        ], "acceptedNames": obj["spec"]["names"].clone()});
    }
    write_managed(&mut obj, entries);
    Ok(store.write(key, obj))
}

/// `POST .../<plural>`.
pub(crate) fn create(
    store: &mut Store,
    t: &Target,
    query: &Query,
    ua: &str,
    body: Value,
) -> ApiResult<Value> {
    let rt = t.rtype();
    let mut obj = check_body(t, body)?;
    let name = match obj.pointer("/metadata/name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => match obj
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
        {
            Some(g) if !g.is_empty() => format!("{g}{}", store.name_suffix()),
            _ => {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ))
            }
        },
    };
    if rt.status {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }
    let mut entries = Vec::new();
    let (mgr, time) = (manager(query, ua), now());
    let api_version = rt.api_version();
    let writer = Writer {
        manager: &mgr,
        scope: Scope::All,
        api_version: &api_version,
        time: &time,
    };
    writer.record_update(&mut entries, None, &obj);
    let key = t.key(&name);
    finish_create(store, t, key, obj, &entries)
}

fn without_server_fields(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("managedFields");
        m.remove("resourceVersion");
    }
    v
}

fn spec_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

/// Stores a changed object: generation moves when anything but metadata
/// and status changed; nothing is written when nothing changed.
fn commit(
    store: &mut Store,
    key: ObjKey,
    old: &Value,
    mut new: Value,
    entries: &[Managed],
) -> Value {
    if spec_part(&new) != spec_part(old) {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        new["metadata"]["generation"] = json!(generation + 1);
    }
    let owners = |es: &[Managed]| -> Vec<(String, String, String, Value)> {
        es.iter()
            .filter(|e| !e.fields.is_empty())
            .map(|e| {
                (
                    e.manager.clone(),
                    e.operation.clone(),
                    e.subresource.clone(),
                    e.fields.to_json(),
                )
            })
            .collect()
    };
    if without_server_fields(&new) == without_server_fields(old)
        && owners(entries) == owners(&read_managed(old))
    {
        return old.clone();
    }
    write_managed(&mut new, entries);
    store.write(key, new)
}

/// `PUT .../<name>[/status]`, and the end of merge and JSON patches:
/// optimistic concurrency on `metadata.resourceVersion`.
pub(crate) fn update(
    store: &mut Store,
    t: &Target,
    name: &str,
    query: &Query,
    ua: &str,
    body: Value,
) -> ApiResult<Value> {
    let rt = t.rtype();
    let key = t.key(name);
    let old = store
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(rt, name))?;
    let body = check_body(t, body)?;
    let want_rv = body
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !want_rv.is_empty()
        && Some(want_rv)
            != old
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
    {
        return Err(ApiError::conflict(
            rt,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        ));
    }
    let scope = t.scope();
    let mut new = match scope {
        Scope::Status => {
            let mut n = old.clone();
            n["status"] = body.get("status").cloned().unwrap_or(Value::Null);
            n
        }
        Scope::NoStatus | Scope::All => {
            let mut n = body;
            if scope == Scope::NoStatus {
                n["status"] = old.get("status").cloned().unwrap_or(Value::Null);
            }
            for k in [
                "uid",
                "creationTimestamp",
                "generation",
                "managedFields",
                "deletionTimestamp",
            ] {
                n["metadata"][k] = old["metadata"][k].clone();
            }
            n
        }
    };
    if let Some(m) = new.as_object_mut() {
        m.retain(|_, v| !v.is_null());
    }
    if let Some(m) = new["metadata"].as_object_mut() {
        m.retain(|_, v| !v.is_null());
    }
    if rt.plural == "services" && rt.group.is_empty() && scope != Scope::Status {
        default_service(store, &mut new, Some(&old))?;
    }
    let mut entries = read_managed(&old);
    let (mgr, time, api_version) = (manager(query, ua), now(), rt.api_version());
    let writer = Writer {
        manager: &mgr,
        scope,
        api_version: &api_version,
        time: &time,
    };
    writer.record_update(&mut entries, Some(&old), &new);
    Ok(commit(store, key, &old, new, &entries))
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// `PATCH .../<name>[/status]`. Strategic merge patch is treated as a
/// plain JSON merge patch (lists are replaced whole).
pub(crate) fn patch(
    store: &mut Store,
    t: &Target,
    name: &str,
    query: &Query,
    ua: &str,
    content_type: &str,
    body: &[u8],
) -> ApiResult<(u16, Value)> {
    let rt = t.rtype();
    let ct = content_type.split(';').next().unwrap_or_default().trim();
    if ct == "application/apply-patch+yaml" {
        return apply(store, t, name, query, body);
    }
    if !matches!(
        ct,
        "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/json-patch+json"
    ) {
        return Err(ApiError::unsupported_media_type(ct));
    }
    let parsed: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid patch: {e}")))?;
    let old = get(store, t, name)?;
    let mut new = old.clone();
    match ct {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            merge_patch(&mut new, &parsed)
        }
        "application/json-patch+json" => {
            let ops: json_patch::Patch = serde_json::from_value(parsed)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut new, &ops)
                .map_err(|e| ApiError::invalid(rt, name, &format!("JSON patch failed: {e}")))?;
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    }
    Ok((200, update(store, t, name, query, ua, new)?))
}

/// Server-side apply (`application/apply-patch+yaml`, YAML or JSON body).
fn apply(
    store: &mut Store,
    t: &Target,
    name: &str,
    query: &Query,
    body: &[u8],
) -> ApiResult<(u16, Value)> {
    let rt = t.rtype();
    let mgr = q(query, "fieldManager").ok_or_else(|| {
        ApiError::bad_request("PATCH requests with apply must have fieldManager set: fieldManager: Required value: is required for apply patch")
    })?;
    let force = q(query, "force") == Some("true");
    let applied: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::bad_request("apply body is not UTF-8"))?;
            serde_saphyr::from_str(text)
                .map_err(|e| ApiError::bad_request(format!("invalid apply body: {e}")))?
        }
    };
    let mut applied = check_body(t, applied)?;
    if rt.plural == "services" && rt.group.is_empty() {
        default_ports(&mut applied);
    }
    let scope = t.scope();
    let (time, api_version) = (now(), rt.api_version());
    let writer = Writer {
        manager: mgr,
        scope,
        api_version: &api_version,
        time: &time,
    };
    let key = t.key(name);
    let Some(old) = store.get(&key).cloned() else {
        if scope == Scope::Status {
            return Err(ApiError::not_found(rt, name));
        }
        let base = json!({"apiVersion": applied["apiVersion"], "kind": applied["kind"],
            "metadata": {"name": name}});
        let mut base = check_body(t, base)?;
        let mut entries = Vec::new();
        let merged = writer
            .apply(&base, &applied, &mut entries, force)
            .map_err(|c| ApiError::apply_conflicts(rt, name, &c))?;
        base = merged;
        return Ok((201, finish_create(store, t, key, base, &entries)?));
    };
    let mut entries = read_managed(&old);
    let mut merged = writer
        .apply(&old, &applied, &mut entries, force)
        .map_err(|c| ApiError::apply_conflicts(rt, name, &c))?;
    if rt.plural == "services" && rt.group.is_empty() && scope != Scope::Status {
        default_service(store, &mut merged, Some(&old))?;
    }
    Ok((200, commit(store, key, &old, merged, &entries)))
}

/// `DELETE .../<name>`, with `preconditions` from the body.
pub(crate) fn delete(store: &mut Store, t: &Target, name: &str, body: &[u8]) -> ApiResult<Value> {
    let rt = t.rtype();
    let key = t.key(name);
    let old = get(store, t, name)?;
    if !body.is_empty() {
        let opts: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?;
        for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) = opts
                .pointer(&format!("/preconditions/{field}"))
                .and_then(Value::as_str)
            {
                let have = old["metadata"][field].as_str().unwrap_or_default();
                if want != have {
                    return Err(ApiError::conflict(rt, name, &format!(
                        "Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}"
                    )));
                }
            }
        }
    }
    store
        .delete(&key)
        .ok_or_else(|| ApiError::not_found(rt, name))
}

/// `DELETE .../<plural>` with selectors: returns the list deleted.
pub(crate) fn delete_collection(store: &mut Store, t: &Target, query: &Query) -> ApiResult<Value> {
    let rt = t.rtype();
    let sel = Selector::parse(q(query, "labelSelector"), q(query, "fieldSelector"))
        .map_err(ApiError::bad_request)?;
    let keys: Vec<ObjKey> = store
        .list(t.rt, t.ns.as_deref())
        .into_iter()
        .filter(|(_, v)| sel.matches(v))
        .map(|(k, _)| k)
        .collect();
    let items: Vec<Value> = keys.iter().filter_map(|k| store.delete(k)).collect();
    Ok(
        json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(),
        "metadata": {"resourceVersion": store.rv().to_string()}, "items": items}),
    )
}

//! The HTTP layer: routing of API paths, discovery, the verbs, and watch
//! streams (newline-delimited JSON events over a chunked response).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::resources::{self, RESOURCES};
use super::selector::Selector;
use super::status::{ApiError, ApiResult};
use super::store::{Event, EventType, Store};
use super::verbs::{self, Query, Target};

/// State shared by the handlers and the [`super::FakeKube`] handle.
pub(crate) struct Shared {
    /// The cluster.
    pub store: Mutex<Store>,
    /// Bookmark period of watches started from now on, in milliseconds.
    pub bookmark_ms: AtomicU64,
    /// Service account tokens handed out, for TokenReview.
    pub tokens: Mutex<HashMap<String, IssuedToken>>,
}

/// A service account token the fake has issued.
#[derive(Clone, Debug)]
pub(crate) struct IssuedToken {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The audiences it was issued for.
    pub audiences: Vec<String>,
}

/// The API server's own audience, assumed when a review names none.
pub(crate) const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`: authenticated when
/// the token was issued here and not revoked, and issued for one of the
/// audiences asked for (the API server's own when none are); the status
/// names the service account user and the audiences that matched, as the
/// real server does.
fn token_review(shared: &Shared, body: &[u8]) -> ApiResult<(u16, Value)> {
    let review = parse_json(body)?;
    if review["kind"] != "TokenReview" {
        return Err(ApiError::bad_request("expected a TokenReview"));
    }
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let asked: Vec<String> = match review["spec"]["audiences"].as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => vec![API_AUDIENCE.to_string()],
    };
    let issued = shared
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(token)
        .cloned();
    let status = match issued {
        None => json!({"user": {}, "error": "invalid bearer token"}),
        Some(t) => {
            let matched: Vec<&String> = t.audiences.iter().filter(|a| asked.contains(a)).collect();
            if matched.is_empty() {
                json!({"user": {}, "error": format!(
                    "token audiences {:?} is invalid for the target audiences {:?}",
                    t.audiences, asked
                )})
            } else {
                json!({
                    "authenticated": true,
                    "user": {
                        "username": format!("system:serviceaccount:{}:{}", t.namespace, t.service_account),
                        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", t.namespace), "system:authenticated"],
                    },
                    "audiences": matched,
                })
            }
        }
    };
    let mut out = review;
    out["status"] = status;
    if let Some(spec) = out["spec"].as_object_mut() {
        // The real server echoes the spec; keep the token out of logs.
        spec.remove("token");
    }
    Ok((201, out))
}

impl Shared {
    /// Locks the store (a panicked holder does not poison the fake).
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The router: every path goes to one handler.
pub(crate) fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(shared)
}

fn json_response(code: u16, v: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status())
}

/// What a path names.
enum Route {
    Discovery(Value),
    Resource(Target),
}

fn route(path: &str) -> ApiResult<Route> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let discovery = |v: Option<Value>| {
        v.map(Route::Discovery)
            .ok_or_else(|| ApiError::no_route(path))
    };
    match segs.as_slice() {
        ["version"] => Ok(Route::Discovery(resources::version())),
        ["api"] => Ok(Route::Discovery(resources::core_versions())),
        ["apis"] => Ok(Route::Discovery(resources::group_list())),
        ["api", v] => discovery(resources::resource_list("", v)),
        ["apis", g, v] => discovery(resources::resource_list(g, v)),
        ["api", v, rest @ ..] => target("", v, rest, path),
        ["apis", g, v, rest @ ..] => target(g, v, rest, path),
        _ => Err(ApiError::no_route(path)),
    }
}

fn target(group: &str, version: &str, rest: &[&str], path: &str) -> ApiResult<Route> {
    let namespaced_plural =
        |p: &str| resources::find(group, version, p).is_some_and(|i| RESOURCES[i].namespaced);
    let (ns, rest) = if rest.len() >= 3 && rest[0] == "namespaces" && namespaced_plural(rest[2]) {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    let (plural, name, status) = match rest {
        [p] => (*p, None, false),
        [p, n] => (*p, Some(n.to_string()), false),
        [p, n, "status"] => (*p, Some(n.to_string()), true),
        _ => return Err(ApiError::no_route(path)),
    };
    let rt = resources::find(group, version, plural).ok_or_else(|| ApiError::no_route(path))?;
    if (ns.is_some() && !RESOURCES[rt].namespaced) || (status && !RESOURCES[rt].status) {
        return Err(ApiError::no_route(path));
    }
    Ok(Route::Resource(Target {
        rt,
        ns,
        name,
        status,
    }))
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    let query: Query =
        match axum::extract::Query::<HashMap<String, String>>::try_from_uri(&parts.uri) {
            Ok(q) => q.0,
            Err(e) => return error_response(&ApiError::bad_request(format!("query: {e}"))),
        };
    let header_str = |h| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let (ua, ct) = (
        header_str(header::USER_AGENT),
        header_str(header::CONTENT_TYPE),
    );
    if parts.method == Method::POST
        && parts.uri.path() == "/apis/authentication.k8s.io/v1/tokenreviews"
    {
        count(&shared, "create", "tokenreviews");
        return match token_review(&shared, &body) {
            Ok((code, v)) => json_response(code, &v),
            Err(e) => error_response(&e),
        };
    }
    let target = match route(parts.uri.path()) {
        Ok(Route::Discovery(v)) => {
            count(&shared, "discovery", "");
            return json_response(200, &v);
        }
        Ok(Route::Resource(t)) => t,
        Err(e) => return error_response(&e),
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if parts.method == Method::GET && target.name.is_none() && watching {
        count(&shared, "watch", target.rtype().plural);
        return match watch(shared, target, &query) {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
    }
    match dispatch(&shared, &parts.method, &target, &query, ua, ct, &body) {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error_response(&e),
    }
}

fn count(shared: &Shared, verb: &str, plural: &str) {
    *shared
        .lock()
        .requests
        .entry((verb.to_string(), plural.to_string()))
        .or_default() += 1;
}

fn parse_json(body: &[u8]) -> ApiResult<Value> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn dispatch(
    shared: &Shared,
    method: &Method,
    t: &Target,
    query: &Query,
    ua: &str,
    ct: &str,
    body: &Bytes,
) -> ApiResult<(u16, Value)> {
    let plural = t.rtype().plural;
    let all_namespaces = t.rtype().namespaced && t.ns.is_none();
    let verb = match (method.as_str(), &t.name) {
        ("GET", Some(_)) => "get",
        ("GET", None) => "list",
        ("POST", None) if !all_namespaces => "create",
        ("PUT", Some(_)) => "update",
        ("PATCH", Some(_)) => "patch",
        ("DELETE", Some(_)) if !t.status => "delete",
        ("DELETE", None) if !all_namespaces => "deletecollection",
        _ => return Err(ApiError::method_not_allowed()),
    };
    let mut store = shared.lock();
    *store
        .requests
        .entry((verb.to_string(), plural.to_string()))
        .or_default() += 1;
    let name = t.name.as_deref().unwrap_or_default();
    match verb {
        "get" => verbs::get(&store, t, name).map(|v| (200, v)),
        "list" => verbs::list(&store, t, query).map(|v| (200, v)),
        "create" => verbs::create(&mut store, t, query, ua, parse_json(body)?).map(|v| (201, v)),
        "update" => {
            verbs::update(&mut store, t, name, query, ua, parse_json(body)?).map(|v| (200, v))
        }
        "patch" => verbs::patch(&mut store, t, name, query, ua, ct, body),
        "delete" => verbs::delete(&mut store, t, name, body).map(|v| (200, v)),
        _ => verbs::delete_collection(&mut store, t, query).map(|v| (200, v)),
    }
}

/// One line of a watch stream.
fn line(typ: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": typ, "object": object})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// What a watch with this target and selector sees of a change: the real
/// server turns a change into or out of the selector into ADDED/DELETED.
fn view(t: &Target, sel: &Selector, ev: &Event) -> Option<Bytes> {
    if ev.key.rt != t.rt || t.ns.as_ref().is_some_and(|n| *n != ev.key.ns) {
        return None;
    }
    let was = ev.old.as_ref().is_some_and(|o| sel.matches(o));
    let is = sel.matches(&ev.new);
    let typ = match (ev.typ, was, is) {
        (EventType::Added, _, true) => "ADDED",
        (EventType::Modified, true, true) => "MODIFIED",
        (EventType::Modified, false, true) => "ADDED",
        (EventType::Modified, true, false) => "DELETED",
        (EventType::Deleted, true, _) => "DELETED",
        _ => return None,
    };
    Some(line(typ, &ev.new))
}

fn bookmark(t: &Target, rv: u64, initial_end: bool) -> Bytes {
    let rt = t.rtype();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
    )
}

/// `GET .../<plural>?watch=true`: `resourceVersion` unset or "0" starts
/// with synthetic ADDED events for the current objects (then, with
/// `sendInitialEvents=true`, a bookmark marking their end); a version
/// replays the history after it, or sends a 410 ERROR event if that was
/// compacted. Bookmarks follow every period when allowed; the stream ends
/// after `timeoutSeconds`, and breaks off on `drop_watches`.
fn watch(shared: Arc<Shared>, t: Target, query: &Query) -> ApiResult<Response> {
    let get = |k: &str| query.get(k).map(String::as_str).filter(|s| !s.is_empty());
    let sel = Selector::parse(get("labelSelector"), get("fieldSelector"))
        .map_err(ApiError::bad_request)?;
    let bookmarks = get("allowWatchBookmarks") == Some("true");
    let initial_end = get("sendInitialEvents") == Some("true");
    let timeout = match get("timeoutSeconds") {
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {s:?}")))?,
        None => 1800,
    };
    let from = match get("resourceVersion") {
        None | Some("0") => None,
        Some(_) if initial_end => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {s:?}")))?,
        ),
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let mut first: Vec<Bytes> = Vec::new();
    let events = {
        let mut store = shared.lock();
        match from {
            None => {
                for (_, obj) in store.list(t.rt, t.ns.as_deref()) {
                    if sel.matches(&obj) {
                        first.push(line("ADDED", &obj));
                    }
                }
                if initial_end {
                    first.push(bookmark(&t, store.rv(), true));
                }
            }
            Some(rv) => match store.since(rv) {
                Ok(replay) => first.extend(replay.iter().filter_map(|ev| view(&t, &sel, ev))),
                Err(e) => {
                    first.push(line("ERROR", &e.to_status()));
                    let _ = tx.try_send(Ok(first.remove(0)));
                    return Ok(stream_response(rx));
                }
            },
        }
        store.subscribe()
    };
    let period = Duration::from_millis(shared.bookmark_ms.load(Ordering::Relaxed).max(1));
    tokio::spawn(pump(
        shared,
        t,
        sel,
        first,
        events,
        bookmarks.then_some(period),
        Duration::from_secs(timeout),
        tx,
    ));
    Ok(stream_response(rx))
}

fn stream_response(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[allow(clippy::too_many_arguments)]
async fn pump(
    shared: Arc<Shared>,
    t: Target,
    sel: Selector,
    first: Vec<Bytes>,
    mut events: mpsc::UnboundedReceiver<Arc<Event>>,
    bookmark_every: Option<Duration>,
    timeout: Duration,
    out: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    for b in first {
        if out.send(Ok(b)).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let period = bookmark_every.unwrap_or(Duration::from_secs(3600));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => {
                    if let Some(b) = view(&t, &sel, &ev) {
                        if out.send(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                }
                None => {
                    // drop_watches: break the connection off mid-stream.
                    let _ = out.send(Err(std::io::Error::other("watch dropped"))).await;
                    return;
                }
            },
            _ = tick.tick(), if bookmark_every.is_some() => {
                // Every change up to `rv` is already queued: send those,
                // then the bookmark.
                let rv = shared.lock().rv();
                while let Ok(ev) = events.try_recv() {
                    if let Some(b) = view(&t, &sel, &ev) {
                        if out.send(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                }
                if out.send(Ok(bookmark(&t, rv, false))).await.is_err() {
                    return;
                }
            }
            _ = &mut deadline => return,
            _ = out.closed() => return,
        }
    }
}

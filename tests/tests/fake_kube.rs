//! The fake Kubernetes API server against kube-rs's real client, watcher
//! and reflector.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};
use strait_tests::eventually;
use strait_tests::fake_kube::FakeKube;

const WAIT: Duration = Duration::from_secs(10);

fn api_status(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().cloned().collect::<BTreeMap<_, _>>()},
        "data": {"k": name},
    }))
    .expect("configmap")
}

fn svc(name: &str, cluster_ip: Option<&str>) -> Service {
    let mut spec = json!({"ports": [{"port": 80}], "selector": {"app": name}});
    if let Some(ip) = cluster_ip {
        spec["clusterIP"] = json!(ip);
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("service")
}

fn links(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("strait.io", "v1alpha1", "Link");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "links");
    Api::namespaced_with(client.clone(), "default", &ar)
}

async fn start() -> (FakeKube, Client) {
    let server = FakeKube::start().await.expect("fake starts");
    let client = server.client();
    (server, client)
}

/// Names and resourceVersions, to compare a reflector with the server.
fn versions<'a>(objs: impl Iterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, String> {
    objs.map(|(n, rv)| (n.to_string(), rv.to_string()))
        .collect()
}

fn server_versions(server: &FakeKube, plural: &str) -> BTreeMap<String, String> {
    let objs = server.objects("", "v1", plural);
    versions(objs.iter().map(|o| {
        (
            o["metadata"]["name"].as_str().unwrap_or_default(),
            o["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default(),
        )
    }))
}

fn store_versions(store: &reflector::Store<ConfigMap>) -> BTreeMap<String, String> {
    let state = store.state();
    versions(state.iter().map(|o| {
        (
            o.metadata.name.as_deref().unwrap_or_default(),
            o.metadata.resource_version.as_deref().unwrap_or_default(),
        )
    }))
}

#[tokio::test]
async fn services_get_cluster_ips_and_crud_errors() {
    let (server, client) = start().await;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    let a = api.create(&pp, &svc("alpha", None)).await.expect("create");
    let b = api.create(&pp, &svc("beta", None)).await.expect("create");
    let h = api
        .create(&pp, &svc("headless", Some("None")))
        .await
        .expect("create");
    let ip = |s: &Service| {
        s.spec
            .as_ref()
            .and_then(|s| s.cluster_ip.clone())
            .unwrap_or_default()
    };
    let net: ipnet::Ipv4Net = "10.96.0.0/12".parse().expect("cidr");
    for s in [&a, &b] {
        assert!(net.contains(&ip(s).parse::<std::net::Ipv4Addr>().expect("an IPv4")));
    }
    assert_ne!(ip(&a), ip(&b));
    assert_eq!(ip(&h), "None");
    assert!(a.metadata.uid.is_some() && a.metadata.creation_timestamp.is_some());
    let port = &a
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .expect("ports")[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));

    let got = api.get("alpha").await.expect("get");
    assert_eq!(got.metadata.uid, a.metadata.uid);
    let names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(names, ["alpha", "beta", "headless"]);
    let everywhere: Api<Service> = Api::all(client.clone());
    assert_eq!(
        everywhere
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        3
    );

    assert_eq!(
        api_status(api.create(&pp, &svc("alpha", None)).await.unwrap_err()),
        (409, "AlreadyExists".into())
    );
    assert_eq!(
        api_status(api.create(&pp, &svc("Bad_Name", None)).await.unwrap_err()).0,
        422
    );
    let taken = svc("gamma", Some(&ip(&a)));
    assert_eq!(
        api_status(api.create(&pp, &taken).await.unwrap_err()).0,
        422
    );

    api.delete("alpha", &DeleteParams::default())
        .await
        .expect("delete");
    assert_eq!(
        api_status(api.get("alpha").await.unwrap_err()),
        (404, "NotFound".into())
    );
    assert_eq!(
        api_status(
            api.delete("alpha", &DeleteParams::default())
                .await
                .unwrap_err()
        )
        .0,
        404
    );
    // The freed address can be asked for again.
    api.create(&pp, &taken).await.expect("the freed IP is free");
    assert_eq!(server.objects("", "v1", "services").len(), 3);
    assert!(server.requests().count_for("create", "services") >= 6);
}

#[tokio::test]
async fn bad_requests_are_statuses() {
    let (_server, client) = start().await;
    let req = http::Request::post("/api/v1/namespaces/default/configmaps")
        .header("content-type", "application/json")
        .body(b"{not json".to_vec())
        .expect("request");
    let err = client.request::<Value>(req).await.unwrap_err();
    assert_eq!(api_status(err), (400, "BadRequest".into()));
    let req = http::Request::get("/apis/nope.io/v1/namespaces/default/things")
        .body(vec![])
        .expect("request");
    assert_eq!(
        api_status(client.request::<Value>(req).await.unwrap_err()).0,
        404
    );
    for (method, uri, ct, body, code) in [
        ("GET", "/api/v1/configmaps?limit=abc", "", "", 400),
        (
            "GET",
            "/api/v1/configmaps?labelSelector=app%20in%20(a",
            "",
            "",
            400,
        ),
        ("GET", "/api/v1/configmaps?continue=garbage", "", "", 400),
        (
            "GET",
            "/api/v1/configmaps?watch=1&resourceVersion=abc",
            "",
            "",
            400,
        ),
        ("POST", "/api/v1/configmaps", "application/json", "{}", 405),
        (
            "POST",
            "/api/v1/namespaces/d/configmaps",
            "application/json",
            "[1]",
            400,
        ),
        (
            "POST",
            "/api/v1/namespaces/d/configmaps",
            "application/json",
            r#"{"kind":"Secret"}"#,
            400,
        ),
        (
            "POST",
            "/api/v1/namespaces/d/configmaps",
            "application/json",
            r#"{"metadata":{"name":"a","namespace":"e"}}"#,
            400,
        ),
        (
            "POST",
            "/api/v1/namespaces/d/configmaps",
            "application/json",
            r#"{"metadata":{}}"#,
            422,
        ),
        (
            "PUT",
            "/api/v1/namespaces/d/configmaps/a",
            "application/json",
            r#"{"metadata":5}"#,
            404,
        ),
        (
            "PATCH",
            "/api/v1/namespaces/d/configmaps/a",
            "text/plain",
            "{}",
            415,
        ),
        (
            "PATCH",
            "/api/v1/namespaces/d/configmaps/a?fieldManager=m",
            "application/apply-patch+yaml",
            "a: [",
            400,
        ),
        (
            "GET",
            "/api/v1/namespaces/d/configmaps/a/status",
            "",
            "",
            404,
        ),
        ("GET", "/api/v1/namespaces/d/configmaps/a/b/c", "", "", 404),
    ] {
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", ct)
            .body(body.as_bytes().to_vec())
            .expect("request");
        let err = client.request::<Value>(req).await.unwrap_err();
        assert_eq!(api_status(err).0, code, "{method} {uri} {body}");
    }
    // Apply needs a field manager.
    let req = http::Request::patch("/api/v1/namespaces/default/configmaps/x")
        .header("content-type", "application/apply-patch+yaml")
        .body(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n".to_vec())
        .expect("request");
    assert_eq!(
        api_status(client.request::<Value>(req).await.unwrap_err()).0,
        400
    );
    // ...and takes YAML.
    let req = http::Request::patch("/api/v1/namespaces/default/configmaps/x?fieldManager=yaml")
        .header("content-type", "application/apply-patch+yaml")
        .body(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: b\n".to_vec())
        .expect("request");
    let v: Value = client.request(req).await.expect("yaml apply");
    assert_eq!(v["data"]["a"], "b");
}

#[tokio::test]
async fn discovery_lists_the_kinds() {
    let (_server, client) = start().await;
    let discovery = kube::Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let (ar, caps) = discovery
        .resolve_gvk(&GroupVersionKind::gvk("strait.io", "v1alpha1", "Link"))
        .expect("links are discovered");
    assert_eq!(ar.plural, "links");
    assert!(caps.subresources.iter().any(|(s, _)| s.plural == "status"));
    assert!(discovery
        .resolve_gvk(&GroupVersionKind::gvk("", "v1", "Service"))
        .is_some());
    let info = client.apiserver_version().await.expect("version");
    assert_eq!(info.major, "1");
}

#[tokio::test]
async fn label_and_field_selectors() {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PostParams::default();
    api.create(&pp, &cm("a", &[("app", "web"), ("tier", "front")]))
        .await
        .expect("create");
    api.create(&pp, &cm("b", &[("app", "db")]))
        .await
        .expect("create");
    api.create(&pp, &cm("c", &[])).await.expect("create");
    let names = |sel: &'static str| {
        let api = api.clone();
        async move {
            let lp = ListParams::default().labels(sel);
            api.list(&lp)
                .await
                .expect("list")
                .items
                .iter()
                .map(|o| o.name_any())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(names("app=web").await, ["a"]);
    assert_eq!(names("app==db").await, ["b"]);
    assert_eq!(names("app!=web").await, ["b", "c"]);
    assert_eq!(names("app in (web, db)").await, ["a", "b"]);
    assert_eq!(names("app notin (web)").await, ["b", "c"]);
    assert_eq!(names("tier").await, ["a"]);
    assert_eq!(names("!tier").await, ["b", "c"]);
    assert_eq!(names("app,!tier").await, ["b"]);
    let lp = ListParams::default().fields("metadata.name=c");
    assert_eq!(api.list(&lp).await.expect("list").items.len(), 1);
    let lp = ListParams::default().fields("metadata.namespace!=default");
    assert!(api.list(&lp).await.expect("list").items.is_empty());
    // deletecollection honours the selector.
    api.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("app"),
    )
    .await
    .expect("deletecollection");
    assert_eq!(names("").await, ["c"]);
}

fn managers(obj: &Value) -> Vec<(String, String, Value)> {
    obj["metadata"]["managedFields"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|e| {
                    (
                        e["manager"].as_str().unwrap_or_default().to_string(),
                        e["operation"].as_str().unwrap_or_default().to_string(),
                        e["fieldsV1"].clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn server_side_apply_creates_updates_and_removes_fields() {
    let (server, client) = start().await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let pp = PatchParams::apply("ctl");
    let first = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "labels": {"a": "1", "b": "2"}},
        "spec": {"ports": [{"port": 80, "name": "http"}], "selector": {"app": "web"}}});
    let s = api
        .patch("web", &pp, &Patch::Apply(&first))
        .await
        .expect("apply creates");
    assert_eq!(s.metadata.generation, Some(1));
    assert!(s.spec.as_ref().and_then(|s| s.cluster_ip.clone()).is_some());
    let stored = &server.objects("", "v1", "services")[0];
    let m = managers(stored);
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].0.as_str(), m[0].1.as_str()), ("ctl", "Apply"));
    assert_eq!(
        m[0].2["f:metadata"]["f:labels"],
        json!({"f:a": {}, "f:b": {}})
    );
    assert_eq!(m[0].2["f:spec"]["f:ports"], json!({}));

    // The same apply again changes nothing.
    let again = api
        .patch("web", &pp, &Patch::Apply(&first))
        .await
        .expect("re-apply");
    assert_eq!(again.metadata.resource_version, s.metadata.resource_version);

    // Dropping label b and the selector removes them; a new port bumps the
    // generation.
    let second = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "labels": {"a": "1"}},
        "spec": {"ports": [{"port": 8080, "name": "http"}]}});
    let s2 = api
        .patch("web", &pp, &Patch::Apply(&second))
        .await
        .expect("apply updates");
    assert_eq!(s2.labels().get("b"), None);
    assert_eq!(s2.labels().get("a").map(String::as_str), Some("1"));
    let spec = s2.spec.expect("spec");
    assert_eq!(spec.selector, None);
    assert_eq!(spec.ports.expect("ports")[0].port, 8080);
    assert_eq!(
        spec.cluster_ip,
        s.spec.as_ref().and_then(|s| s.cluster_ip.clone()),
        "the ClusterIP stays"
    );
    assert_eq!(s2.metadata.generation, Some(2));

    // A label set by a plain update is not removed by the applier.
    let mut labels = s2.metadata.labels.clone().unwrap_or_default();
    labels.insert("manual".into(), "yes".into());
    let merge = json!({"metadata": {"labels": labels}});
    api.patch("web", &PatchParams::default(), &Patch::Merge(&merge))
        .await
        .expect("merge patch");
    let s3 = api
        .patch("web", &pp, &Patch::Apply(&second))
        .await
        .expect("apply");
    assert_eq!(s3.labels().get("manual").map(String::as_str), Some("yes"));
    assert_eq!(
        s3.metadata.generation,
        Some(2),
        "label changes keep the generation"
    );
}

#[tokio::test]
async fn server_side_apply_conflicts_and_force() {
    let (server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let body = |v: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"key": v}});
    api.patch(
        "shared",
        &PatchParams::apply("alice"),
        &Patch::Apply(body("one")),
    )
    .await
    .expect("alice applies");
    // Same value: shared ownership, no conflict.
    api.patch(
        "shared",
        &PatchParams::apply("bob"),
        &Patch::Apply(body("one")),
    )
    .await
    .expect("bob agrees");
    api.patch("shared", &PatchParams::apply("carol"), &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": {"other": "x"}}))).await.expect("carol adds");
    let err = api
        .patch(
            "shared",
            &PatchParams::apply("carol"),
            &Patch::Apply(body("two")),
        )
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("an API error")
    };
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(
        status.message.contains("alice")
            && status.message.contains("bob")
            && status.message.contains(".data.key"),
        "{}",
        status.message
    );
    // Carol's failed apply changed nothing.
    assert_eq!(
        api.get("shared").await.expect("get").data.expect("data")["key"],
        "one"
    );

    let forced = api
        .patch(
            "shared",
            &PatchParams::apply("carol").force(),
            &Patch::Apply(body("two")),
        )
        .await
        .expect("force");
    let data = forced.data.expect("data");
    assert_eq!(data["key"], "two");
    assert!(
        !data.contains_key("other"),
        "carol no longer applies `other`"
    );
    let stored = &server.objects("", "v1", "configmaps")[0];
    let m = managers(stored);
    assert_eq!(m.len(), 1, "alice and bob lost their only field: {m:?}");
    assert_eq!(m[0].0, "carol");
    // Alice now conflicts with carol.
    let err = api
        .patch(
            "shared",
            &PatchParams::apply("alice"),
            &Patch::Apply(body("one")),
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(err).0, 409);
}

#[tokio::test]
async fn status_subresource() {
    let (_server, client) = start().await;
    let api = links(&client);
    let link = json!({"apiVersion": "strait.io/v1alpha1", "kind": "Link",
        "metadata": {"name": "east"}, "spec": {"address": "1.2.3.4:443"},
        "status": {"connected": true}});
    let obj = api
        .patch("east", &PatchParams::apply("ctl"), &Patch::Apply(&link))
        .await
        .expect("apply");
    assert_eq!(
        obj.data.get("status"),
        None,
        "status is ignored on the main resource"
    );
    let status = json!({"apiVersion": "strait.io/v1alpha1", "kind": "Link",
        "metadata": {"name": "east"}, "spec": {"address": "9.9.9.9:1"}, "status": {"connected": true}});
    let obj = api
        .patch_status("east", &PatchParams::apply("gw"), &Patch::Apply(&status))
        .await
        .expect("apply status");
    assert_eq!(obj.data["status"]["connected"], true);
    assert_eq!(
        obj.data["spec"]["address"], "1.2.3.4:443",
        "spec is ignored on status"
    );
    assert_eq!(obj.metadata.generation, Some(1));
    let obj = api
        .patch_status(
            "east",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"peers": 2}})),
        )
        .await
        .expect("merge status");
    assert_eq!(obj.data["status"], json!({"connected": true, "peers": 2}));
    let obj = api
        .patch(
            "east",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"address": "5.6.7.8:443"}})),
        )
        .await
        .expect("merge spec");
    assert_eq!(obj.metadata.generation, Some(2));
    // Apply status again without `peers`: gw never owned it, so it stays.
    let obj = api
        .patch_status("east", &PatchParams::apply("gw"), &Patch::Apply(&status))
        .await
        .expect("apply status");
    assert_eq!(obj.data["status"]["peers"], 2);
    // A status apply with nothing there is a 404 (and a name that is not
    // the URL's a 400).
    let mut west = status.clone();
    west["metadata"]["name"] = json!("west");
    let err = api
        .patch_status("west", &PatchParams::apply("gw"), &Patch::Apply(&status))
        .await
        .unwrap_err();
    assert_eq!(api_status(err).0, 400);
    let err = api
        .patch_status("west", &PatchParams::apply("gw"), &Patch::Apply(&west))
        .await
        .unwrap_err();
    assert_eq!(api_status(err).0, 404);
}

#[tokio::test]
async fn lease_replace_is_optimistic() {
    let (_server, client) = start().await;
    let api: Api<Lease> = Api::namespaced(client, "default");
    let lease: Lease = serde_json::from_value(
        json!({"metadata": {"name": "leader"}, "spec": {"holderIdentity": "none"}}),
    )
    .expect("lease");
    api.create(&PostParams::default(), &lease)
        .await
        .expect("create");
    let seen = api.get("leader").await.expect("get");
    let mut a = seen.clone();
    a.spec.as_mut().expect("spec").holder_identity = Some("a".into());
    let mut b = seen.clone();
    b.spec.as_mut().expect("spec").holder_identity = Some("b".into());
    let won = api
        .replace("leader", &PostParams::default(), &a)
        .await
        .expect("first replace wins");
    assert_ne!(
        won.metadata.resource_version,
        seen.metadata.resource_version
    );
    let err = api
        .replace("leader", &PostParams::default(), &b)
        .await
        .unwrap_err();
    assert_eq!(api_status(err), (409, "Conflict".into()));
    let now = api.get("leader").await.expect("get");
    assert_eq!(
        now.spec.expect("spec").holder_identity.as_deref(),
        Some("a")
    );
}

#[tokio::test]
async fn owner_references_and_namespaces_cascade() {
    let (server, client) = start().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "team");
    let owner = cms
        .create(&PostParams::default(), &cm("owner", &[]))
        .await
        .expect("owner");
    let other = cms
        .create(&PostParams::default(), &cm("other", &[]))
        .await
        .expect("other");
    let oref = |o: &ConfigMap| json!({"apiVersion": "v1", "kind": "ConfigMap", "name": o.name_any(), "uid": o.uid()});
    for (name, refs) in [
        ("only", vec![oref(&owner)]),
        ("both", vec![oref(&owner), oref(&other)]),
    ] {
        let s: Secret =
            serde_json::from_value(json!({"metadata": {"name": name, "ownerReferences": refs}}))
                .expect("secret");
        secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("dependent");
    }
    cms.delete("owner", &DeleteParams::default())
        .await
        .expect("delete owner");
    assert_eq!(api_status(secrets.get("only").await.unwrap_err()).0, 404);
    let both = secrets.get("both").await.expect("still owned by another");
    assert_eq!(both.metadata.owner_references.expect("refs").len(), 1);

    let ns: Api<Namespace> = Api::all(client);
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "team"}})).expect("ns"),
    )
    .await
    .expect("namespace");
    ns.delete("team", &DeleteParams::default())
        .await
        .expect("delete namespace");
    assert!(server.objects("", "v1", "configmaps").is_empty());
    assert!(server.objects("", "v1", "secrets").is_empty());
}

#[tokio::test]
async fn list_pages_are_consistent() {
    let (server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..7 {
        api.create(&PostParams::default(), &cm(&format!("cm-{i}"), &[]))
            .await
            .expect("create");
    }
    let first = api
        .list(&ListParams::default().limit(3))
        .await
        .expect("page 1");
    assert_eq!(first.items.len(), 3);
    let token = first.metadata.continue_.clone().expect("a continue token");
    // Changes after the first page do not show in later ones.
    api.create(&PostParams::default(), &cm("cm-9", &[]))
        .await
        .expect("create");
    api.delete("cm-5", &DeleteParams::default())
        .await
        .expect("delete");
    let second = api
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .expect("page 2");
    let third = api
        .list(
            &ListParams::default()
                .limit(3)
                .continue_token(second.metadata.continue_.as_deref().expect("token")),
        )
        .await
        .expect("page 3");
    assert_eq!(third.metadata.continue_, None);
    let names: Vec<String> = first
        .items
        .iter()
        .chain(&second.items)
        .chain(&third.items)
        .map(|o| o.name_any())
        .collect();
    assert_eq!(names, (0..7).map(|i| format!("cm-{i}")).collect::<Vec<_>>());
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    // Compaction expires continue tokens.
    server.compact();
    let err = api
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .unwrap_err();
    assert_eq!(api_status(err), (410, "Expired".into()));
}

/// Runs a watcher into a channel.
fn spawn_watcher(
    api: Api<ConfigMap>,
    config: watcher::Config,
) -> tokio::sync::mpsc::UnboundedReceiver<watcher::Event<ConfigMap>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = watcher(api, config).boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(ev) = ev {
                if tx.send(ev).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next Apply/Delete event's kind and object name.
async fn next_change(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<watcher::Event<ConfigMap>>,
) -> (&'static str, String) {
    loop {
        let ev = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("an event in time")
            .expect("watcher runs");
        match ev {
            watcher::Event::Apply(o) => return ("apply", o.name_any()),
            watcher::Event::Delete(o) => return ("delete", o.name_any()),
            watcher::Event::InitApply(o) => return ("init", o.name_any()),
            _ => {}
        }
    }
}

async fn watcher_sees_changes(config: watcher::Config) {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &cm("before", &[]))
        .await
        .expect("create");
    let mut rx = spawn_watcher(api.clone(), config);
    assert_eq!(next_change(&mut rx).await, ("init", "before".into()));
    api.create(&PostParams::default(), &cm("new", &[]))
        .await
        .expect("create");
    assert_eq!(next_change(&mut rx).await, ("apply", "new".into()));
    api.patch(
        "new",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"x": "y"}})),
    )
    .await
    .expect("patch");
    assert_eq!(next_change(&mut rx).await, ("apply", "new".into()));
    api.delete("new", &DeleteParams::default())
        .await
        .expect("delete");
    assert_eq!(next_change(&mut rx).await, ("delete", "new".into()));
}

#[tokio::test]
async fn watcher_with_list_then_watch() {
    watcher_sees_changes(watcher::Config::default()).await;
}

#[tokio::test]
async fn watcher_with_streaming_list() {
    watcher_sees_changes(watcher::Config::default().streaming_lists()).await;
}

#[tokio::test]
async fn label_selector_watch_sees_objects_move_in_and_out() {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &cm("x", &[("app", "web")]))
        .await
        .expect("create");
    let mut rx = spawn_watcher(api.clone(), watcher::Config::default().labels("app=web"));
    assert_eq!(next_change(&mut rx).await, ("init", "x".into()));
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})),
    )
    .await
    .expect("out");
    assert_eq!(next_change(&mut rx).await, ("delete", "x".into()));
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await
    .expect("in");
    assert_eq!(next_change(&mut rx).await, ("apply", "x".into()));
}

#[tokio::test]
async fn bookmarks_arrive() {
    let (server, client) = start().await;
    server.set_bookmark_interval(Duration::from_millis(100));
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let created = api
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .expect("create");
    let rv = created.resource_version().expect("rv");
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .expect("watch")
        .boxed();
    let b_rv: u64 = api
        .create(&PostParams::default(), &cm("b", &[]))
        .await
        .expect("create")
        .resource_version()
        .and_then(|v| v.parse().ok())
        .expect("numeric rv");
    let mut saw_added = false;
    loop {
        let ev = tokio::time::timeout(WAIT, stream.try_next())
            .await
            .expect("in time")
            .expect("no error")
            .expect("open");
        match ev {
            WatchEvent::Added(o) => saw_added = o.name_any() == "b",
            WatchEvent::Bookmark(b) => {
                let at: u64 = b.metadata.resource_version.parse().expect("numeric rv");
                if !saw_added {
                    // A bookmark sent while "b" was being created.
                    assert!(at < b_rv, "a bookmark at {at} before b ({b_rv}) arrived");
                    continue;
                }
                assert_eq!(at, server.resource_version());
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Watching from a compacted version gives 410 as an ERROR event.
    server.compact();
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match stream
        .try_next()
        .await
        .expect("an event")
        .expect("an event")
    {
        WatchEvent::Error(s) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }
}

/// A reflector on configmaps, run in the background.
fn spawn_reflector(api: Api<ConfigMap>) -> reflector::Store<ConfigMap> {
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    tokio::spawn(stream.for_each(|_| std::future::ready(())));
    reader
}

#[tokio::test]
async fn dropped_watches_lose_nothing() {
    let (server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let store = spawn_reflector(api.clone());
    store.wait_until_ready().await.expect("ready");
    for round in 0..5 {
        for i in 0..4 {
            let name = format!("cm-{round}-{i}");
            api.create(&PostParams::default(), &cm(&name, &[]))
                .await
                .expect("create");
            if i == 2 {
                server.drop_watches();
            }
        }
        api.delete(&format!("cm-{round}-0"), &DeleteParams::default())
            .await
            .expect("delete");
        api.patch(
            &format!("cm-{round}-1"),
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"r": "1"}})),
        )
        .await
        .expect("patch");
    }
    eventually(WAIT, "the reflector to match the server", || {
        let same = store_versions(&store) == server_versions(&server, "configmaps");
        async move { same.then_some(()) }
    })
    .await;
    assert_eq!(
        server.requests().count_for("list", "configmaps"),
        1,
        "re-watches, no relist"
    );
    assert!(server.requests().count_for("watch", "configmaps") >= 6);
}

#[tokio::test]
async fn compaction_makes_the_watcher_relist() {
    let (server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..3 {
        api.create(&PostParams::default(), &cm(&format!("old-{i}"), &[]))
            .await
            .expect("create");
    }
    let store = spawn_reflector(api.clone());
    store.wait_until_ready().await.expect("ready");
    let lists = server.requests().count_for("list", "configmaps");
    api.delete("old-0", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(WAIT, "the reflector to see the delete", || {
        let same = store_versions(&store) == server_versions(&server, "configmaps");
        async move { same.then_some(()) }
    })
    .await;
    server.compact();
    server.drop_watches();
    api.create(&PostParams::default(), &cm("new", &[]))
        .await
        .expect("create");
    api.delete("old-1", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(WAIT, "the reflector to relist and match the server", || {
        let same = store_versions(&store) == server_versions(&server, "configmaps");
        async move { same.then_some(()) }
    })
    .await;
    assert!(
        server.requests().count_for("list", "configmaps") > lists,
        "a relist after 410"
    );
    assert_eq!(store.state().len(), 2);
}

#[tokio::test]
async fn two_clusters_are_independent() {
    let (a, ca) = start().await;
    let (b, cb) = start().await;
    assert_ne!(a.url(), b.url());
    Api::<ConfigMap>::namespaced(ca, "default")
        .create(&PostParams::default(), &cm("only-a", &[]))
        .await
        .expect("create");
    assert!(Api::<ConfigMap>::namespaced(cb, "default")
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .is_empty());
    assert_eq!(a.objects("", "v1", "configmaps").len(), 1);
    assert!(b.objects("", "v1", "configmaps").is_empty());
}

#[tokio::test]
async fn a_dropped_server_is_gone() {
    let (server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.list(&ListParams::default()).await.expect("list");
    drop(server);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(api.list(&ListParams::default()).await.is_err());
}

#[tokio::test]
async fn token_reviews_know_issued_tokens_their_audiences_and_revocations() {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let kube = FakeKube::start().await.expect("fake");
    let api: Api<TokenReview> = Api::all(kube.client());
    let review = |token: &str, audiences: Option<Vec<&str>>| {
        let api = api.clone();
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: audiences.map(|a| a.into_iter().map(String::from).collect()),
            },
            ..TokenReview::default()
        };
        async move {
            api.create(&PostParams::default(), &request)
                .await
                .expect("a review is always answered")
                .status
                .expect("with a status")
        }
    };
    let token = kube.issue_token("demo", "web", &["identity.strait.io"]);
    let ok = review(&token, Some(vec!["identity.strait.io", "other"])).await;
    assert_eq!(ok.authenticated, Some(true));
    assert_eq!(
        ok.user.and_then(|u| u.username).as_deref(),
        Some("system:serviceaccount:demo:web")
    );
    assert_eq!(ok.audiences, Some(vec!["identity.strait.io".to_string()]));
    assert!(ok.error.is_none());

    // Another audience, the API server's default, an unknown token, and
    // the token once revoked: not authenticated, with a reason.
    for status in [
        review(&token, Some(vec!["vault"])).await,
        review(&token, None).await,
        review("nope", Some(vec!["identity.strait.io"])).await,
    ] {
        assert_ne!(status.authenticated, Some(true));
        assert!(status.error.is_some_and(|e| !e.is_empty()));
    }
    let plain = kube.issue_token("demo", "web", &[]);
    assert_eq!(review(&plain, None).await.authenticated, Some(true));
    kube.revoke_token(&token);
    let revoked = review(&token, Some(vec!["identity.strait.io"])).await;
    assert_ne!(revoked.authenticated, Some(true));
    assert_eq!(kube.requests().count_for("create", "tokenreviews"), 6);
}

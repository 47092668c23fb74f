//! The `strait` binary as a user runs it.

use std::process::Command;
use std::time::{Duration, Instant};

fn strait() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strait"))
}

#[test]
fn demo_once_makes_the_round_trip_and_exits_zero() {
    let started = Instant::now();
    // Ports away from the defaults so a running demo does not interfere,
    // and below the ephemeral range (32768 and up): a client connection
    // that just closed there holds its port in TIME_WAIT, which a listener
    // cannot bind.
    let out = strait()
        .args([
            "demo",
            "--once",
            "--west-dns",
            "127.0.0.1:21353",
            "--west-admin",
            "127.0.0.1:21191",
            "--west-tunnel",
            "127.0.0.1:21143",
            "--east-dns",
            "127.0.0.1:22353",
            "--east-admin",
            "127.0.0.1:22191",
            "--east-tunnel",
            "127.0.0.1:22143",
            "--west-destination",
            "127.0.0.1:21086",
            "--east-destination",
            "127.0.0.1:22086",
        ])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("hello.demo.svc.clusterset.local -> 127.77."),
        "{stdout}"
    );
    assert!(
        stdout.contains("hello-east-0=") && stdout.contains("hello-east-1="),
        "both endpoints served: {stdout}"
    );
    assert_eq!(
        stdout
            .matches("sidecar: certified by east's identity service as spiffe://east.strait.local/ns/demo/sa/hello")
            .count(),
        2,
        "both sidecars certified: {stdout}"
    );
    // East's gateway reached every endpoint through its sidecar, over
    // mutual TLS: the sidecars counted every request the client made.
    let requests: u64 = stdout
        .split("ok: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the request count");
    let over_mtls: Vec<u64> = stdout
        .lines()
        .filter_map(|l| {
            l.split("inbound requests over mTLS from east's gateway: ")
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(over_mtls.len(), 2, "{stdout}");
    assert!(over_mtls.iter().all(|n| *n > 0), "{stdout}");
    assert_eq!(over_mtls.iter().sum::<u64>(), requests, "{stdout}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn demo_reports_a_clear_reason_when_a_port_is_taken() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = strait()
        .args([
            "demo",
            "--once",
            "--east-tunnel",
            &format!("127.0.0.1:{port}"),
            "--west-dns",
            "127.0.0.1:0",
            "--west-admin",
            "127.0.0.1:0",
            "--west-tunnel",
            "127.0.0.1:0",
            "--east-dns",
            "127.0.0.1:0",
            "--east-admin",
            "127.0.0.1:0",
            "--west-destination",
            "127.0.0.1:0",
            "--east-destination",
            "127.0.0.1:0",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("starting east") && stderr.contains("Address already in use"),
        "{stderr}"
    );
}

#[test]
fn certs_make_a_root_and_an_issuer_and_refuse_to_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf8");
    let ok = strait()
        .args(["certs", "root", "--out", d])
        .output()
        .expect("runs");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let ok = strait()
        .args(["certs", "issuer", "--cluster", "east", "--out", d])
        .current_dir(d)
        .output()
        .expect("runs");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("east.strait.local"));
    let issuer = strait_proxy::identity::Issuer::load(
        &dir.path().join("east-issuer.pem"),
        &dir.path().join("east-issuer.key"),
    )
    .expect("loads");
    assert_eq!(issuer.trust_domain(), "east.strait.local");
    let again = strait()
        .args(["certs", "root", "--out", d])
        .output()
        .expect("runs");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    let bad = strait()
        .args(["certs", "issuer", "--cluster", "East!", "--out", d])
        .current_dir(d)
        .output()
        .expect("runs");
    assert!(!bad.status.success());
}

#[test]
fn bad_config_and_flags_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("g.yaml");
    std::fs::write(&cfg, "cluster: west\nidentity: {trustAnchors: r, issuerCert: i, issuerKey: k}\nsource: {file: c}\nlinks: [{name: east, addresses: [nope]}]\n").expect("write");
    let out = strait()
        .args(["gateway", "--config"])
        .arg(&cfg)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("links[0].addresses[0]"), "{stderr}");
    std::fs::write(&cfg, "cluster: [").expect("write");
    let out = strait()
        .args(["gateway", "--config"])
        .arg(&cfg)
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("parsing"));
    let out = strait()
        .args(["demo", "--west-dns", "not-an-address"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn link_and_check_refuse_bad_flags_with_exit_2_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["check", "--output", "yaml"], "--output"),
        (&["check", "--min-cert-days", "-1"], "--min-cert-days"),
        (&["check", "--min-cert-days", "soon"], "--min-cert-days"),
        (&["check", "--dns-server", "dns.example"], "--dns-server"),
        (&["check", "--namespace", "Strait_System"], "--namespace"),
        (&["link"], "--name"),
        (&["link", "--name", "West"], "--name"),
        (&["link", "--name", "west", "--address", "a b"], "--address"),
        (
            &["link", "--name", "west", "--address", "gw:0"],
            "--address",
        ),
        (
            &["link", "--name", "west", "--accept-namespace", "a/b"],
            "--accept-namespace",
        ),
    ];
    for (args, flag) in cases {
        let out = strait().args(*args).output().expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

/// A kubeconfig whose API server refuses connections.
fn unreachable_kubeconfig(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1'}\n\
         contexts:\n- name: here\n  context: {cluster: c, user: u}\ncurrent-context: here\n\
         users:\n- name: u\n  user: {token: t}\n",
    )
    .expect("write");
    path
}

#[test]
fn check_without_an_api_server_fails_fast_and_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = unreachable_kubeconfig(dir.path());
    let started = Instant::now();
    let out = strait()
        .args(["check", "-o", "json", "--dns-server", "127.0.0.1:1"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("runs");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(results[0]["name"], "kubernetes-api");
    assert_eq!(results[0]["status"], "fail");
    assert!(
        results[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Connection refused")),
        "{results}"
    );
    assert_eq!(results[1]["name"], "dns");
    assert!(started.elapsed() < Duration::from_secs(10));

    let out = strait()
        .args(["link", "--name", "west", "--context", "elsewhere"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("context elsewhere"));
    let out = strait()
        .args(["link", "--name", "west"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reading ConfigMap strait-gateway-config") && !stderr.contains("ERROR"),
        "{stderr}"
    );
}

#[test]
fn inject_adds_the_proxy_and_refuses_bad_anchors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        strait()
            .current_dir(dir.path())
            .args(args)
            .output()
            .expect("runs")
    };
    assert!(run(&["certs", "root"]).status.success());
    let manifest = dir.path().join("web.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: web}]}\n",
    )
    .expect("write");
    let out = run(&[
        "inject",
        "--cluster",
        "west",
        "--trust-anchors",
        "root.pem",
        "web.yaml",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("name: strait-proxy")
            && stdout.contains("spiffe://west.strait.local/ns/$(STRAIT_POD_NS)"),
        "{stdout}"
    );
    assert!(stderr.contains("deployment/web injected"), "{stderr}");
    assert!(!stdout.contains("--ipv6"), "{stdout}");
    let out = run(&[
        "inject",
        "--cluster",
        "west",
        "--ipv6",
        "--trust-anchors",
        "root.pem",
        "web.yaml",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("--ipv6") && stdout.contains("STRAIT_PROXY_OUTBOUND_LISTEN_IPV6"),
        "{stdout}"
    );

    std::fs::write(dir.path().join("bad.pem"), "not a certificate").expect("write");
    let out = run(&[
        "inject",
        "--cluster",
        "west",
        "--trust-anchors",
        "bad.pem",
        "web.yaml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.pem"),
        "names the file"
    );
    let out = run(&["inject", "--trust-anchors", "root.pem", "web.yaml"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--cluster or --trust-domain is required"
    );
}

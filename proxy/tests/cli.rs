//! The `strait-proxy` binary as an operator runs it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strait_proxy::identity::{generate_issuer, generate_root};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strait-proxy"))
}

fn get(addr: &str, path: &str, method: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn bad_flags_and_missing_identity_are_clear_errors() {
    let out = bin()
        .args(["run", "--detect-timeout-ms", "0", "--trust-anchors", "x"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be positive"));
    let dir = tempfile::tempdir().expect("tmp");
    let root = generate_root("t").expect("root");
    std::fs::write(dir.path().join("root.pem"), &root.cert_pem).expect("write");
    let out = bin()
        .args(["run", "--inbound-target", "127.0.0.1:1", "--trust-anchors"])
        .arg(dir.path().join("root.pem"))
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("an identity is required"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bin()
        .args([
            "run",
            "--trust-anchors",
            "/nonexistent",
            "--identity",
            "spiffe://t/ns/a/sa/b",
        ])
        .output()
        .expect("runs");
    assert_eq!(
        out.status.code(),
        Some(2),
        "identity needs the issuer flags or the control plane"
    );
    for (args, why) in [
        (
            &[
                "--identity",
                "spiffe://t/ns/a/sa/b",
                "--identity-addr",
                "gw:8080",
            ][..],
            "the control plane needs a token",
        ),
        (
            &[
                "--identity",
                "spiffe://t/ns/a/sa/b",
                "--identity-addr",
                "gw:8080",
                "--identity-token-file",
                "/t",
                "--issuer-cert",
                "/c",
                "--issuer-key",
                "/k",
            ][..],
            "one source of certificates",
        ),
        (
            &["--identity-token-file", "/t"][..],
            "a token needs an address",
        ),
    ] {
        let out = bin()
            .args(["run", "--trust-anchors", "/nonexistent"])
            .args(args)
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(2), "{why}");
    }
    let out = bin()
        .args(["run", "--inbound-target", "127.0.0.1:1", "--trust-anchors"])
        .arg(dir.path().join("root.pem"))
        .args([
            "--identity",
            "spiffe://t/ns/a/sa/b",
            "--identity-addr",
            "not an address",
            "--identity-token-file",
            "/t",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--identity-addr"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `strait-proxy run` with a stand-in identity and `args`, refused before
/// any file is read: its exit code and stderr.
fn run_refused(args: &[&str]) -> (Option<i32>, String) {
    let out = bin()
        .arg("run")
        .args(["--trust-anchors", "/nonexistent"])
        .args(["--identity", "spiffe://t/ns/a/sa/b"])
        .args(["--issuer-cert", "/c", "--issuer-key", "/k"])
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_ipv6_outbound_listener_must_be_loopback_on_the_outbound_port() {
    for (addr, why) in [
        ("[::]:4140", "IPv6 loopback"),
        ("127.0.0.1:4140", "IPv6 loopback"),
        ("[::1]:4141", "the outbound listener's port"),
    ] {
        let (code, stderr) = run_refused(&[
            "--inbound-target",
            "127.0.0.1:1",
            "--outbound-listen-ipv6",
            addr,
        ]);
        assert_eq!(code, Some(1), "{addr}: {stderr}");
        assert!(
            stderr.contains("outbound-listen-ipv6") && stderr.contains(why),
            "{addr}: {stderr}"
        );
    }
}

#[test]
fn inbound_ips_must_be_pod_addresses() {
    for (ips, code, why) in [
        ("10.1.2.3,::1", 1, "::1 is not a pod address"),
        ("0.0.0.0", 1, "0.0.0.0 is not a pod address"),
        ("10.1.2.300", 2, "invalid IP address syntax"),
        ("::ffff:127.0.0.1", 1, "is not a pod address"),
    ] {
        refused_with(
            &["--transparent", "--inbound-ips", ips],
            code,
            "inbound-ips",
            why,
        );
    }
}

/// [`run_refused`] with `args` exits with `code`, naming `field` and saying
/// `why`.
fn refused_with(args: &[&str], code: i32, field: &str, why: &str) {
    let (exit, stderr) = run_refused(args);
    assert_eq!(exit, Some(code), "{args:?}: {stderr}");
    assert!(
        stderr.contains(field) && stderr.contains(why),
        "{args:?}: {stderr}"
    );
}

#[test]
fn inbound_ips_need_transparent_mode() {
    let (code, stderr) = run_refused(&[
        "--inbound-target",
        "127.0.0.1:1",
        "--inbound-ips",
        "10.1.2.3",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("only with --transparent"), "{stderr}");
}

/// The header timeout must outlast the wait before an idle connection is
/// parked (hyper's timer also runs while a connection waits for its next
/// request); zero or junk is a usage error.
#[test]
fn the_http1_header_timeout_must_leave_time_to_park() {
    for (ms, code, why) in [
        ("1000", 1, "idle HTTP/1 connections are parked"),
        ("0", 2, "must be positive"),
        ("soon", 2, "invalid digit"),
    ] {
        let args = [
            "--inbound-target",
            "127.0.0.1:1",
            "--http1-header-timeout-ms",
            ms,
        ];
        refused_with(&args, code, "http1-header-timeout", why);
    }
}

/// A connection limit of none, or of more than a u32, is refused.
#[test]
fn the_connection_limit_must_allow_a_connection() {
    for (max, code, why) in [
        ("0", 1, "must be from 1"),
        ("4294967296", 2, "not in 0..=4294967295"),
    ] {
        let args = ["--inbound-target", "127.0.0.1:1", "--max-connections", max];
        refused_with(&args, code, "max-connections", why);
    }
}

#[test]
fn trust_anchors_come_from_exactly_one_place() {
    for args in [
        &["run", "--inbound-target", "127.0.0.1:1"][..],
        &[
            "run",
            "--trust-anchors",
            "a.pem",
            "--trust-anchors-pem",
            "x",
        ][..],
    ] {
        let out = bin().args(args).output().expect("runs");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--trust-anchors"));
    }
    let out = bin()
        .args([
            "run",
            "--trust-anchors-pem",
            "not a certificate",
            "--inbound-target",
            "127.0.0.1:1",
        ])
        .args([
            "--identity",
            "spiffe://t/ns/a/sa/b",
            "--issuer-cert",
            "i",
            "--issuer-key",
            "k",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("STRAIT_PROXY_TRUST_ANCHORS_PEM"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serves_then_drains_on_shutdown_and_on_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = generate_root("t").expect("root");
    let issuer = generate_issuer(&root, "t.strait.local").expect("issuer");
    for (f, c) in [
        ("root.pem", &root.cert_pem),
        ("i.pem", &issuer.cert_pem),
        ("i.key", &issuer.key_pem),
    ] {
        std::fs::write(dir.path().join(f), c).expect("write");
    }
    for how in ["shutdown", "sigterm"] {
        let mut cmd = bin();
        // The anchors from a file, or inline as `strait inject` passes them.
        if how == "shutdown" {
            cmd.arg("run")
                .arg("--trust-anchors")
                .arg(dir.path().join("root.pem"));
        } else {
            // On one thread (tokio's single-threaded scheduler), as
            // `strait inject` runs it.
            cmd.arg("run")
                .env("STRAIT_PROXY_TRUST_ANCHORS_PEM", &root.cert_pem)
                .env("STRAIT_THREADS", "1");
        }
        let mut child = cmd
            .args([
                "--outbound-listen",
                "127.0.0.1:0",
                "--inbound-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--inbound-target",
                "127.0.0.1:9",
                "--identity",
                "spiffe://t.strait.local/ns/demo/sa/web",
                "--shutdown-grace-ms",
                "2000",
            ])
            .arg("--issuer-cert")
            .arg(dir.path().join("i.pem"))
            .arg("--issuer-key")
            .arg(dir.path().join("i.key"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("line");
        let admin = line
            .rsplit("http://")
            .next()
            .expect("admin")
            .trim()
            .to_string();
        assert!(
            get(&admin, "/ready", "GET").starts_with("HTTP/1.1 200"),
            "{line}"
        );
        assert!(get(&admin, "/live", "GET").starts_with("HTTP/1.1 200"));
        assert!(
            get(&admin, "/metrics", "GET").contains("# EOF"),
            "OpenMetrics text"
        );
        let started = Instant::now();
        if how == "shutdown" {
            assert!(get(&admin, "/shutdown", "POST").starts_with("HTTP/1.1 200"));
        } else {
            let ok = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(ok.success());
        }
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{how}: did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{how}: {status}");
    }
}

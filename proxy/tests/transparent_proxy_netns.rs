//! The real `strait-proxy` binary in transparent mode, in network
//! namespaces.
//!
//! A "pod" namespace and a "peer" namespace are joined by a veth pair
//! (`10.213.N.1` and `fd00:213:N::1` in the pod, `.2` and `::2` in the
//! peer). In the pod,
//! `strait-proxy init --proxy-uid 2102` installs the rules and
//! `strait-proxy run --transparent --inbound-ips <the pod's addresses>`
//! runs as uid 2102, next to an "application" (an HTTP server on
//! `0.0.0.0:8080`, and a private one on `127.0.0.1:8081`, as `nobody`). The
//! peer has an HTTP server on `:8080` and a TCP echo server on `:9000`.
//! Then, checked in the answers and in the proxy's own `/metrics`:
//!
//! - outbound HTTP from the application (`curl` as `nobody`) is redirected
//!   to the proxy, which finds the original destination and forwards the
//!   request to the unmeshed peer;
//! - inbound HTTP from the peer to the pod's address is redirected to the
//!   proxy's inbound port and handed to the application at that address;
//!   the private server is not reached, and neither a connection made to
//!   the inbound port on loopback (not a pod address) nor one to the pod's
//!   inbound port itself (a loop) is forwarded: both are counted;
//! - the admin port is reached directly from the peer, not through the
//!   inbound proxy;
//! - opaque TCP (a client that speaks first, not HTTP) goes through byte
//!   for byte;
//! - SIGTERM makes the proxy exit 0 within a few seconds;
//! - in a dual-stack pod (`init --ipv6`, the proxy on `[::1]:4140` as well,
//!   `[::]` inbound), IPv6 traffic out and in, and IPv4 in, go the same way.
//!
//! The servers and the TCP client are roles of this very binary, executed
//! again inside a namespace (the `transparent_proxy_helper` entry point),
//! so nothing but `ip`, `iptables`, `ip6tables`, `setpriv` and `curl` is needed: run
//! `scripts/install-test-tools.sh` if one is missing. Needs root. The
//! namespaces, and with them the veth pair, are deleted and every process
//! started is killed when the test ends, pass or fail.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use strait_proxy::identity::{generate_issuer, generate_root};

#[path = "support/netns.rs"]
mod netns;
use netns::{run_bytes, run_output, runnable_by_others, Netns};

/// Set (to the role's arguments, one per line) when this binary is run as a
/// helper rather than as the test suite.
const HELPER_ENV: &str = "STRAIT_NETNS_HELPER_ARGS";

/// The uid the proxy runs as (what `init --proxy-uid` exempts).
const PROXY_UID: &str = "2102";
/// The application's uid (`nobody`).
const APP_UID: &str = "65534";
const TRUST_DOMAIN: &str = "t.strait.local";
const IDENTITY: &str = "spiffe://t.strait.local/ns/demo/sa/app";
/// The longest any single step (a request, a readiness wait, a metric to
/// settle, the proxy's exit) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The proxy's listeners in an IPv4 pod (its defaults, spelt out).
const IPV4_LISTENERS: &[&str] = &[
    "--outbound-listen",
    "127.0.0.1:4140",
    "--inbound-listen",
    "0.0.0.0:4143",
    "--admin-listen",
    "0.0.0.0:4191",
];
/// The proxy's listeners in a dual-stack pod (what the injector sets with
/// `ipv6`).
const DUAL_STACK_LISTENERS: &[&str] = &[
    "--outbound-listen",
    "127.0.0.1:4140",
    "--outbound-listen-ipv6",
    "[::1]:4140",
    "--inbound-listen",
    "[::]:4143",
    "--admin-listen",
    "[::]:4191",
];
/// How long the proxy may take to exit after SIGTERM when idle.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Not a test: the entry point the test executes this binary into, inside
/// a namespace, to play one helper role. Without [`HELPER_ENV`] it does
/// nothing.
///
/// ```text
/// http LISTEN NAME     answers every request with "NAME: METHOD PATH host=HOST\n"
/// echo LISTEN          sends back whatever it receives, until EOF
/// send ADDR LEN        sends payload(LEN), half-closes, prints what comes back
/// ```
///
/// Listening roles print `ready` on stderr once bound, and nothing after.
#[test]
fn transparent_proxy_helper() {
    let Ok(args) = std::env::var(HELPER_ENV) else {
        return;
    };
    let args: Vec<String> = args.lines().map(str::to_owned).collect();
    let code = match helper(&args) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "helper {args:?}: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn helper(args: &[String]) -> std::io::Result<()> {
    match args {
        [role, listen, name] if role == "http" => {
            let name = name.clone();
            serve(listen, move |s| http_connection(s, &name))
        }
        [role, listen] if role == "echo" => serve(listen, echo_connection),
        [role, addr, len] if role == "send" => {
            send(addr, &payload(len.parse().map_err(std::io::Error::other)?))
        }
        _ => Err(std::io::Error::other("usage: http|echo|send ...")),
    }
}

fn serve(
    listen: &str,
    handle: impl Fn(TcpStream) -> std::io::Result<()> + Clone + Send + 'static,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    {
        let mut err = std::io::stderr().lock();
        err.write_all(b"ready\n")?;
        err.flush()?;
    }
    loop {
        let (stream, _) = listener.accept()?;
        let handle = handle.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(STEP_TIMEOUT));
            let _ = stream.set_write_timeout(Some(STEP_TIMEOUT));
            let _ = handle(stream);
        });
    }
}

/// One HTTP/1.1 request, answered with a recognisable body; then closes.
fn http_connection(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.lines();
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default();
    let path = request_line.next().unwrap_or_default();
    let host = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map_or("", |(_, v)| v.trim());
    let body = format!("{name}: {method} {path} host={host}\n");
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    stream.shutdown(Shutdown::Write)
}

fn echo_connection(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return stream.shutdown(Shutdown::Write);
        }
        stream.write_all(&buf[..n])?;
    }
}

/// What the `send` role sends: a line of text (so that detection sees
/// something that is clearly not HTTP), then every byte value, over and
/// over, up to `len` bytes.
fn payload(len: usize) -> Vec<u8> {
    b"hello strait\n"
        .iter()
        .copied()
        .chain((0..=255u8).cycle())
        .take(len)
        .collect()
}

fn send(addr: &str, message: &[u8]) -> std::io::Result<()> {
    let addr: SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let mut stream = TcpStream::connect_timeout(&addr, STEP_TIMEOUT)?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    // Read while writing: the echo must never wait on a full buffer.
    let mut reader = stream.try_clone()?;
    let received = std::thread::spawn(move || {
        let mut received = Vec::new();
        reader.read_to_end(&mut received).map(|_| received)
    });
    stream.write_all(message)?;
    stream.shutdown(Shutdown::Write)?;
    let received = received
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))??;
    let mut err = std::io::stderr().lock();
    err.write_all(&received)?;
    err.flush()
}

fn preflight() {
    netns::preflight(
        "transparent_proxy_netns",
        &[
            "ip",
            "iptables-save",
            "iptables-restore",
            "ip6tables-save",
            "ip6tables-restore",
            "setpriv",
            "curl",
            "sh",
        ],
    );
}

/// Runs a command to completion; panics with its output if it fails.
/// Returns (stdout, stderr).
fn run(cmd: &mut Command) -> (String, String) {
    run_output(cmd)
}

/// `curl` inside a namespace.
trait Curl {
    /// The status and the body as `uid`, or curl's complaint.
    fn try_curl(&self, uid: Option<&str>, url: &str) -> Result<(u16, String), String>;
    /// [`Curl::try_curl`], panicking on failure.
    fn curl(&self, uid: Option<&str>, url: &str) -> (u16, String);
}

impl Curl for Netns {
    /// `curl` in this namespace as `uid`: the status and the body, or
    /// curl's complaint.
    fn try_curl(&self, uid: Option<&str>, url: &str) -> Result<(u16, String), String> {
        let out = self
            .exec(uid, "curl")
            .args(["-q", "-sS", "--noproxy", "*", "--max-time", "10"])
            .args(["-w", "\n%{http_code}", url])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run curl: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "curl {url} in {} failed ({}): {stdout}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        let code = code
            .trim()
            .parse()
            .map_err(|e| format!("curl {url}: status {code:?}: {e}"))?;
        Ok((code, body.to_owned()))
    }

    fn curl(&self, uid: Option<&str>, url: &str) -> (u16, String) {
        self.try_curl(uid, url).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A background process, killed on drop. `logs` (stdout, stderr files)
/// are printed if the test is failing.
struct Running {
    what: String,
    child: Child,
    logs: Option<(PathBuf, PathBuf)>,
}

impl Running {
    fn logs(&self) -> String {
        let Some((out, err)) = &self.logs else {
            return String::new();
        };
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "--- {} stdout ---\n{}--- {} stderr ---\n{}",
            self.what,
            read(out),
            self.what,
            read(err)
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() && self.logs.is_some() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Polls `f` every 50 ms until it answers, for [`STEP_TIMEOUT`] at most;
/// panics with `what` and the last failure.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what}: still not so after {STEP_TIMEOUT:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The value of one series (`name{labels}`) in an OpenMetrics text.
fn metric(metrics: &str, series: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Two namespaces joined by a veth pair, the certificates, the processes
/// running in them. Fields drop in order: processes (the proxy last), then
/// namespaces, then the files.
struct Pod {
    running: Vec<Running>,
    proxy: Option<Running>,
    pod: Netns,
    peer: Netns,
    n: u8,
    helper: PathBuf,
    proxy_bin: PathBuf,
    certs: PathBuf,
    dir: tempfile::TempDir,
}

impl Pod {
    /// Namespaces `strait-{pod,peer}-<pid>-<n>`, addresses in
    /// `10.213.<n>.0/24` and `fd00:213:<n>::/64`.
    fn new() -> Pod {
        static NEXT: AtomicU8 = AtomicU8::new(0);
        preflight();
        let n = 40 + NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::tempdir().expect("tempdir");
        // uid 2102 reads the certificates, `nobody` may run copied binaries.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let helper = runnable_by_others(&std::env::current_exe().expect("exe"), dir.path());
        let proxy_bin =
            runnable_by_others(Path::new(env!("CARGO_BIN_EXE_strait-proxy")), dir.path());
        let certs = dir.path().join("certs");
        write_certs(&certs);
        let logs = dir.path().join("logs");
        std::fs::create_dir(&logs).expect("mkdir logs");

        // Dual-stack, as a pod in a dual-stack cluster.
        let (pod, peer) = netns::linked_pair(n);
        Pod {
            running: Vec::new(),
            proxy: None,
            pod,
            peer,
            n,
            helper,
            proxy_bin,
            certs,
            dir,
        }
    }

    fn pod_ip(&self) -> String {
        format!("10.213.{}.1", self.n)
    }

    fn peer_ip(&self) -> String {
        format!("10.213.{}.2", self.n)
    }

    /// The pod's IPv6 address, bracketed for a URL or socket address.
    fn pod_ip6(&self) -> String {
        format!("[fd00:213:{}::1]", self.n)
    }

    /// The peer's IPv6 address, bracketed.
    fn peer_ip6(&self) -> String {
        format!("[fd00:213:{}::2]", self.n)
    }

    /// This binary as a helper role, in `ns` as `uid`.
    fn helper(&self, in_pod: bool, uid: Option<&str>, args: &[&str]) -> Command {
        let ns = if in_pod { &self.pod } else { &self.peer };
        let mut cmd = ns.exec(uid, &self.helper);
        cmd.args([
            "--exact",
            "transparent_proxy_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, args.join("\n"));
        cmd
    }

    /// Starts a listening helper role and waits for its `ready`.
    fn start_helper(&mut self, in_pod: bool, uid: Option<&str>, args: &[&str]) {
        let mut child = self
            .helper(in_pod, uid, args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        let _ = stderr.read_line(&mut line);
        if line.trim() != "ready" {
            let _ = child.kill();
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            let _ = child.wait();
            panic!("helper {args:?} did not start: {line}{rest}");
        }
        self.running.push(Running {
            what: format!("{args:?}"),
            child,
            logs: None,
        });
    }

    /// `strait-proxy init --proxy-uid 2102 EXTRA...` in the pod; what it
    /// printed.
    fn init(&self, extra: &[&str]) -> String {
        run(self
            .pod
            .exec(None, &self.proxy_bin)
            .args(["init", "--proxy-uid", PROXY_UID])
            .args(extra))
        .0
    }

    /// `strait-proxy run --transparent` in the pod as uid 2102 with its
    /// `listeners` flags and `destinations` (see [`Pod::destinations`]),
    /// once `/ready` answers 200.
    fn start_proxy(&mut self, listeners: &[&str], destinations: &[(&str, &str)]) {
        let destinations = self.destinations(destinations);
        let logs = self.dir.path().join("logs");
        let (out, err) = (logs.join("proxy.out"), logs.join("proxy.err"));
        let file = |p: &Path| std::fs::File::create(p).expect("create log file");
        let cert = |name: &str| self.certs.join(name);
        let mut cmd = self.pod.exec(Some(PROXY_UID), &self.proxy_bin);
        cmd.arg("run")
            .arg("--transparent")
            .args(["--identity", IDENTITY])
            .arg("--trust-anchors")
            .arg(cert("root.pem"))
            .arg("--issuer-cert")
            .arg(cert("issuer.pem"))
            .arg("--issuer-key")
            .arg(cert("issuer.key"))
            .args(listeners)
            .args(["--destinations", &destinations])
            // As the injector passes `status.podIPs`.
            .arg("--inbound-ips")
            .arg(format!(
                "{},{}",
                self.pod_ip(),
                self.pod_ip6().trim_matches(['[', ']'])
            ))
            .args(["--detect-timeout-ms", "200"])
            .env("STRAIT_LOG", "warn,strait_proxy=info")
            .stdin(Stdio::null())
            .stdout(file(&out))
            .stderr(file(&err));
        // Only the flags above configure it.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STRAIT_PROXY_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd.spawn().expect("spawn strait-proxy");
        let mut proxy = Running {
            what: "strait-proxy".into(),
            child,
            logs: Some((out, err)),
        };
        eventually("the proxy is ready", || {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                // Unwinding drops `proxy`, which prints its logs.
                panic!("strait-proxy exited ({status}) before it was ready");
            }
            match self.pod.try_curl(None, "http://127.0.0.1:4191/ready")? {
                (200, _) => Ok(()),
                (code, body) => Err(format!("/ready: {code} {body}")),
            }
        });
        self.proxy = Some(proxy);
    }

    /// A `--destinations` file of `(authority, endpoint)` pairs, each
    /// endpoint meshed with this pod's identity; its path.
    fn destinations(&self, entries: &[(&str, &str)]) -> String {
        let mut yaml = String::from("destinations:\n");
        for (authority, addr) in entries {
            yaml.push_str(&format!(
                "  - authority: \"{authority}\"\n    endpoints:\n      - {{ addr: \"{addr}\", identity: \"{IDENTITY}\" }}\n"
            ));
        }
        let path = self.dir.path().join("destinations.yaml");
        std::fs::write(&path, yaml).expect("write destinations");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .expect("chmod destinations");
        path.to_string_lossy().into_owned()
    }

    /// Runs `step`, then waits until `series` has grown (by one or more: a
    /// retried request counts again).
    fn grows(&self, series: &str, step: impl FnOnce()) {
        let before = metric(&self.metrics(), series).unwrap_or(0);
        step();
        eventually(&format!("{series} grows from {before}"), || {
            match metric(&self.metrics(), series) {
                Some(n) if n > before => Ok(()),
                other => Err(format!("{series} is {other:?}")),
            }
        });
    }

    /// The proxy's `/metrics`, fetched in the pod.
    fn metrics(&self) -> String {
        let (code, body) = self.pod.curl(None, "http://127.0.0.1:4191/metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        body
    }

    /// Waits until `series` has `value`; returns the line as served.
    fn wait_for_metric(&self, series: &str, value: u64) -> String {
        eventually(&format!("{series} == {value}"), || {
            let metrics = self.metrics();
            match metric(&metrics, series) {
                Some(v) if v == value => Ok(format!("{series} {v}")),
                other => Err(format!("got {other:?} in\n{}", strait_lines(&metrics))),
            }
        })
    }

    /// What the helper `send` role, as the application in the pod,
    /// received back from `addr` for `payload(len)`.
    fn send_from_pod(&self, addr: &str, len: usize) -> Vec<u8> {
        run_bytes(&mut self.helper(true, Some(APP_UID), &["send", addr, &len.to_string()])).1
    }
}

/// The non-comment lines of a metrics text that carry a value, for
/// failure messages.
fn strait_lines(metrics: &str) -> String {
    let lines: String = metrics
        .lines()
        .filter(|l| l.starts_with("strait_") && !l.contains("_bucket{"))
        .map(|l| format!("  {l}\n"))
        .collect();
    if lines.is_empty() {
        "  (no strait_ series yet)\n".into()
    } else {
        lines
    }
}

/// root.pem, issuer.pem and issuer.key in `dir`, readable by the proxy's
/// uid.
fn write_certs(dir: &Path) {
    let root = generate_root("transparent-proxy-netns").expect("root");
    let issuer = generate_issuer(&root, TRUST_DOMAIN).expect("issuer");
    std::fs::create_dir(dir).expect("mkdir certs");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod certs");
    for (name, pem) in [
        ("root.pem", &root.cert_pem),
        ("issuer.pem", &issuer.cert_pem),
        ("issuer.key", &issuer.key_pem),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write pem");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
}

#[test]
fn the_real_proxy_carries_a_pods_traffic_transparently_and_exits_on_sigterm() {
    let mut t = Pod::new();
    let (pod_ip, peer_ip) = (t.pod_ip(), t.peer_ip());
    let applied = t.init(&[]);
    assert!(applied.contains("IPv4 rules installed with "), "{applied}");

    // The application listens on the pod's addresses, and privately on
    // loopback.
    t.start_helper(true, Some(APP_UID), &["http", "0.0.0.0:8080", "app"]);
    t.start_helper(true, Some(APP_UID), &["http", "127.0.0.1:8081", "private"]);
    t.start_helper(false, Some(APP_UID), &["http", "0.0.0.0:8080", "peer"]);
    t.start_helper(false, Some(APP_UID), &["echo", "0.0.0.0:9000"]);
    // Names that resolve to this pod, meshed: its application (as a
    // Service of its own would), and its proxy's own inbound port (a
    // loop) and admin port.
    let own_service = format!("{peer_ip}:8090");
    let (to_inbound, to_admin) = (format!("{peer_ip}:8091"), format!("{peer_ip}:8092"));
    t.start_proxy(
        IPV4_LISTENERS,
        &[
            (&own_service, &format!("{pod_ip}:8080")),
            (&to_inbound, &format!("{pod_ip}:4143")),
            (&to_admin, &format!("{pod_ip}:4191")),
        ],
    );

    // a. Outbound HTTP: the application's request is redirected to the
    // proxy, which reads SO_ORIGINAL_DST and forwards to the unmeshed
    // peer.
    let peer_http = format!("{peer_ip}:8080");
    let (code, body) = t
        .pod
        .curl(Some(APP_UID), &format!("http://{peer_http}/hello.txt"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, format!("peer: GET /hello.txt host={peer_http}\n"));
    let out_requests = t.wait_for_metric(
        &format!(
            r#"strait_proxy_requests_total{{direction="outbound",authority="{peer_http}",tls="false"}}"#
        ),
        1,
    );
    let out_responses = t.wait_for_metric(
        &format!(
            r#"strait_proxy_responses_total{{direction="outbound",authority="{peer_http}",tls="false",status_class="2xx",grpc_status=""}}"#
        ),
        1,
    );
    eprintln!("{out_requests}\n{out_responses}");

    // b. Inbound HTTP: the peer's request to the pod's address is
    // redirected to 4143 and handed to the application at that address.
    let pod_http = format!("{pod_ip}:8080");
    let (code, body) = t.peer.curl(None, &format!("http://{pod_http}/inbound"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, format!("app: GET /inbound host={pod_http}\n"));
    let in_requests = t.wait_for_metric(
        &format!(
            r#"strait_proxy_requests_total{{direction="inbound",authority="{pod_http}",tls="false"}}"#
        ),
        1,
    );
    let in_opens = t.wait_for_metric(
        r#"strait_tcp_opens_total{direction="inbound",tls="false"}"#,
        1,
    );
    eprintln!("{in_requests}\n{in_opens}");

    // b1. The application calling its own pod by a name: out through the
    // outbound side, which dials the pod's own inbound port over mTLS (the
    // rules leave the proxy's own connections alone), and in again to the
    // application at the pod's address.
    let (code, body) = t
        .pod
        .curl(Some(APP_UID), &format!("http://{own_service}/self"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, format!("app: GET /self host={own_service}\n"));
    let self_requests = t.wait_for_metric(
        &format!(
            r#"strait_proxy_requests_total{{direction="inbound",authority="{own_service}",tls="true"}}"#
        ),
        1,
    );
    eprintln!("{self_requests}");

    // c. The admin port is not redirected: the peer reaches it directly,
    // and the inbound proxy never sees the connection.
    let (code, body) = t.peer.curl(None, &format!("http://{pod_ip}:4191/ready"));
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    assert_eq!(
        metric(
            &t.metrics(),
            r#"strait_tcp_opens_total{direction="inbound",tls="false"}"#
        ),
        Some(1),
        "the admin request went through the inbound proxy"
    );

    // c2. A port the application binds on loopback only stays private:
    // the proxy does not hand the peer's request to it (the application
    // itself still reaches it).
    let private = format!("{pod_ip}:8081");
    let (code, body) = t.peer.curl(None, &format!("http://{private}/secret"));
    assert_eq!(code, 502, "{body}");
    assert!(!body.contains("private:"), "{body}");
    let (code, body) = t.pod.curl(Some(APP_UID), "http://127.0.0.1:8081/own");
    assert_eq!(
        (code, body.as_str()),
        (200, "private: GET /own host=127.0.0.1:8081\n")
    );
    // A connection made straight to the inbound port on loopback (no
    // redirect: its destination is not one of the pod's addresses) is
    // refused, and so is one to the pod's own inbound port, which would
    // otherwise be forwarded to itself without end.
    assert!(t
        .pod
        .try_curl(Some(APP_UID), "http://127.0.0.1:4143/")
        .is_err());
    let refused = t.wait_for_metric(
        r#"strait_proxy_errors_total{direction="inbound",reason="not_inbound_ip"}"#,
        1,
    );
    assert!(t
        .peer
        .try_curl(None, &format!("http://{pod_ip}:4143/"))
        .is_err());
    let looped = t.wait_for_metric(
        r#"strait_proxy_errors_total{direction="inbound",reason="loop"}"#,
        1,
    );
    eprintln!("{refused}\n{looped}");
    // A mesh header naming the inbound port is refused the same way (the
    // GET is retried: counted once or more).
    let loop_errors = r#"strait_proxy_errors_total{direction="inbound",reason="loop"}"#;
    t.grows(loop_errors, || {
        let (code, body) = t.pod.curl(Some(APP_UID), &format!("http://{to_inbound}/"));
        assert_eq!(code, 502, "{body}");
    });
    // The admin port, on the pod's address, is any meshed client's to
    // reach (as it is directly): it sees the pod's address, not loopback,
    // so `/shutdown` would be refused.
    let (code, body) = t
        .pod
        .curl(Some(APP_UID), &format!("http://{to_admin}/ready"));
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (code, _) = t.pod.curl(None, "http://127.0.0.1:4191/ready");
    assert_eq!(code, 200, "the proxy is still up");

    // d. Opaque TCP: a client that speaks first, and not HTTP, is detected
    // as opaque and forwarded byte for byte to its original destination.
    let opens = r#"strait_tcp_opens_total{direction="outbound",tls="false"}"#;
    let opens_before = metric(&t.metrics(), opens).expect("outbound opens");
    let len = 256 * 1024;
    let echoed = t.send_from_pod(&format!("{peer_ip}:9000"), len);
    assert!(
        echoed == payload(len),
        "the echo differs: {} bytes back of {len}, first difference at {:?}",
        echoed.len(),
        echoed.iter().zip(payload(len)).position(|(a, b)| *a != b)
    );
    let len = len as u64;
    let out_opens = t.wait_for_metric(opens, opens_before + 1);
    // Only opaque forwarding counts bytes: exactly the echo's.
    let read = t.wait_for_metric(
        r#"strait_tcp_bytes_total{direction="outbound",tls="false",flow="read"}"#,
        len,
    );
    let write = t.wait_for_metric(
        r#"strait_tcp_bytes_total{direction="outbound",tls="false",flow="write"}"#,
        len,
    );
    eprintln!("{out_opens}\n{read}\n{write}");

    // d2. Rules from an older init that send the proxy's own connections
    // to its pod back to the inbound port: the inbound side's connection
    // to the application comes round again, and is refused instead of
    // looping.
    run(t.pod.exec(None, "iptables").args([
        "-t",
        "nat",
        "-I",
        "STRAIT_OUTPUT",
        "1",
        "!",
        "-d",
        "127.0.0.0/8",
        "-o",
        "lo",
        "-m",
        "owner",
        "--uid-owner",
        PROXY_UID,
        "-j",
        "STRAIT_INBOUND",
    ]));
    t.grows(loop_errors, || {
        let (code, body) = t.peer.curl(None, &format!("http://{pod_http}/again"));
        assert_eq!(code, 502, "{body}");
    });

    // e. SIGTERM: the idle proxy drains and exits 0 promptly.
    let mut proxy = t.proxy.take().expect("proxy running");
    let pid = proxy.child.id().to_string();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("read comm");
    assert_eq!(comm.trim(), "strait-proxy", "pid {pid} is not the proxy");
    run(Command::new("sh").args(["-c", r#"kill -TERM "$1""#, "sh", &pid]));
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = proxy.child.try_wait().expect("wait for the proxy") {
            break status;
        }
        assert!(
            signalled.elapsed() < EXIT_TIMEOUT,
            "strait-proxy still running {EXIT_TIMEOUT:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let logs = proxy.logs();
    assert!(status.success(), "strait-proxy exited {status}\n{logs}");
    assert!(
        logs.contains(
            "strait-proxy up: outbound 127.0.0.1:4140, inbound 0.0.0.0:4143, admin http://0.0.0.0:4191"
        ),
        "{logs}"
    );
    assert!(logs.contains("SIGTERM: draining"), "{logs}");
    eprintln!(
        "strait-proxy exited {status} {:?} after SIGTERM",
        signalled.elapsed()
    );
}

#[test]
fn a_dual_stack_pods_ipv6_and_ipv4_traffic_is_carried_transparently() {
    let mut t = Pod::new();
    let (pod_ip, pod_ip6, peer_ip6) = (t.pod_ip(), t.pod_ip6(), t.peer_ip6());
    let applied = t.init(&["--ipv6"]);
    assert!(applied.contains("IPv6 rules with "), "{applied}");

    t.start_helper(true, Some(APP_UID), &["http", "[::]:8080", "app"]);
    // An application on IPv4 only, and one on IPv6 only.
    t.start_helper(true, Some(APP_UID), &["http", "0.0.0.0:8082", "v4app"]);
    let v6_listen = format!("{pod_ip6}:8083");
    t.start_helper(true, Some(APP_UID), &["http", &v6_listen, "v6app"]);
    t.start_helper(false, Some(APP_UID), &["http", "[::]:8080", "peer"]);
    t.start_helper(false, Some(APP_UID), &["echo", "[::]:9000"]);
    // Names whose meshed endpoint is the pod's address of the family the
    // application does not listen on.
    let v4_service = format!("{peer_ip6}:8092");
    let v6_service = format!("{peer_ip6}:8093");
    t.start_proxy(
        DUAL_STACK_LISTENERS,
        &[
            (&v4_service, &format!("{pod_ip6}:8082")),
            (&v6_service, &format!("{pod_ip}:8083")),
        ],
    );

    // a. Outbound over IPv6: ip6tables redirects the application's
    // connection to [::1]:4140, and the proxy finds the original IPv6
    // destination.
    let peer_http = format!("{peer_ip6}:8080");
    let (code, body) = t
        .pod
        .curl(Some(APP_UID), &format!("http://{peer_http}/six.txt"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, format!("peer: GET /six.txt host={peer_http}\n"));
    t.wait_for_metric(
        &format!(
            r#"strait_proxy_requests_total{{direction="outbound",authority="{peer_http}",tls="false"}}"#
        ),
        1,
    );

    // b. Inbound over IPv6 and over IPv4: both reach the dual-stack inbound
    // listener, and the application at the address the peer dialled.
    for ip in [&pod_ip6, &pod_ip] {
        let pod_http = format!("{ip}:8080");
        let (code, body) = t.peer.curl(None, &format!("http://{pod_http}/in"));
        assert_eq!(code, 200, "{body}");
        assert_eq!(body, format!("app: GET /in host={pod_http}\n"));
        t.wait_for_metric(
            &format!(
                r#"strait_proxy_requests_total{{direction="inbound",authority="{pod_http}",tls="false"}}"#
            ),
            1,
        );
    }

    // b2. A mesh connection to the pod's IPv6 address reaches an
    // application listening on IPv4 only, and one to its IPv4 address an
    // application on IPv6 only: the family was the client proxy's choice,
    // and the inbound side falls back to the pod's other address.
    for (service, app) in [(&v4_service, "v4app"), (&v6_service, "v6app")] {
        let (code, body) = t.pod.curl(Some(APP_UID), &format!("http://{service}/mesh"));
        assert_eq!(code, 200, "{body}");
        assert_eq!(body, format!("{app}: GET /mesh host={service}\n"));
        t.wait_for_metric(
            &format!(
                r#"strait_proxy_requests_total{{direction="inbound",authority="{service}",tls="true"}}"#
            ),
            1,
        );
    }

    // c. The admin port answers over IPv6 and IPv4, directly.
    for ip in [&pod_ip6, &pod_ip] {
        let (code, body) = t.peer.curl(None, &format!("http://{ip}:4191/ready"));
        assert_eq!((code, body.as_str()), (200, "ready\n"), "{ip}");
    }

    // d. Opaque TCP over IPv6, byte for byte.
    let len = 64 * 1024;
    let echoed = t.send_from_pod(&format!("{peer_ip6}:9000"), len);
    assert!(
        echoed == payload(len),
        "the echo differs: {} bytes back of {len}",
        echoed.len()
    );
    t.wait_for_metric(
        r#"strait_tcp_bytes_total{direction="outbound",tls="false",flow="read"}"#,
        len as u64,
    );

    // e. `/shutdown` is for loopback, whichever family: IPv4 loopback
    // reaches the dual-stack admin listener as an IPv4-mapped address.
    let out = run(t
        .pod
        .exec(None, "curl")
        .args(["-q", "-sS", "--max-time", "10", "-X", "POST"])
        .arg("http://127.0.0.1:4191/shutdown"));
    assert_eq!(out.0, "shutting down\n", "{out:?}");
    let mut proxy = t.proxy.take().expect("proxy running");
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while proxy.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "still running after /shutdown");
        std::thread::sleep(Duration::from_millis(20));
    }
}

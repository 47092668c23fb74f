//! Transparent mode end to end, in network namespaces.
//!
//! Each test builds a "pod" namespace and a "peer" namespace joined by a
//! veth pair (`10.213.N.1` / `10.213.N.2`, `fd00:213:N::1` / `::2`),
//! installs the rules in the pod with `transparent_echo init` (which calls
//! `strait_proxy::transparent::apply`), and runs `transparent_echo proxy` in
//! the pod as the proxy's user (uid 2102), the "application" as `nobody`,
//! and plain servers on both sides. Whatever a client receives tells where
//! its connection went: `orig=<addr>` first if it passed through the proxy,
//! then the greeting of the server that finally answered.
//!
//! `examples/transparent_echo.rs` is compiled into this test and run by
//! executing this very binary again inside a namespace (the
//! `transparent_echo_helper` entry point below), so the test never runs a
//! stale build of the example.
//!
//! Needs root (`ip netns`) and `ip`, `iptables`, `ip6tables`, `setpriv`:
//! `scripts/install-test-tools.sh` installs them. The namespaces, and with
//! them the veth pair, are deleted when a test ends, pass or fail.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

#[path = "support/netns.rs"]
mod netns;
use netns::{run_output, runnable_by_others, Netns};

#[path = "../examples/transparent_echo.rs"]
#[allow(dead_code)]
mod transparent_echo;

/// Set (to the role's arguments, one per line) when this binary is run as
/// `transparent_echo` rather than as the test suite.
const HELPER_ENV: &str = "STRAIT_TRANSPARENT_ECHO_ARGS";

/// Not a test: the entry point the tests execute this binary into, inside
/// a namespace, to play one `transparent_echo` role. Its results go to
/// stderr (the test harness owns stdout). Without [`HELPER_ENV`] it does
/// nothing.
#[test]
fn transparent_echo_helper() {
    let Ok(args) = std::env::var(HELPER_ENV) else {
        return;
    };
    let args: Vec<String> = args.lines().map(str::to_owned).collect();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = match runtime.block_on(transparent_echo::run(&args, to_stderr)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("transparent_echo: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn to_stderr(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// The uid the test runs the proxy as (linkerd's choice).
const PROXY_UID: &str = "2102";
/// The uid the application's clients run as (`nobody`).
const APP_UID: &str = "65534";

fn preflight() {
    netns::preflight(
        "transparent_netns",
        &[
            "ip",
            "iptables-save",
            "iptables-restore",
            "ip6tables-save",
            "ip6tables-restore",
            "setpriv",
        ],
    );
}

/// This test binary, where `nobody` and uid 2102 may run it.
fn helper_binary(dir: &Path) -> PathBuf {
    runnable_by_others(&std::env::current_exe().expect("current_exe"), dir)
}

/// Runs a `transparent_echo` role to completion and returns what it
/// reported (on stderr).
fn run_echo(cmd: &mut Command) -> String {
    run_output(cmd).1
}

/// `ip netns exec <ns> [setpriv ...] <this binary>` playing the
/// `transparent_echo` role `args`.
fn command(ns: &Netns, uid: Option<&str>, program: &Path, args: &[&str]) -> Command {
    let mut cmd = ns.exec(uid, program);
    cmd.args([
        "--exact",
        "transparent_echo_helper",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(HELPER_ENV, args.join("\n"));
    cmd
}

/// A background process, killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two namespaces joined by a veth pair, the processes running in them and
/// the helper binary. Fields drop in order: processes, then namespaces,
/// then the binary's copy.
struct Topology {
    running: Vec<Running>,
    pod: Netns,
    peer: Netns,
    bin: PathBuf,
    _bin_dir: tempfile::TempDir,
}

impl Topology {
    /// Namespaces `strait-{pod,peer}-<pid>-<n>`, addresses in
    /// `10.213.<n>.0/24` and `fd00:213:<n>::/64`.
    fn new(n: u8) -> Topology {
        preflight();
        let bin_dir = tempfile::tempdir().expect("tempdir");
        let bin = helper_binary(bin_dir.path());
        let (pod, peer) = netns::linked_pair(n);
        Topology {
            running: Vec::new(),
            pod,
            peer,
            bin,
            _bin_dir: bin_dir,
        }
    }

    fn pod_v4(n: u8) -> String {
        format!("10.213.{n}.1")
    }

    /// Installs the rules in the pod and returns what `init` printed.
    fn init(&self, extra: &[&str]) -> String {
        let mut args = vec!["init", "--proxy-uid", PROXY_UID];
        args.extend_from_slice(extra);
        run_echo(&mut command(&self.pod, None, &self.bin, &args))
    }

    /// Starts a listening role in `ns` and waits for its `ready`.
    fn start(&mut self, in_pod: bool, uid: Option<&str>, args: &[&str]) {
        let ns = if in_pod { &self.pod } else { &self.peer };
        let mut child = command(ns, uid, &self.bin, args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
        let stderr = child.stderr.take().expect("stderr");
        let mut stderr = BufReader::new(stderr);
        let mut line = String::new();
        let _ = stderr.read_line(&mut line);
        if line.trim() != "ready" {
            let _ = child.kill();
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            let _ = child.wait();
            panic!("{args:?} in {} did not start: {line}{err}", ns.name);
        }
        self.running.push(Running(child));
    }

    /// The proxy (as uid 2102) and the pod's servers: the application on
    /// 8080 and 9090 (skipped inbound), the admin server on 4191; the
    /// peer's servers on 8080 and 9091 (skipped outbound).
    fn start_everything(&mut self) {
        self.start(true, Some(PROXY_UID), &["proxy", "[::]:4140", "[::]:4143"]);
        self.start(true, None, &["serve", "[::]:8080", "app 8080"]);
        self.start(true, None, &["serve", "[::]:9090", "app 9090"]);
        self.start(true, None, &["serve", "[::]:4191", "admin 4191"]);
        self.start(false, None, &["serve", "[::]:8080", "peer 8080"]);
        self.start(false, None, &["serve", "[::]:9091", "peer 9091"]);
    }

    /// What a client in the pod, running as `uid`, receives from `addr`.
    fn connect_in_pod(&self, uid: Option<&str>, addr: &str) -> String {
        run_echo(&mut command(&self.pod, uid, &self.bin, &["connect", addr]))
    }

    /// What a client in the peer namespace receives from `addr`.
    fn connect_in_peer(&self, addr: &str) -> String {
        run_echo(&mut command(
            &self.peer,
            None,
            &self.bin,
            &["connect", addr],
        ))
    }
}

#[test]
fn outbound_tcp_goes_through_the_proxy_except_its_own_loopback_and_skipped_ports() {
    let n = 1;
    let mut topo = Topology::new(n);
    let applied = topo.init(&[
        "--skip-outbound",
        "9091",
        "--skip-inbound",
        "9090",
        "--ipv6",
    ]);
    assert!(applied.contains("IPv4 rules installed with "), "{applied}");
    assert!(applied.contains("IPv6 rules with "), "{applied}");
    topo.start_everything();
    let peer = format!("10.213.{n}.2:8080");
    let peer6 = format!("[fd00:213:{n}::2]:8080");

    // The application's connection is redirected to the outbound port, the
    // proxy sees where it was going and (being uid 2102) reaches it
    // directly.
    assert_eq!(
        topo.connect_in_pod(Some(APP_UID), &peer),
        format!("orig={peer}\npeer 8080\n")
    );
    assert_eq!(
        topo.connect_in_pod(Some(APP_UID), &peer6),
        format!("orig={peer6}\npeer 8080\n")
    );
    // Root is not the proxy's user: redirected too.
    assert_eq!(
        topo.connect_in_pod(None, &peer),
        format!("orig={peer}\npeer 8080\n")
    );
    // The proxy's own user is never redirected.
    assert_eq!(topo.connect_in_pod(Some(PROXY_UID), &peer), "peer 8080\n");
    assert_eq!(topo.connect_in_pod(Some(PROXY_UID), &peer6), "peer 8080\n");
    // A skipped outbound port bypasses the proxy.
    assert_eq!(
        topo.connect_in_pod(Some(APP_UID), &format!("10.213.{n}.2:9091")),
        "peer 9091\n"
    );
    assert_eq!(
        topo.connect_in_pod(Some(APP_UID), &format!("[fd00:213:{n}::2]:9091")),
        "peer 9091\n"
    );
    // Loopback and the pod's own address (both leave through lo) stay
    // local for the application.
    assert_eq!(
        topo.connect_in_pod(Some(APP_UID), "127.0.0.1:8080"),
        "app 8080\n"
    );
    assert_eq!(
        topo.connect_in_pod(Some(APP_UID), "[::1]:8080"),
        "app 8080\n"
    );
    let own = format!("{}:8080", Topology::pod_v4(n));
    assert_eq!(topo.connect_in_pod(Some(APP_UID), &own), "app 8080\n");
    // So does the proxy's: its inbound side reaches the application at the
    // pod's address, and anything sending that back to the inbound port
    // would loop.
    assert_eq!(topo.connect_in_pod(Some(PROXY_UID), &own), "app 8080\n");
    let own6 = format!("[fd00:213:{n}::1]:8080");
    assert_eq!(topo.connect_in_pod(Some(PROXY_UID), &own6), "app 8080\n");
}

#[test]
fn inbound_tcp_goes_through_the_proxy_except_the_admin_and_skipped_ports() {
    let n = 2;
    let mut topo = Topology::new(n);
    topo.init(&[
        "--skip-outbound",
        "9091",
        "--skip-inbound",
        "9090",
        "--ipv6",
    ]);
    topo.start_everything();
    let pod = format!("10.213.{n}.1:8080");
    let pod6 = format!("[fd00:213:{n}::1]:8080");

    // Redirected to the inbound port, which sees the original destination
    // and hands the connection to the application at that address.
    assert_eq!(
        topo.connect_in_peer(&pod),
        format!("orig={pod}\napp 8080\n")
    );
    assert_eq!(
        topo.connect_in_peer(&pod6),
        format!("orig={pod6}\napp 8080\n")
    );
    // The admin port always reaches the admin server directly.
    assert_eq!(
        topo.connect_in_peer(&format!("10.213.{n}.1:4191")),
        "admin 4191\n"
    );
    assert_eq!(
        topo.connect_in_peer(&format!("[fd00:213:{n}::1]:4191")),
        "admin 4191\n"
    );
    // So does a skipped inbound port.
    assert_eq!(
        topo.connect_in_peer(&format!("10.213.{n}.1:9090")),
        "app 9090\n"
    );
    assert_eq!(
        topo.connect_in_peer(&format!("[fd00:213:{n}::1]:9090")),
        "app 9090\n"
    );
    // Other namespaces are untouched: the peer's own connections to itself.
    assert_eq!(
        topo.connect_in_peer(&format!("10.213.{n}.2:8080")),
        "peer 8080\n"
    );
}

#[test]
fn applying_again_leaves_exactly_the_last_configs_rules() {
    let n = 3;
    let topo = Topology::new(n);
    let first = topo.init(&["--skip-outbound", "9091", "--ipv6"]);
    assert!(!first.contains("replacing"), "fresh namespace: {first}");
    let v4 = topo.pod.nat_table("iptables-save");
    let v6 = topo.pod.nat_table("ip6tables-save");
    for table in [&v4, &v6] {
        let jumps = |chain: &str| {
            table
                .lines()
                .filter(|l| l.starts_with(&format!("-A {chain} ")) && l.contains("-j STRAIT_"))
                .count()
        };
        assert_eq!(jumps("PREROUTING"), 1, "{table}");
        assert_eq!(jumps("OUTPUT"), 1, "{table}");
        assert!(table.contains("--dports 9091 "), "{table}");
    }

    // The same config again: the same tables.
    let second = topo.init(&["--skip-outbound", "9091", "--ipv6"]);
    assert!(
        second.contains("replacing a previous run's rules"),
        "{second}"
    );
    assert_eq!(topo.pod.nat_table("iptables-save"), v4);
    assert_eq!(topo.pod.nat_table("ip6tables-save"), v6);

    // A changed config replaces the old rules instead of adding to them:
    // the pod ends up exactly as a fresh namespace given only that config.
    topo.init(&["--skip-outbound", "5432", "--ipv6"]);
    run_echo(&mut command(
        &topo.peer,
        None,
        &topo.bin,
        &[
            "init",
            "--proxy-uid",
            PROXY_UID,
            "--skip-outbound",
            "5432",
            "--ipv6",
        ],
    ));
    for tool in ["iptables-save", "ip6tables-save"] {
        let changed = topo.pod.nat_table(tool);
        assert_eq!(changed, topo.peer.nat_table(tool));
        assert!(changed.contains("--dports 5432 "), "{changed}");
        assert!(!changed.contains("9091"), "{changed}");
    }
}

//! Network-namespace plumbing shared by the transparent-mode tests: tool
//! checks, running commands, and namespaces of the test's own that are
//! deleted on drop.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Fails (never skips) when the test cannot run, saying how to fix it:
/// root is needed for `ip netns`, and every one of `tools`.
pub fn preflight(test: &str, tools: &[&str]) {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert_eq!(
        uid, "0",
        "{test} needs root (it creates network namespaces with `ip netns`); run it as root"
    );
    for tool in tools {
        assert!(
            on_path(tool),
            "{test}: `{tool}` is missing: run scripts/install-test-tools.sh"
        );
    }
}

/// Whether `tool` is on `PATH`.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

/// `exe`, where `nobody` and the proxy's uid may run it: in place if they
/// can reach it, else copied into `dir` (the target directory may sit under
/// a private home).
pub fn runnable_by_others(exe: &Path, dir: &Path) -> PathBuf {
    let others_may_run =
        |path: &Path| std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o001 != 0);
    if exe.ancestors().all(others_may_run) {
        return exe.to_path_buf();
    }
    let copy = dir.join(exe.file_name().expect("a file name"));
    std::fs::copy(exe, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", exe.display()));
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod bin");
    copy
}

/// Runs a command to completion; panics with its output if it fails.
/// Returns (stdout, stderr).
pub fn run_output(cmd: &mut Command) -> (String, String) {
    let (stdout, stderr) = run_bytes(cmd);
    (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// [`run_output`], the output as it came.
pub fn run_bytes(cmd: &mut Command) -> (Vec<u8>, Vec<u8>) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.stdout, out.stderr)
}

/// A network namespace of ours, deleted on drop.
pub struct Netns {
    /// Its name, `strait-<role>-<pid>-<n>`.
    pub name: String,
}

impl Netns {
    /// Adds `strait-<role>-<pid>-<n>`.
    pub fn add(role: &str, n: u8) -> Netns {
        let name = format!("strait-{role}-{}-{n}", std::process::id());
        run_output(Command::new("ip").args(["netns", "add", &name]));
        Netns { name }
    }

    /// `ip netns exec <ns> [setpriv --reuid=<uid> ...] <program>`. Both
    /// `ip netns exec` and `setpriv` exec, so the child's pid is the
    /// program's.
    pub fn exec(&self, uid: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]);
        if let Some(uid) = uid {
            cmd.arg("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups");
        }
        cmd.arg(program);
        cmd
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) {
        run_output(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    /// The `nat` table as `<tool> -t nat` prints it, minus the timestamp
    /// comments.
    pub fn nat_table(&self, save_tool: &str) -> String {
        let (out, _) = run_output(
            Command::new("ip").args(["netns", "exec", &self.name, save_tool, "-t", "nat"]),
        );
        out.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

/// A "pod" and a "peer" namespace joined by a veth pair: `veth0` in the
/// pod with `10.213.<n>.1/24` and `fd00:213:<n>::1/64`, `veth1` in the peer
/// with `.2` and `::2` (dual-stack; no duplicate address detection, so the
/// IPv6 addresses are usable at once); loopback up in both.
pub fn linked_pair(n: u8) -> (Netns, Netns) {
    let pod = Netns::add("pod", n);
    let peer = Netns::add("peer", n);
    pod.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &peer.name,
    ]);
    for (ns, dev, host) in [(&pod, "veth0", 1), (&peer, "veth1", 2)] {
        ns.ip(&["addr", "add", &format!("10.213.{n}.{host}/24"), "dev", dev]);
        let v6 = format!("fd00:213:{n}::{host}/64");
        ns.ip(&["addr", "add", &v6, "dev", dev, "nodad"]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["link", "set", dev, "up"]);
    }
    (pod, peer)
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .status()
        {
            Ok(status) if status.success() => {}
            other => eprintln!("could not delete netns {}: {other:?}", self.name),
        }
    }
}

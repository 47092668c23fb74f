//! Transparent mode for the sidecar: the `nat` rules that send a pod's TCP
//! traffic through the proxy, and the `SO_ORIGINAL_DST` lookup that tells
//! the proxy where a redirected connection was going.
//!
//! It works the way linkerd-init does. An init container (`strait-proxy
//! init`) runs once in the pod's network namespace with `CAP_NET_ADMIN` and
//! installs four chains in the `nat` table:
//!
//! - `PREROUTING` jumps to `STRAIT_INBOUND`: TCP arriving at the pod, except
//!   the admin port and [`InitConfig::skip_inbound_ports`], goes to
//!   `STRAIT_INBOUND_REDIRECT`, which redirects it to the inbound port.
//! - `OUTPUT` jumps to `STRAIT_OUTPUT`, in this order:
//!   1. every connection of the proxy's user is left alone (this is what
//!      keeps the proxy from redirecting itself);
//!   2. everything leaving through `lo` is left alone (the app talking to
//!      itself);
//!   3. [`InitConfig::skip_outbound_ports`] are left alone;
//!   4. all remaining TCP goes to `STRAIT_OUTPUT_REDIRECT`, which redirects
//!      it to the outbound port.
//!
//! The proxy's inbound side reaches the application at the pod's own
//! address (each connection's original destination), which rule 1 leaves
//! alone. Locally made connections never pass `PREROUTING`, so nothing
//! sends them back to the inbound port. A request the outbound side sends
//! to its own pod still passes the inbound side: meshed endpoints are
//! dialled on the inbound port itself. (linkerd-init dropped its rule that
//! sent the proxy's own-pod traffic back to the inbound side for the same
//! reason.) UDP is never redirected.
//!
//! The IPv4 and IPv6 rules are the same (`iptables` and `ip6tables`).
//!
//! [`rules`] is pure: it renders the whole `iptables-restore` input for a
//! config, and the tests pin it byte for byte. [`apply`] is the thin shell
//! that feeds it to `iptables-restore --noflush`.
//!
//! # Idempotence
//!
//! Running [`apply`] twice, or again with a changed config, leaves exactly
//! the rules of the last config, and it never touches anyone else's rules
//! (`--noflush`). Two mechanisms make that so:
//!
//! - `iptables-restore --noflush` *flushes* a user-defined chain that the
//!   input declares (`:STRAIT_OUTPUT - [0:0]`) and already exists, so the
//!   four `STRAIT_*` chains are rebuilt from scratch on every run.
//! - The jumps from the built-in `PREROUTING` and `OUTPUT` chains cannot be
//!   handled that way (declaring a built-in chain does not flush it), so
//!   [`apply`] first reads the table with `iptables-save -t nat` and
//!   [`restore_script`] deletes (`-D`) every jump to a `STRAIT_*` chain it
//!   finds there before appending the new ones.
//!
//! The whole input is one `*nat ... COMMIT` transaction: either all of it
//! takes effect or none of it does.
//!
//! # Which tool
//!
//! [`apply`] tries `iptables`, then `iptables-nft`, then `iptables-legacy`
//! (each as its `-save`/`-restore` pair, `ip6tables*` for IPv6): a tool that
//! is missing, or whose kernel backend is unavailable, is skipped; the
//! first that reads the table is used, and [`Applied`] says which.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};

/// Default port of the proxy's inbound listener.
pub const DEFAULT_INBOUND_PORT: u16 = 4143;
/// Default port of the proxy's outbound listener.
pub const DEFAULT_OUTBOUND_PORT: u16 = 4140;
/// Default port of the proxy's admin server (never redirected inbound).
pub const DEFAULT_ADMIN_PORT: u16 = 4191;

/// The chain `PREROUTING` jumps to.
pub const INBOUND_CHAIN: &str = "STRAIT_INBOUND";
/// The chain that redirects inbound TCP to the inbound port.
pub const INBOUND_REDIRECT_CHAIN: &str = "STRAIT_INBOUND_REDIRECT";
/// The chain `OUTPUT` jumps to.
pub const OUTPUT_CHAIN: &str = "STRAIT_OUTPUT";
/// The chain that redirects outbound TCP to the outbound port.
pub const OUTPUT_REDIRECT_CHAIN: &str = "STRAIT_OUTPUT_REDIRECT";

/// Most ports one `-m multiport --dports` match takes (an iptables limit).
const MULTIPORT_MAX: usize = 15;

/// What `strait-proxy init` needs to know to redirect a pod's traffic.
///
/// Build it with [`InitConfig::new`] (the defaults below), adjust the
/// fields, and check it with [`InitConfig::validate`] ([`apply`] refuses an
/// invalid config before touching anything).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitConfig {
    /// Where inbound TCP is redirected: the proxy's inbound listener.
    /// Default [`DEFAULT_INBOUND_PORT`] (4143).
    pub inbound_port: u16,
    /// Where outbound TCP is redirected: the proxy's outbound listener.
    /// Default [`DEFAULT_OUTBOUND_PORT`] (4140).
    pub outbound_port: u16,
    /// The proxy's admin port, always exempt from inbound redirection so
    /// that probes and scrapes reach the admin server directly. Default
    /// [`DEFAULT_ADMIN_PORT`] (4191).
    pub admin_port: u16,
    /// The user ID the proxy runs as: its connections are never redirected
    /// outbound (without this the proxy would redirect itself). Required.
    /// `0` is accepted but exempts every root process in the pod.
    pub proxy_uid: u32,
    /// Destination ports of inbound TCP that go straight to the
    /// application. Default none.
    pub skip_inbound_ports: Vec<u16>,
    /// Destination ports of outbound TCP that bypass the proxy (databases
    /// speaking server-first protocols, for example). Default none.
    pub skip_outbound_ports: Vec<u16>,
    /// Also install the same rules for IPv6 with `ip6tables`. Default
    /// `false` (many nodes have no IPv6 `nat` table).
    pub ipv6: bool,
}

impl InitConfig {
    /// The default ports, nothing skipped beyond the admin port, IPv4 only,
    /// for a proxy running as `proxy_uid`.
    pub fn new(proxy_uid: u32) -> Self {
        InitConfig {
            inbound_port: DEFAULT_INBOUND_PORT,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            admin_port: DEFAULT_ADMIN_PORT,
            proxy_uid,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            ipv6: false,
        }
    }

    /// Checks that the ports make sense: none is zero, and the inbound,
    /// outbound and admin ports are three different ports.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, port) in [
            ("inbound_port", self.inbound_port),
            ("outbound_port", self.outbound_port),
            ("admin_port", self.admin_port),
        ] {
            if port == 0 {
                return Err(ConfigError::ZeroPort { field });
            }
        }
        if self.skip_inbound_ports.contains(&0) {
            return Err(ConfigError::ZeroPort {
                field: "skip_inbound_ports",
            });
        }
        if self.skip_outbound_ports.contains(&0) {
            return Err(ConfigError::ZeroPort {
                field: "skip_outbound_ports",
            });
        }
        if self.inbound_port == self.outbound_port {
            return Err(ConfigError::SamePort {
                first: "inbound_port",
                second: "outbound_port",
                port: self.inbound_port,
            });
        }
        for (field, port) in [
            ("inbound_port", self.inbound_port),
            ("outbound_port", self.outbound_port),
        ] {
            if port == self.admin_port {
                return Err(ConfigError::SamePort {
                    first: field,
                    second: "admin_port",
                    port,
                });
            }
        }
        Ok(())
    }

    /// Inbound destination ports left alone: the admin port and
    /// [`InitConfig::skip_inbound_ports`], sorted, without duplicates.
    fn inbound_exempt(&self) -> Vec<u16> {
        let mut ports: BTreeSet<u16> = self.skip_inbound_ports.iter().copied().collect();
        ports.insert(self.admin_port);
        ports.into_iter().collect()
    }

    /// Outbound destination ports left alone, sorted, without duplicates.
    fn outbound_exempt(&self) -> Vec<u16> {
        let ports: BTreeSet<u16> = self.skip_outbound_ports.iter().copied().collect();
        ports.into_iter().collect()
    }
}

/// Why an [`InitConfig`] was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A port is 0, which iptables cannot match or redirect to.
    #[error("{field}: port 0 is not a port")]
    ZeroPort {
        /// The offending field.
        field: &'static str,
    },
    /// Two of the inbound, outbound and admin ports are the same.
    #[error("{first} and {second} are both {port}: they must differ")]
    SamePort {
        /// The first field.
        first: &'static str,
        /// The second field.
        second: &'static str,
        /// The shared port.
        port: u16,
    },
}

/// Which IP version a rule set is for: the loopback range and the tool
/// names differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4, `iptables`.
    Ipv4,
    /// IPv6, `ip6tables`.
    Ipv6,
}

impl Family {
    /// `iptables` or `ip6tables`.
    fn tool_prefix(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables",
            Family::Ipv6 => "ip6tables",
        }
    }
}

/// The `iptables-restore` input (for `iptables` and `ip6tables` alike):
/// the four `STRAIT_*` chains and the jumps to them from `PREROUTING` and
/// `OUTPUT`, as one `nat` transaction. Feed it to `iptables-restore
/// --noflush` in a namespace that has none of our rules yet; [`apply`]
/// also handles one that has.
///
/// The config is not validated here; [`apply`] validates it.
pub fn rules(cfg: &InitConfig) -> String {
    restore_script(cfg, "")
}

/// The `iptables-restore --noflush` input that turns a `nat` table, as
/// `iptables-save -t nat` printed it (`installed`), into one carrying
/// exactly `cfg`'s rules: [`rules`] plus a `-D` for every jump from a
/// built-in chain to one of our chains already there (see the module's
/// section on idempotence). Pure.
pub fn restore_script(cfg: &InitConfig, installed: &str) -> String {
    let mut out = String::from("*nat\n");
    for chain in [
        INBOUND_CHAIN,
        INBOUND_REDIRECT_CHAIN,
        OUTPUT_CHAIN,
        OUTPUT_REDIRECT_CHAIN,
    ] {
        // Declaring an existing user-defined chain under --noflush flushes it.
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for rule in stale_jumps(installed) {
        out.push_str(&format!("-D {rule}\n"));
    }

    let mut rule = |chain: &str, spec: &str, comment: &str, target: &str| {
        out.push_str(&format!(
            "-A {chain} {spec}-m comment --comment \"strait/{comment}\" -j {target}\n"
        ));
    };

    // Inbound: everything but the exempt ports goes to the inbound port.
    for ports in cfg.inbound_exempt().chunks(MULTIPORT_MAX) {
        rule(
            INBOUND_CHAIN,
            &format!("-p tcp -m multiport --dports {} ", port_list(ports)),
            "skip-inbound-ports",
            "RETURN",
        );
    }
    rule(
        INBOUND_CHAIN,
        "-p tcp ",
        "redirect-inbound",
        INBOUND_REDIRECT_CHAIN,
    );
    rule(
        INBOUND_REDIRECT_CHAIN,
        "-p tcp ",
        "to-inbound-port",
        &format!("REDIRECT --to-ports {}", cfg.inbound_port),
    );

    // Outbound: the proxy's own traffic, loopback and skipped ports stay put.
    let uid = cfg.proxy_uid;
    rule(
        OUTPUT_CHAIN,
        &format!("-m owner --uid-owner {uid} "),
        "skip-proxy-uid",
        "RETURN",
    );
    rule(OUTPUT_CHAIN, "-o lo ", "skip-loopback", "RETURN");
    for ports in cfg.outbound_exempt().chunks(MULTIPORT_MAX) {
        rule(
            OUTPUT_CHAIN,
            &format!("-p tcp -m multiport --dports {} ", port_list(ports)),
            "skip-outbound-ports",
            "RETURN",
        );
    }
    rule(
        OUTPUT_CHAIN,
        "-p tcp ",
        "redirect-outbound",
        OUTPUT_REDIRECT_CHAIN,
    );
    rule(
        OUTPUT_REDIRECT_CHAIN,
        "-p tcp ",
        "to-outbound-port",
        &format!("REDIRECT --to-ports {}", cfg.outbound_port),
    );

    // The entry points, last, so nothing is redirected half-built.
    rule("PREROUTING", "", "inbound", INBOUND_CHAIN);
    rule("OUTPUT", "", "outbound", OUTPUT_CHAIN);
    out.push_str("COMMIT\n");
    out
}

/// `1,2,3`.
fn port_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The rule specs (`PREROUTING -m comment ... -j STRAIT_INBOUND`, without
/// the leading `-A `) of every jump from a built-in chain of `installed`
/// (`iptables-save -t nat` output) to one of our chains, in order.
fn stale_jumps(installed: &str) -> Vec<&str> {
    const OURS: [&str; 4] = [
        INBOUND_CHAIN,
        INBOUND_REDIRECT_CHAIN,
        OUTPUT_CHAIN,
        OUTPUT_REDIRECT_CHAIN,
    ];
    const BUILT_IN: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];
    let mut in_nat = false;
    let mut found = Vec::new();
    for line in installed.lines() {
        let line = line.trim_end();
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        let Some(spec) = line.strip_prefix("-A ") else {
            continue;
        };
        let mut words = spec.split_whitespace();
        let Some(chain) = words.next() else {
            continue;
        };
        let words: Vec<&str> = words.collect();
        let jumps_to_ours = matches!(
            words.as_slice(),
            [.., "-j", target] if OURS.contains(target)
        );
        if BUILT_IN.contains(&chain) && jumps_to_ours {
            found.push(spec);
        }
    }
    found
}

/// One iptables flavour's pair of commands for one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tools {
    save: String,
    restore: String,
}

/// The flavours [`apply`] tries, in order: the system's default `iptables`
/// (whatever the distribution's alternatives point at), then nftables, then
/// legacy x_tables.
const FLAVOURS: [&str; 3] = ["", "-nft", "-legacy"];

impl Tools {
    fn new(family: Family, flavour: &str) -> Self {
        let base = format!("{}{flavour}", family.tool_prefix());
        Tools {
            save: format!("{base}-save"),
            restore: format!("{base}-restore"),
        }
    }
}

/// What [`apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The command that installed the IPv4 rules (`iptables-restore`,
    /// `iptables-nft-restore` or `iptables-legacy-restore`).
    pub ipv4: String,
    /// The command that installed the IPv6 rules, if
    /// [`InitConfig::ipv6`] asked for them.
    pub ipv6: Option<String>,
    /// How many stale jumps from built-in chains a previous run had left
    /// and this one replaced (0 in a fresh namespace).
    pub replaced_jumps: usize,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IPv4 rules installed with {}", self.ipv4)?;
        if let Some(v6) = &self.ipv6 {
            write!(f, ", IPv6 rules with {v6}")?;
        }
        if self.replaced_jumps > 0 {
            write!(f, " (replacing a previous run's rules)")?;
        }
        Ok(())
    }
}

/// Why [`apply`] failed. Nothing was changed unless the error says so: each
/// address family is one `iptables-restore` transaction.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// The config is invalid; nothing was run.
    #[error("invalid transparent-mode config: {0}")]
    Config(#[from] ConfigError),
    /// None of the candidate tools is installed.
    #[error(
        "no iptables tool found (tried {}): install iptables (Debian: apt-get install iptables)",
        .tried.join(", ")
    )]
    ToolMissing {
        /// The commands looked for, in order.
        tried: Vec<String>,
    },
    /// The kernel refused: the init container lacks root or `CAP_NET_ADMIN`.
    #[error("{tool} was denied permission: run it as root or with CAP_NET_ADMIN in the pod's network namespace ({stderr})")]
    PermissionDenied {
        /// The command that was refused.
        tool: String,
        /// What it printed.
        stderr: String,
    },
    /// A tool exists but could not be run, or its input not written.
    #[error("could not run {tool}")]
    Run {
        /// The command.
        tool: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A tool ran and failed (a kernel without the `nat` table or the
    /// `owner`, `multiport`, `comment` or `REDIRECT` extensions, a rule
    /// rejected).
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        /// The command.
        tool: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed.
        stderr: String,
    },
    /// IPv4 rules went in but the IPv6 ones did not: the pod is half
    /// redirected. Retrying is safe (the rules are idempotent).
    #[error("IPv4 rules were installed with {ipv4}, but IPv6 failed: {source}")]
    Ipv6Failed {
        /// The command that installed the IPv4 rules.
        ipv4: String,
        /// Why IPv6 failed.
        #[source]
        source: Box<InitError>,
    },
}

/// Installs the transparent-mode rules of `cfg` in the current network
/// namespace, replacing any from an earlier run (see the module docs), and
/// says which tool did it. Needs root or `CAP_NET_ADMIN`; blocks while the
/// tools run.
pub fn apply(cfg: &InitConfig) -> Result<Applied, InitError> {
    cfg.validate()?;
    let v4: Vec<Tools> = FLAVOURS
        .iter()
        .map(|f| Tools::new(Family::Ipv4, f))
        .collect();
    let (flavour, ipv4, mut replaced_jumps) = apply_family(cfg, &v4)?;
    let mut applied = Applied {
        ipv4: ipv4.restore.clone(),
        ipv6: None,
        replaced_jumps: 0,
    };
    if cfg.ipv6 {
        // The same flavour as IPv4: rules split across nftables and legacy
        // x_tables are a debugging nightmare.
        let v6 = [Tools::new(Family::Ipv6, FLAVOURS[flavour])];
        match apply_family(cfg, &v6) {
            Ok((_, tools, replaced)) => {
                applied.ipv6 = Some(tools.restore);
                replaced_jumps += replaced;
            }
            Err(e) => {
                return Err(InitError::Ipv6Failed {
                    ipv4: applied.ipv4,
                    source: Box::new(e),
                })
            }
        }
    }
    applied.replaced_jumps = replaced_jumps;
    tracing::info!(%applied, "transparent-mode rules installed");
    Ok(applied)
}

/// Picks the first of `candidates` whose save command reads the `nat`
/// table, and restores `cfg`'s rules with its restore command. Returns the
/// index of the candidate used, its tools and how many stale jumps it
/// replaced.
fn apply_family(
    cfg: &InitConfig,
    candidates: &[Tools],
) -> Result<(usize, Tools, usize), InitError> {
    let mut first_failure = None;
    for (i, tools) in candidates.iter().enumerate() {
        let installed = match run(&tools.save, &["-t", "nat"], None) {
            Ok(out) => out,
            Err(InitError::Run { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue
            }
            Err(e @ InitError::PermissionDenied { .. }) => return Err(e),
            Err(e) => {
                // This flavour's kernel backend may be missing: try the next.
                tracing::debug!(error = %e, "iptables flavour unusable");
                first_failure.get_or_insert(e);
                continue;
            }
        };
        let script = restore_script(cfg, &installed);
        let replaced = stale_jumps(&installed).len();
        run(&tools.restore, &["--noflush"], Some(&script))?;
        return Ok((i, tools.clone(), replaced));
    }
    Err(first_failure.unwrap_or_else(|| InitError::ToolMissing {
        tried: candidates.iter().map(|t| t.save.clone()).collect(),
    }))
}

/// Runs `tool args`, with `stdin` as its input, and returns its output.
fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
    let run_error = |source| InitError::Run {
        tool: tool.to_owned(),
        source,
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(run_error)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error (the tool exited early) shows in its status below.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(run_error)?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(failure(tool, out.status, stderr))
}

/// Classifies a failed run: permission problems get their own variant, so
/// the operator is told about `CAP_NET_ADMIN` rather than shown a raw exit
/// code.
fn failure(tool: &str, status: ExitStatus, stderr: String) -> InitError {
    let lower = stderr.to_ascii_lowercase();
    let denied = [
        "permission denied",
        "you must be root",
        "operation not permitted",
    ]
    .iter()
    .any(|needle| lower.contains(needle));
    if denied {
        InitError::PermissionDenied {
            tool: tool.to_owned(),
            stderr,
        }
    } else {
        InitError::Failed {
            tool: tool.to_owned(),
            status,
            stderr,
        }
    }
}

/// Where a connection that iptables redirected to this proxy was going
/// (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` on IPv6). For a
/// connection that was not redirected it is the connection's own local
/// address. An IPv4 connection accepted on a dual-stack `[::]` listener is
/// asked the IPv4 way and answers an IPv4 address.
pub fn original_dst(tcp: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    original_dst_of(tcp, tcp.local_addr()?)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn original_dst_of(tcp: &tokio::net::TcpStream, local: SocketAddr) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match local {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        // A v4-mapped peer on a dual-stack socket: conntrack has an IPv4 entry.
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => match sock.original_dst_v4() {
            Ok(addr) => addr,
            Err(_) => sock.original_dst_v6()?,
        },
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP socket address",
        )
    })
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn original_dst_of(_tcp: &tokio::net::TcpStream, _local: SocketAddr) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SO_ORIGINAL_DST exists only on Linux",
    ))
}

#[cfg(test)]
mod tests;

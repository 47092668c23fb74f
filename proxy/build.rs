//! Links the binaries with packed relative relocations (DT_RELR) where the
//! C library loading them knows the format (glibc 2.36 or later, as in the
//! Debian 12 image): a position-independent executable keeps its address
//! randomisation while its relocation table shrinks from ~350 KB of
//! 24-byte entries, all read at every start, to a few kilobytes of bitmaps.
//! A binary built so would not start on an older glibc, so the build only
//! asks for it when it runs on the glibc the binary is built for. Where the
//! linker takes an ordering file, the functions a running sidecar uses are
//! also laid out together (`symbol-order.txt`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let native = var("TARGET") == var("HOST");
    if var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && native
        && glibc_at_least(2, 36)
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    // The functions a running sidecar uses, laid out first and together
    // (bench/symbol-order.sh says why and how the list is made), where the
    // linker takes an ordering file: rust-lld, the default of rustup's
    // toolchains on this target since Rust 1.90, does; GNU ld does not.
    // Names the build does not have are skipped, silently.
    // Watched by its absolute path, the one handed to the linker: another
    // checkout sharing the target directory reuses this script's output
    // (cargo keys it by the path within the workspace), and once that
    // path is gone cargo runs the script again instead of linking against
    // a file that is no longer there.
    let order = format!("{}/symbol-order.txt", var("CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-changed={order}");
    if links_with("-Wl,--symbol-ordering-file=/dev/null") {
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={order}");
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// Whether an empty program links for the target with `arg` added, as
/// this build's binaries are linked (with its rustflags and linker).
fn links_with(arg: &str) -> bool {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let out = std::path::PathBuf::from(var("OUT_DIR"));
    let source = out.join("link_probe.rs");
    if std::fs::write(&source, "fn main() {}\n").is_err() {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut probe = std::process::Command::new(rustc);
    probe
        .arg("--target")
        .arg(var("TARGET"))
        .arg("-o")
        .arg(out.join("link_probe"))
        .arg("-C")
        .arg(format!("link-arg={arg}"));
    for flag in var("CARGO_ENCODED_RUSTFLAGS").split('\x1f') {
        if !flag.is_empty() {
            probe.arg(flag);
        }
    }
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        probe.arg("-C").arg(format!("linker={linker}"));
    }
    probe
        .arg(&source)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this machine's glibc (`getconf GNU_LIBC_VERSION`: `glibc 2.36`)
/// is at least `major.minor`; false when that cannot be told.
fn glibc_at_least(major: u32, minor: u32) -> bool {
    let Ok(out) = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(version) = text.trim().strip_prefix("glibc ") else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

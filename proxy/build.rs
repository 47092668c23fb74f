//! Links the binaries with packed relative relocations (DT_RELR) where the
//! C library loading them knows the format (glibc 2.36 or later, as in the
//! Debian 12 image): a position-independent executable keeps its address
//! randomisation while its relocation table shrinks from ~350 KB of
//! 24-byte entries, all read at every start, to a few kilobytes of bitmaps.
//! A binary built so would not start on an older glibc, so the build only
//! asks for it when it runs on the glibc the binary is built for. With
//! lld, the functions a running sidecar uses are also laid out together
//! (`symbol-order.txt`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
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
    // (bench/symbol-order.sh says why and how the list is made). Only
    // where the linker is rust-lld: the default for this target since Rust
    // 1.90, unless a linker is configured (GNU ld has no such option).
    // Names the build does not have are skipped, silently.
    let configured_linker = std::env::var_os("RUSTC_LINKER").is_some()
        || var("CARGO_ENCODED_RUSTFLAGS").contains("link");
    if var("TARGET") == "x86_64-unknown-linux-gnu"
        && !configured_linker
        && rustc_minor().is_some_and(|minor| minor >= 90)
    {
        println!("cargo:rerun-if-changed=symbol-order.txt");
        let order = format!("{}/symbol-order.txt", var("CARGO_MANIFEST_DIR"));
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={order}");
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// The minor version of the compiler building this (`rustc 1.95.0 ...`:
/// 95), if it can be told.
fn rustc_minor() -> Option<u32> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(1)?;
    let mut parts = version.split('.');
    match (parts.next(), parts.next()) {
        (Some("1"), Some(minor)) => minor.parse().ok(),
        _ => None,
    }
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

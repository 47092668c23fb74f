//! What every Strait binary does at its edge, the same way: parse flags
//! (exit 2 on a usage error), log to stderr with `STRAIT_LOG` overriding a
//! default filter, start the runtime, and turn the outcome into an exit
//! code (1 with the error chain on failure).

use std::process::ExitCode;

/// Parses the command line, or prints clap's message and gives the exit
/// code (2 for errors, 0 for `--help` and `--version`).
pub fn parse<C: clap::Parser>() -> Result<C, ExitCode> {
    C::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// Logs to stderr with `default_filter`, unless `STRAIT_LOG` says
/// otherwise; installs Strait's crypto provider. A `STRAIT_LOG` that does
/// not parse is reported on stderr and the default used.
pub fn init(default_filter: &str) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let from_env = std::env::var("STRAIT_LOG").ok().and_then(|spec| {
        log_filter(&spec)
            .map_err(|error| eprintln!("STRAIT_LOG: {error}; logging with {default_filter:?}"))
            .ok()
    });
    let filter = from_env
        .or_else(|| log_filter(default_filter).ok())
        .unwrap_or_default();
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    crate::tls::install_default_provider();
}

/// For tests: logs through the test harness's capture when
/// `STRAIT_TEST_LOG` holds a filter (`debug`, `strait_proxy=debug`); a
/// filter that does not parse fails the test. Later calls do nothing.
pub fn test_logs() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    if let Ok(spec) = std::env::var("STRAIT_TEST_LOG") {
        let filter = log_filter(&spec).expect("STRAIT_TEST_LOG parses");
        let _ = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_test_writer())
            .with(filter)
            .try_init();
    }
}

/// A log filter: `level` or `target=level`, comma-separated (`info`,
/// `warn,strait_proxy=debug`), as tracing's `EnvFilter` takes them
/// without span and field directives (and so without a regex engine in
/// every binary). Empty pieces are skipped, as `EnvFilter` does; a span
/// or field directive is refused rather than taken as a target.
pub fn log_filter(spec: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    let mut directives = Vec::new();
    for piece in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if piece.contains(['[', ']', '{', '}']) {
            return Err(format!(
                "{piece:?}: span and field directives are not supported"
            ));
        }
        // tracing would read `target=` as `target=error`.
        if piece.ends_with('=') {
            return Err(format!("{piece:?}: no level"));
        }
        directives.push(piece);
    }
    if directives.is_empty() {
        return Err("no directives".to_string());
    }
    directives
        .join(",")
        .parse()
        .map_err(|e: tracing_subscriber::filter::ParseError| e.to_string())
}

/// Runs `f` on a runtime with `threads` workers (default: one per CPU).
///
/// One thread means tokio's current-thread scheduler rather than a
/// work-stealing pool of one (as linkerd2-proxy does with one core): no
/// shared run queues to synchronise, no worker to unpark, every wake-up a
/// push onto a local queue.
pub fn run_async(
    threads: Option<usize>,
    f: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut runtime = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))?;
    let result = runtime.block_on(async {
        tokio::spawn(timer_floor());
        f.await
    });
    // Blocking work still running (a `getaddrinfo` a dead DNS server
    // holds) must not keep the process from exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// Keeps a timer at most a second away in tokio's timer wheel, for the
/// life of the runtime.
///
/// A new timer wakes the runtime's driver (a write to its eventfd, and one
/// more turn of its event loop) whenever it is due before every timer the
/// driver last went to sleep with, and always when there was none. Each
/// proxied request sets a timeout of seconds; on a proxy with no other
/// timer pending (an inbound proxy serving HTTP/2) that was one wake-up for
/// nearly every request. With this tick pending, deadlines beyond a second
/// are inserted silently.
async fn timer_floor() {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// The exit code of an outcome; errors are printed with their causes.
pub fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_filters_parse_levels_and_targets_only() {
        use tracing::level_filters::LevelFilter;
        let f = super::log_filter("warn,strait_proxy=debug,h2=off").expect("parses");
        assert_eq!(f.default_level(), Some(LevelFilter::WARN));
        assert!(f.would_enable("strait_proxy::sidecar", &tracing::Level::DEBUG));
        assert!(!f.would_enable("h2::codec", &tracing::Level::ERROR));
        assert!(!f.would_enable("hyper", &tracing::Level::INFO));
        assert!(super::log_filter("strait_proxy=loud").is_err());
        // A trailing or doubled comma is no directive (tracing's parser
        // would take it as `error` for everything).
        let f = super::log_filter("info,,strait_proxy=debug,").expect("parses");
        assert_eq!(f.default_level(), Some(LevelFilter::INFO));
        assert!(super::log_filter("strait_proxy[conn]=debug").is_err());
        assert!(super::log_filter("[{peer=x}]=debug").is_err());
        assert!(super::log_filter(" , ").is_err());
        assert!(super::log_filter("info,h2=").is_err());
        // The binaries' defaults.
        for default in [
            "warn",
            "warn,strait_proxy=info",
            "warn,kube_client=off",
            "warn,strait_gateway=info,strait_proxy=info",
        ] {
            assert!(super::log_filter(default).is_ok(), "{default}");
        }
    }
}

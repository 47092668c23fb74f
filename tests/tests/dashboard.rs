//! The gateway dashboard (`/` on the admin port) as a browser shows it:
//! headless Chromium loads the page, its script fetches the API, and the
//! rendered DOM lists the peer, the import and the export.

use std::process::Command;
use std::time::Duration;

use strait_tests::*;

const HELLO: &str = "hello.demo.svc.clusterset.local";

fn chromium_dom(url: &str) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ])
        .output()
        .expect("chromium (scripts/install-test-tools.sh installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_peers_imports_and_exports_in_a_browser() {
    let bed = Testbed::new(&["west", "east"]);
    let east = bed.start_hello_east().await;
    let west = bed
        .start(bed.config("west", None, &[("east", Some(east.tunnel_addr()), None)]))
        .await;
    let vip = import_vip(&west, HELLO).await;
    eventually(Duration::from_secs(20), "east connected", || async {
        west.peers().iter().any(|p| p.connected).then_some(())
    })
    .await;

    let page = http_get_path(west.admin_addr(), "admin", "/")
        .await
        .expect("dashboard");
    assert!(page.contains("<title>Strait gateway</title>"), "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external resources"
    );

    let url = format!("http://{}/", west.admin_addr());
    let dom = tokio::task::spawn_blocking(move || chromium_dom(&url))
        .await
        .expect("chromium task");
    for want in [
        "data-name=\"east\"",
        "connected",
        "quic",
        HELLO,
        &vip.to_string(),
        "spiffe://east.strait.local/ns/strait-system/sa/strait-gateway",
        "nothing exported",
    ] {
        assert!(
            dom.contains(want),
            "{want} missing from the rendered page:\n{dom}"
        );
    }
    // The error banner stayed hidden: every API call answered.
    assert!(
        dom.contains("<div id=\"error\" style=\"display: none;\">"),
        "{dom}"
    );

    // East's page lists its export and the peer that dials in.
    let url = format!("http://{}/", east.admin_addr());
    let dom = tokio::task::spawn_blocking(move || chromium_dom(&url))
        .await
        .expect("chromium task");
    assert!(
        dom.contains("demo/hello") && dom.contains("http 8080/TCP"),
        "{dom}"
    );
    assert!(dom.contains("waiting for peer"), "{dom}");
}

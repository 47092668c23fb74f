//! Helpers for the crate's unit tests.

use std::time::Duration;

/// Waits until `done` (polled every 10 ms); fails naming `what` after 10 s.
pub(crate) async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

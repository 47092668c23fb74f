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

/// A valid YAML document with up to four edits (a line dropped or doubled,
/// a span cut out, YAML punctuation or an alias put in): the slips and
/// mangles of hand-edited files and values rendered by templates.
pub(crate) fn edited_yaml(base: &'static str) -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let edit = (
        0..4u8,
        any::<proptest::sample::Index>(),
        any::<proptest::sample::Index>(),
        proptest::sample::select(vec![
            ":",
            "- ",
            "{",
            "}",
            "[",
            "]",
            "\"",
            "'",
            "&a ",
            "*a",
            "!!str ",
            "|",
            ">",
            "#",
            "\t",
            "\n  ",
            "~",
            "-1",
            "99999999999999999999",
            "0x1F",
            ".inf",
            "?",
            "<<: *a",
            "é",
        ]),
    );
    proptest::collection::vec(edit, 0..4).prop_map(move |edits| {
        let mut text = base.to_string();
        for (kind, a, b, token) in edits {
            // Char boundaries only: the text stays a &str.
            let cuts: Vec<usize> = text
                .char_indices()
                .map(|(i, _)| i)
                .chain([text.len()])
                .collect();
            let (i, j) = {
                let (x, y) = (cuts[a.index(cuts.len())], cuts[b.index(cuts.len())]);
                (x.min(y), x.max(y))
            };
            let lines: Vec<&str> = text.lines().collect();
            let line = a.index(lines.len().max(1));
            text = match kind {
                0 => text[..i].to_string() + &text[j..],
                1 => text[..i].to_string() + token + &text[i..],
                2 => {
                    let mut l: Vec<&str> = lines.clone();
                    if !l.is_empty() {
                        l.remove(line);
                    }
                    l.join("\n")
                }
                _ => {
                    let mut l: Vec<&str> = lines.clone();
                    if let Some(&s) = l.get(line) {
                        l.insert(line, s);
                    }
                    l.join("\n")
                }
            };
        }
        text
    })
}

//! Printing: aligned tables, JSON, YAML, and `describe` pages.

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table.
    Table,
    /// A table with more columns.
    Wide,
    Json,
    Yaml,
    /// Just the names, `kind/name`, one per line.
    Name,
}

/// Text from elsewhere (what nodes report, workload output) made safe for a
/// terminal: control characters (escape sequences, carriage returns, bells)
/// are shown as `\x1b`-style escapes instead of being obeyed. Tabs stay.
pub fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() && c != '\t') {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() && c != '\t' {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Prints rows under headers, columns padded to their widest cell. Cells
/// are [`clean`]ed and hold no tabs or newlines.
/// An event's age, and for a series of events alike how many over how
/// long, as `kubectl describe` shows them: `5s (x2490 over 2m)`.
pub fn event_age(e: &edge_api::model::Event, now_ms: u64) -> String {
    let age = edge_api::time::age(now_ms.saturating_sub(e.ts_ms));
    match e.first_ts_ms {
        Some(first) if e.count > 1 => {
            format!("{age} (x{} over {})", e.count, edge_api::time::age(now_ms.saturating_sub(first)))
        }
        _ => age,
    }
}

pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> =
        rows.iter().map(|r| r.iter().map(|c| clean(&c.replace(['\t', '\n'], " ")).into_owned()).collect()).collect();
    let rows = &rows;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(c);
            if i + 1 < n {
                out.push_str(&" ".repeat(widths[i] - c.chars().count() + 3));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(|s| s.as_str()).collect(), &mut out);
    }
    out
}

/// YAML for a JSON value: block style, strings quoted when plain YAML would misread them.
pub fn yaml(v: &Value) -> String {
    let mut out = String::new();
    yaml_into(v, 0, &mut out, false);
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let plain = !s.is_empty()
                && !s.starts_with(|c: char| c.is_whitespace() || "-?:,[]{}#&*!|>'\"%@`~".contains(c))
                && !s.ends_with(char::is_whitespace)
                && !s.contains(": ")
                && !s.contains(" #")
                && !s.chars().any(char::is_control)
                && !matches!(
                    s.to_ascii_lowercase().as_str(),
                    "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "~"
                )
                && s.parse::<f64>().is_err();
            // JSON escapes C0 controls; `clean` writes the rest (C1) as YAML's \xNN.
            if plain { s.clone() } else { clean(&serde_json::to_string(s).unwrap_or_default()).into_owned() }
        }
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(o) if o.is_empty() => "{}".into(),
        _ => String::new(),
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Array(a) if !a.is_empty()) || matches!(v, Value::Object(o) if !o.is_empty())
}

fn yaml_into(v: &Value, indent: usize, out: &mut String, in_list: bool) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (i, (k, val)) in o.iter().enumerate() {
                let key = scalar(&Value::String(k.clone()));
                let lead = if in_list && i == 0 { String::new() } else { pad.clone() };
                if is_block(val) {
                    out.push_str(&format!("{lead}{key}:\n"));
                    yaml_into(val, indent + 2, out, false);
                } else {
                    out.push_str(&format!("{lead}{key}: {}\n", scalar(val)));
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for item in a {
                if is_block(item) {
                    out.push_str(&format!("{pad}- "));
                    yaml_into(item, indent + 2, out, true);
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_of_events_says_how_many_over_how_long() {
        let mut e = edge_api::model::Event::new(100_000, false, "Started", "replica 9 started");
        assert_eq!(event_age(&e, 105_000), "5s");
        e.count = 2_490;
        e.first_ts_ms = Some(0);
        assert_eq!(event_age(&e, 105_000), "5s (x2490 over 105s)");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["NAME", "PHASE"], &[vec!["a".into(), "Running".into()], vec!["longer".into(), "x".into()]]);
        assert_eq!(t, "NAME     PHASE\na        Running\nlonger   x\n");
    }

    #[test]
    fn terminal_escapes_from_nodes_are_shown_not_obeyed() {
        let evil = "pi\x1b]0;owned\x07\x1b[2J\rok\u{9b}31m";
        assert_eq!(clean(evil), "pi\\x1b]0;owned\\x07\\x1b[2J\\x0dok\\x9b31m");
        assert_eq!(clean("plain\ttext"), "plain\ttext");
        let t = table(&["NAME"], &[vec![evil.into()]]);
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        let y = yaml(&serde_json::json!({"kernel": evil}));
        assert!(!y.chars().any(|c| c.is_control() && c != '\n'), "{y:?}");
    }

    #[test]
    fn yaml_quotes_what_would_be_misread() {
        let v = serde_json::json!({
            "name": "hello",
            "labels": {"on": "yes", "k": "a: b"},
            "args": ["--x", "1", "plain"],
            "replicas": [{"node": "pi", "phase": "Running"}],
            "empty": [],
        });
        let y = yaml(&v);
        assert_eq!(
            y,
            "args:\n  - \"--x\"\n  - \"1\"\n  - plain\nempty: []\nlabels:\n  k: \"a: b\"\n  \"on\": \"yes\"\nname: hello\nreplicas:\n  - node: pi\n    phase: Running\n"
        );
    }
}

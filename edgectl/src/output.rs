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

/// Prints rows under headers, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
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
                && !s.contains('\n')
                && !matches!(
                    s.to_ascii_lowercase().as_str(),
                    "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "~"
                )
                && s.parse::<f64>().is_err();
            if plain { s.clone() } else { serde_json::to_string(s).unwrap_or_default() }
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
    fn tables_align_columns() {
        let t = table(&["NAME", "PHASE"], &[vec!["a".into(), "Running".into()], vec!["longer".into(), "x".into()]]);
        assert_eq!(t, "NAME     PHASE\na        Running\nlonger   x\n");
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

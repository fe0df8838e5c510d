//! Name and label rules. Names end up in MQTT topics, file names and URLs, so
//! they are restricted to the DNS-label alphabet, which is safe in all three.

/// Workload names: a DNS label (RFC 1123), 1–63 characters.
pub fn check_name(s: &str) -> Result<(), String> {
    check_label_like(s, 63)
}

/// Node names: a DNS subdomain (labels joined by dots), 1–253 characters.
pub fn check_node_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("{s:?} must be 1-253 characters"));
    }
    for part in s.split('.') {
        check_label_like(part, 63).map_err(|_| {
            format!(
                "{s:?} is not a valid node name: use lowercase letters, digits, '-' and '.', \
                 starting and ending each part with a letter or digit"
            )
        })?;
    }
    Ok(())
}

fn check_label_like(s: &str, max: usize) -> Result<(), String> {
    let ok_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-';
    let b = s.as_bytes();
    if b.is_empty() || b.len() > max {
        return Err(format!("{s:?} must be 1-{max} characters"));
    }
    if !b.iter().all(|&c| ok_char(c)) || b[0] == b'-' || b[b.len() - 1] == b'-' {
        return Err(format!(
            "{s:?} is not a valid name: use lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Label keys: an optional DNS-subdomain prefix and '/', then a name of up to
/// 63 characters from `[A-Za-z0-9._-]` starting and ending alphanumeric.
pub fn check_label_key(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        check_node_name(p).map_err(|_| format!("label key {s:?} has an invalid prefix {p:?}"))?;
    }
    if !label_value_ok(name) || name.is_empty() {
        return Err(format!(
            "label key {s:?} is invalid: use up to 63 of [A-Za-z0-9._-], starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// The label prefix only the hub's API (or the bootstrap token a node enrolled
/// with) may set on a node; labels an agent reports under it are ignored, as
/// Kubernetes' NodeRestriction does for `node-restriction.kubernetes.io/`.
/// Placement that matters for security uses it.
pub const ADMIN_LABEL_PREFIX: &str = "admin.edge/";

/// Whether a label key is one only the API may set on a node.
pub fn is_admin_label(key: &str) -> bool {
    key.starts_with(ADMIN_LABEL_PREFIX)
}

/// Label values: empty, or up to 63 of `[A-Za-z0-9._-]` starting and ending alphanumeric.
pub fn check_label_value(s: &str) -> Result<(), String> {
    if label_value_ok(s) {
        Ok(())
    } else {
        Err(format!("label value {s:?} is invalid: use up to 63 of [A-Za-z0-9._-], starting and ending alphanumeric"))
    }
}

fn label_value_ok(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() {
        return true;
    }
    b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_label_rules() {
        for ok in ["hello", "a", "web-1", "x".repeat(63).as_str()] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Hello", "-a", "a-", "a_b", "a.b", "a/b", "a+b", "#", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_names_allow_dots_but_no_topic_wildcards() {
        assert!(check_node_name("pi-4.plant-1").is_ok());
        for bad in ["", "a..b", ".a", "a/b", "a+b", "a#", "UPPER"] {
            assert!(check_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_follow_kubernetes_rules() {
        assert!(check_label_key("site").is_ok());
        assert!(check_label_key("edge.example.com/zone").is_ok());
        assert!(check_label_key("").is_err());
        assert!(check_label_key("a b").is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("Plant_1.a").is_ok());
        assert!(check_label_value("-x").is_err());
    }
}

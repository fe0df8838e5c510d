//! Secrets end to end: given to a workload as env and as read-only files,
//! sealed to the one node that runs it, stored encrypted, and never shown by
//! any command, log or file the hub or the agents write.

use std::path::Path;

use edge_tests::*;

const VALUE: &str = "hunter2-c0rrect-h0rse";
const NEXT: &str = "hunter3-battery-staple";

/// Every file under `dir` (but those under a directory named in `skip`) whose
/// bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str, skip: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                if !skip.iter().any(|s| e.file_name() == *s) {
                    todo.push(p);
                }
            } else if t.is_file()
                && std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

fn reader(t: &TempDir, name: &str, env_key: &str) -> String {
    let m = hello_manifest(
        name,
        &["--cat", "/secrets/db/password", "--cat", "/secrets/db/ca.crt", "--write", "/secrets/db/new"],
        "never",
    )
    .replace(
        "[spec.resources]",
        &format!(
            "secrets = [{{ secret = \"db\", path = \"/secrets/db\" }}]\nenv = {{ GREETING = {{ secret = \"db\", key = \"{env_key}\" }} }}\n[spec.placement]\nnode_selector = {{ site = \"a\" }}\n[spec.resources]"
        ),
    );
    manifest(t.path(), &format!("{name}.toml"), &m).display().to_string()
}

#[test]
fn a_secret_reaches_only_its_node_as_env_and_files_and_is_never_shown() {
    let t = TempDir::new("secrets");
    let hub = Hub::start(t.path(), HubOpts::default());
    let pi1 = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &["--label", "site=a"]);
    let pi2 = Agent::start(t.path(), "pi-2", &hub.mqtt_url, &hub.join, &["--label", "site=b"]);
    hub.wait_node_state("pi-1", "Ready");
    hub.wait_node_state("pi-2", "Ready");

    let ca = t.path().join("ca.crt");
    std::fs::write(&ca, "PEM-DATA").unwrap();
    let lit = format!("password={VALUE}");
    let file = format!("ca.crt={}", ca.display());
    let out = hub.ctl(&["create", "secret", "db", "--from-literal", &lit, "--from-file", &file]);
    assert_eq!(out.trim(), "secret/db created");

    // Bad references are refused at apply, each named by its field.
    let bad = reader(&t, "bad", "nope");
    let out = hub.edgectl(&["apply", "-f", &bad]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("spec.wasm.env.GREETING: secret \"db\" has no key \"nope\""),
        "{err}"
    );
    assert!(err.contains("(it has: ca.crt, password)"), "{err}");
    let missing = std::fs::read_to_string(&bad).unwrap().replace("secret = \"db\", path", "secret = \"dbx\", path");
    std::fs::write(&bad, missing).unwrap();
    let err = String::from_utf8_lossy(&hub.edgectl(&["apply", "-f", &bad]).stderr).into_owned();
    assert!(err.contains("spec.wasm.secrets[0].secret: secret \"dbx\" does not exist"), "{err}");
    assert!(hub.workload("bad").is_none(), "nothing of a refused workload is kept");

    let m = reader(&t, "reader", "password");
    hub.ctl(&["apply", "-f", &m]);
    hub.wait("reader", "Succeeded");
    let logs = hub.ctl(&["logs", "reader"]);
    assert!(logs.contains(&format!("{VALUE} from WebAssembly! I am reader, running on pi-1")), "{logs}");
    assert!(logs.contains(&format!("/secrets/db/password: {VALUE}")), "{logs}");
    assert!(logs.contains("/secrets/db/ca.crt: PEM-DATA"), "{logs}");
    assert!(logs.contains("/secrets/db/new: cannot write"), "the files are read-only: {logs}");

    // No output of any command shows the value.
    for args in [
        &["get", "workload", "reader", "-o", "json"][..],
        &["get", "workloads", "-o", "yaml"],
        &["describe", "workload", "reader"],
        &["get", "secrets"],
        &["get", "secret", "db", "-o", "json"],
        &["describe", "secret", "db"],
        &["get", "events", "--audit", "-o", "json"],
    ] {
        let out = hub.ctl(args);
        assert!(!out.contains(VALUE) && !out.contains("PEM-DATA"), "edgectl {args:?} shows the secret: {out}");
    }
    let described = hub.ctl(&["describe", "workload", "reader"]);
    assert!(described.contains("GREETING=<secret db/password>"), "{described}");
    assert!(described.contains("db at /secrets/db (read-only)"), "{described}");
    let s = hub.json(&["get", "secret", "db"]);
    assert_eq!((s["version"].as_u64(), s["keys"]["password"].as_u64()), (Some(1), Some(VALUE.len() as u64)));
    assert_eq!(s["used_by"][0], "reader");

    // Nor does any file the hub keeps (its database included), the other
    // node's files, the agents' own logs, or what pi-1 keeps but the
    // replica's own output; and the replica's secret files are gone.
    assert_eq!(files_containing(&t.path().join("hub"), VALUE, &[]), Vec::<String>::new());
    assert_eq!(files_containing(&pi2.dir, VALUE, &[]), Vec::<String>::new());
    assert_eq!(files_containing(&pi1.dir, VALUE, &["logs"]), Vec::<String>::new());
    for a in [&pi1, &pi2] {
        assert!(!a.proc.log_text().contains(VALUE), "{}", a.proc.log_text());
    }
    assert!(!hub.proc.log_text().contains(VALUE));
    // The hub's files are its own: the directory 0700, every file but the
    // CA certificate (public) readable by no one else; the key 0600.
    use std::os::unix::fs::PermissionsExt;
    let hub_dir = t.path().join("hub");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&hub_dir), mode(&hub_dir.join("secrets.key"))), (0o700, 0o600));
    let mut todo = vec![hub_dir.clone()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p != hub_dir.join("tls/ca.crt") {
                assert_eq!(mode(&p) & 0o077, 0, "{} is readable by others", p.display());
            }
        }
    }
    assert_eq!(files_containing(&t.path().join("run-pi-1"), "PEM-DATA", &[]), Vec::<String>::new());

    // The same values change nothing; new ones reach the replica, which runs again.
    let out = hub.ctl(&["create", "secret", "db", "--from-literal", &lit, "--from-file", &file]);
    assert_eq!(out.trim(), "secret/db unchanged");
    let next = format!("password={NEXT}");
    let out = hub.ctl(&["create", "secret", "db", "--from-literal", &next, "--from-file", &file]);
    assert_eq!(out.trim(), "secret/db configured");
    wait_for("the replica to run with the new value", || {
        hub.ctl(&["logs", "reader"]).contains(&format!("/secrets/db/password: {NEXT}")).then_some(())
    });
    assert_eq!(hub.json(&["get", "secret", "db"])["version"], 2);

    // A secret in use cannot be deleted, nor lose a key a workload names.
    let out = hub.edgectl(&["delete", "secret", "db"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("used by workload(s) reader"), "{err}");
    let out = hub.edgectl(&["create", "secret", "db", "--from-file", &file]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("workload reader uses key \"password\""), "{err}");

    // A viewer sees names and sizes; only an operator changes secrets.
    let viewer = hub.ctl(&["token", "create", "--role", "viewer"]).trim().to_string();
    let out = hub.edgectl_as(&viewer, &["get", "secrets", "-o", "name"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "secret/db");
    let out = hub.edgectl_as(&viewer, &["create", "secret", "x", "--from-literal", "a=b"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs the operator role"));

    // Secrets survive a hub restart (their key is outside the database).
    let mut hub = hub;
    hub.restart(false);
    hub.wait_node_state("pi-1", "Ready");
    hub.ctl(&["apply", "-f", &reader(&t, "again", "password")]);
    hub.wait("again", "Succeeded");
    assert!(hub.ctl(&["logs", "again"]).contains(&format!("/secrets/db/password: {NEXT}")));

    hub.ctl(&["delete", "workload", "reader", "again"]);
    hub.ctl(&["delete", "secret", "db"]);
    assert!(hub.json(&["get", "secrets"]).as_array().unwrap().is_empty());
}

#[test]
fn a_secret_manifest_applies_with_its_workload_and_bad_ones_name_the_field() {
    let t = TempDir::new("secret-manifest");
    let hub = Hub::start(t.path(), HubOpts::default());
    let _pi1 = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &["--label", "site=a"]);
    hub.wait_node_state("pi-1", "Ready");
    let dir = t.path().join("app");
    std::fs::create_dir_all(&dir).unwrap();
    // The workload sorts before its secret; apply sends secrets first.
    std::fs::write(dir.join("a-reader.toml"), std::fs::read_to_string(reader(&t, "reader", "password")).unwrap())
        .unwrap();
    std::fs::copy(t.path().join("hello.wasm"), dir.join("hello.wasm")).unwrap();
    let secret = format!(
        "api_version = \"edge/v1\"\nkind = \"Secret\"\n[metadata]\nname = \"db\"\n[data]\npassword = \"{VALUE}\"\n\"ca.crt\" = \"PEM\"\n"
    );
    std::fs::write(dir.join("b-db.toml"), &secret).unwrap();
    let out = hub.ctl(&["apply", "-f", dir.to_str().unwrap()]);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["secret/db created", "workload/reader created"], "{out}");
    hub.wait("reader", "Succeeded");
    assert!(hub.ctl(&["logs", "reader"]).contains(VALUE));

    let bad = t.path().join("bad.toml");
    std::fs::write(&bad, secret.replace("password =", "\"pass word\" =")).unwrap();
    let out = hub.edgectl(&["apply", "-f", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("data.pass word: \"pass word\" is not a valid key"), "{err}");
    assert!(!err.contains(VALUE), "errors never quote values: {err}");
    assert_eq!(hub.json(&["get", "secret", "db"])["version"], 1, "the refused manifest changed nothing");

    // Deleting by manifest deletes what it names, secret included (workload first).
    hub.ctl(&["delete", "workload", "reader"]);
    let out = hub.ctl(&["delete", "-f", dir.join("b-db.toml").to_str().unwrap()]);
    assert_eq!(out.trim(), "secret/db deleted");
}

//! `edgectl up`: the newcomer's one command.

use std::process::Command;

use edge_tests::*;

#[test]
fn edgectl_up_starts_hub_and_agent_and_runs_the_example() {
    let t = TempDir::new("up");
    let config = t.path().join("config.toml");
    let mut up = Proc::spawn(
        "edgectl up",
        Command::new(bin("edgectl"))
            .args([
                "up",
                "--api-addr",
                "127.0.0.1:0",
                "--mqtt-addr",
                "127.0.0.1:0",
                "--proxy-addr",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(t.path().join("data"))
            .env("EDGE_CONFIG", &config)
            .env_remove("EDGE_HUB")
            .env_remove("EDGE_TOKEN"),
        t.path().join("up.log"),
    );
    wait_for("edgectl up to report that edge is up", || {
        if let Some(s) = up.exited() {
            panic!("edgectl up exited ({s}):\n{}", up.log_text());
        }
        up.log_text().contains("Press Ctrl-C to stop.").then_some(())
    });
    let text = up.log_text();
    assert!(text.contains("| Hello from WebAssembly! I am hello, running on local."), "{text}");

    // The config it wrote is enough for edgectl: no flags, no environment.
    let out = Command::new(bin("edgectl"))
        .args(["get", "workloads", "-o", "json"])
        .env("EDGE_CONFIG", &config)
        .env_remove("EDGE_HUB")
        .env_remove("EDGE_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ws: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ws[0]["metadata"]["name"], "hello");
    assert_eq!(ws[0]["status"]["phase"], "Succeeded");

    let hub_pid = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(t.path().join("data/hub/hub.json")).unwrap(),
    )
    .unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;
    let status = up.stop().expect("edgectl up exit status");
    assert!(status.success(), "{status}: {}", up.log_text());
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let alive = unsafe { libc::kill(hub_pid, 0) } == 0;
    assert!(!alive, "the hub was stopped with edgectl up");
    let agents =
        Command::new("pgrep").args(["-f", &t.path().join("data/agent").display().to_string()]).output().unwrap();
    assert!(agents.stdout.is_empty(), "the agent was stopped with edgectl up");
}

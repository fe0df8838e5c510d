//! OCI container workloads end to end: images built by the test from C
//! source (static binaries, no downloads), copied into a real registry with
//! skopeo, resolved by the hub, placed by platform, pulled and unpacked by
//! the agent and run by a real OCI runtime (runc) with a generated spec.
//! Needs root and runc (the test command installs runc; CI runs as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use edge_tests::oci_layout::Layout;
use edge_tests::*;
use serde_json::json;

const PROBE: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/socket.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    printf("uid=%d gid=%d\n", (int)getuid(), (int)getgid());
    printf("node=%s greeting=%s\n", getenv("EDGE_NODE"), getenv("GREETING"));
    for (int i = 1; i < argc; i++) printf("arg=%s\n", argv[i]);
    const char *cat = getenv("CAT");
    if (cat) {
        char buf[256] = {0};
        FILE *c = fopen(cat, "r");
        if (c) { fgets(buf, sizeof buf, c); fclose(c); printf("cat=%s\n", buf); }
        else printf("cat-failed=%s\n", strerror(errno));
        printf("secret=%s\n", fopen(cat, "w") ? "writable" : "read-only");
    }
    printf("gone=%s\n", access("/etc/gone", F_OK) == 0 ? "present" : "absent");
    char kept[64] = {0};
    FILE *f = fopen("/etc/kept", "r");
    if (f) { fgets(kept, sizeof kept, f); fclose(f); }
    printf("kept=%s\n", kept);
    FILE *w = fopen("/written", "w");
    printf("rootfs=%s\n", w ? "writable" : (errno == EROFS ? "read-only" : "unwritable"));
    fflush(stdout);
    const char *tcp = getenv("PROBE_TCP");
    if (tcp) {
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(tcp)) };
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        printf("hostport=%s\n", connect(s, (struct sockaddr *)&a, sizeof a) == 0 ? "reachable" : "unreachable");
        fflush(stdout);
    }
    if (argc > 2 && strcmp(argv[1], "serve") == 0) {
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
        int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) { perror("listen"); return 1; }
        printf("serving\n"); fflush(stdout);
        const char *r = "HTTP/1.1 200 OK\r\nContent-Length: 21\r\nConnection: close\r\n\r\nhello from container\n";
        for (;;) {
            int c = accept(s, NULL, NULL);
            char buf[4096];
            if (c < 0) continue;
            read(c, buf, sizeof buf);
            write(c, r, strlen(r));
            close(c);
        }
    }
    if (argc > 2 && strcmp(argv[1], "exit") == 0) return atoi(argv[2]);
    if (argc > 2 && strcmp(argv[1], "hog") == 0) {
        for (int i = 0; i < atoi(argv[2]); i++) { char *p = malloc(1 << 20); memset(p, i, 1 << 20); }
        printf("survived\n");
    }
    if (argc > 2 && strcmp(argv[1], "sleep") == 0) { printf("sleeping\n"); fflush(stdout); sleep(atoi(argv[2])); }
    if (argc > 2 && strcmp(argv[1], "spin") == 0) {
        printf("spinning\n"); fflush(stdout);
        time_t end = time(NULL) + atoi(argv[2]);
        volatile unsigned long x = 0;
        while (time(NULL) < end) x++;
    }
    return 0;
}
"#;

/// The probe, compiled statically by `cc` (gcc, or a cross gcc).
fn probe(dir: &Path, cc: &str) -> PathBuf {
    let src = dir.join("probe.c");
    std::fs::write(&src, PROBE).unwrap();
    let out = dir.join(format!("probe-{cc}"));
    let o = Command::new(cc).args(["-static", "-O2", "-o"]).arg(&out).arg(&src).output().expect(cc);
    assert!(o.status.success(), "{cc}: {}", String::from_utf8_lossy(&o.stderr));
    out
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn container(name: &str, image: &str, extra: &str) -> String {
    format!(
        "api_version = \"edge/v1\"\nkind = \"Workload\"\n[metadata]\nname = \"{name}\"\n[spec]\nrestart = \"never\"\n\
         [spec.container]\nimage = \"{image}\"\n{extra}\n[spec.resources]\nmemory = \"32Mi\"\ncpu = \"200m\"\n"
    )
}

/// Deletes every container the test's agents left (a failed test kills its
/// agents, not their containers), their parent cgroups and network
/// namespaces; each agent is (its run directory, its node name).
struct Cleanup(Vec<(PathBuf, &'static str)>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (run, node) in &self.0 {
            let root = run.join("oci");
            let out = Command::new("runc").arg("--root").arg(&root).args(["list", "-q"]).output();
            for id in out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default().lines() {
                let _ = Command::new("runc").arg("--root").arg(&root).args(["delete", "--force", id]).output();
            }
            for ctrl in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir(ctrl.path().join("edge").join(node));
                let _ = std::fs::remove_dir(ctrl.path().join("edge"));
            }
            // Network namespaces a killed agent left mounted.
            for ns in std::fs::read_dir(run.join("netns")).into_iter().flatten().flatten() {
                let _ = Command::new("umount").arg("-l").arg(ns.path()).output();
            }
        }
        // The node's container bridge, which the agents made.
        let _ = Command::new("ip").args(["link", "del", "edge0"]).output();
    }
}

/// A value from the container's cgroup (v2 file, else v1 controller/file).
fn cgroup_value(node: &str, id: &str, v2: &str, v1: (&str, &str)) -> Option<String> {
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let file = if unified {
        format!("/sys/fs/cgroup/edge/{node}/{id}/{v2}")
    } else {
        format!("/sys/fs/cgroup/{}/edge/{node}/{id}/{}", v1.0, v1.1)
    };
    std::fs::read_to_string(file).ok().map(|s| s.trim().to_string())
}

fn runc_list(agent: &Agent) -> String {
    // The harness gives each agent the run directory `run-<node>` beside its data.
    let run = agent.dir.parent().unwrap().join(format!("run-{}", agent.name));
    let out = Command::new("runc").arg("--root").arg(run.join("oci")).args(["list", "-q"]).output().expect("runc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn containers_run_from_registries_on_nodes_their_image_fits() {
    assert!(is_root(), "container tests need root (CI runs as root); run as root, or skip this test");
    let t = TempDir::new("containers");
    let _cleanup = Cleanup(vec![(t.path().join("run-x86"), "x86"), (t.path().join("run-pi4"), "pi4")]);
    let (_registry, addr) = registry(t.path());

    // The image: the probe and two files, then a layer that whites one out.
    let mut layout = Layout::new(&t.path().join("layout"));
    let base = t.path().join("base");
    std::fs::create_dir_all(base.join("bin")).unwrap();
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::copy(probe(t.path(), "gcc"), base.join("bin/probe")).unwrap();
    std::fs::write(base.join("etc/gone"), "from the lower layer").unwrap();
    std::fs::write(base.join("etc/kept"), "kept").unwrap();
    let lower = layout.layer_from_dir(&base);
    let upper_dir = t.path().join("upper");
    std::fs::create_dir_all(upper_dir.join("etc")).unwrap();
    std::fs::write(upper_dir.join("etc/.wh.gone"), "").unwrap();
    let upper = layout.layer_from_dir(&upper_dir);
    let run = json!({ "Entrypoint": ["/bin/probe"], "Cmd": ["from-image"], "Env": ["GREETING=from-image"] });
    let amd64 = layout.image("linux/amd64", &[lower.clone(), upper.clone()], run.clone());
    let index = layout.index(&[amd64]);
    layout.tag("probe", &index);
    layout.push("probe", &format!("{addr}/edge/probe:1"), &[]);
    // An image only for 64-bit ARM.
    let arm_base = t.path().join("arm-base");
    std::fs::create_dir_all(arm_base.join("bin")).unwrap();
    std::fs::copy(probe(t.path(), "aarch64-linux-gnu-gcc"), arm_base.join("bin/probe")).unwrap();
    let arm_layer = layout.layer_from_dir(&arm_base);
    let arm = layout.image("linux/arm64", &[arm_layer], run.clone());
    let arm_index = layout.index(&[arm]);
    layout.tag("armonly", &arm_index);
    layout.push("armonly", &format!("{addr}/edge/armonly:1"), &[]);
    // A hostile layer: an entry that climbs out of the root.
    let mut hostile = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.as_old_mut().name[..12].copy_from_slice(b"../../escape");
    h.set_cksum();
    hostile.append(&h, &b"evil"[..]).unwrap();
    let hostile = layout.layer_from_tar(&hostile.into_inner().unwrap());
    let evil = layout.image("linux/amd64", &[lower, hostile], run);
    layout.tag("evil", &evil);
    layout.push("evil", &format!("{addr}/edge/evil:1"), &[]);

    let hub = Hub::start(t.path(), HubOpts::default());
    let mut x86 = Agent::start(t.path(), "x86", &hub.mqtt_url, &hub.join, &[]);
    let n = hub.wait_node_state("x86", "Ready");
    let runtimes: Vec<&str> =
        n["facts"]["runtimes"].as_array().unwrap().iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(runtimes, ["wasm", "oci"], "{n}");

    // A run to completion: the image's entrypoint with the manifest's args,
    // env merged, not root, a read-only root, the whiteout honoured.
    let image = format!("oci://{addr}/edge/probe:1");
    let f = manifest(
        t.path(),
        "probe.toml",
        &container("probe", &image, "args = [\"hello\", \"world\"]\nenv = { GREETING = \"from-manifest\" }"),
    );
    hub.ctl(&["apply", "-f", f.to_str().unwrap()]);
    hub.wait("probe", "Succeeded");
    let logs = hub.ctl(&["logs", "probe"]);
    for want in [
        "uid=65534 gid=65534",
        "node=x86 greeting=from-manifest",
        "arg=hello\n",
        "arg=world",
        "gone=absent",
        "kept=kept",
        "rootfs=read-only",
    ] {
        assert!(logs.contains(want), "{want:?} missing from:\n{logs}");
    }
    assert!(!logs.contains("from-image\n"), "args replace the image's Cmd:\n{logs}");
    let w = hub.workload("probe").unwrap();
    let pinned = w["spec"]["container"]["image"].as_str().unwrap();
    assert!(pinned.starts_with(&format!("{image}@sha256:")), "the hub pins the image: {pinned}");
    assert_eq!(w["spec"]["container"]["platforms"][0]["platform"], "linux/amd64");
    let described = hub.ctl(&["describe", "workload", "probe"]);
    assert!(described.contains("oci (container)") && described.contains("linux/amd64"), "{described}");

    // A secret as env and as a read-only file its (non-root) user can read;
    // neither its bundle nor anything else on the agent's disk keeps it.
    let value = "s3cret-for-the-container";
    hub.ctl(&["create", "secret", "db", "--from-literal", &format!("password={value}")]);
    let f = manifest(
        t.path(),
        "secretprobe.toml",
        &container(
            "secretprobe",
            &image,
            "env = { GREETING = { secret = \"db\", key = \"password\" }, CAT = \"/run/secrets/db/password\" }\n\
             secrets = [{ secret = \"db\", path = \"/run/secrets/db\" }]",
        ),
    );
    hub.ctl(&["apply", "-f", f.to_str().unwrap()]);
    hub.wait("secretprobe", "Succeeded");
    let logs = hub.ctl(&["logs", "secretprobe"]);
    for want in [format!("greeting={value}"), format!("cat={value}"), "secret=read-only".into(), "uid=65534".into()] {
        assert!(logs.contains(&want), "{want:?} missing from:\n{logs}");
    }
    let mut stack = vec![x86.dir.clone(), t.path().join("run-x86")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && e.file_name() != "logs" && e.file_name() != "images" {
                stack.push(p);
            } else if p.is_file() {
                let b = std::fs::read(&p).unwrap_or_default();
                assert!(!b.windows(value.len()).any(|w| w == value.as_bytes()), "{} holds the secret", p.display());
            }
        }
    }
    hub.ctl(&["delete", "workload", "secretprobe"]);

    // Its own network: the node's loopback services (the hub's API here)
    // are out of reach; an HTTP server in it is reached through the proxy.
    let api_port = hub.api_addr().rsplit(':').next().unwrap().to_string();
    let f = manifest(
        t.path(),
        "netprobe.toml",
        &container("netprobe", &image, &format!("env = {{ PROBE_TCP = \"{api_port}\" }}")),
    );
    hub.ctl(&["apply", "-f", f.to_str().unwrap()]);
    hub.wait("netprobe", "Succeeded");
    let logs = hub.ctl(&["logs", "netprobe"]);
    assert!(logs.contains("hostport=unreachable"), "a container reached the node's loopback:\n{logs}");
    let f = manifest(
        t.path(),
        "web.toml",
        &(container("web", &image, "args = [\"serve\", \"8080\"]\nport = 8080")
            .replace("restart = \"never\"", "restart = \"always\"")
            + "[spec.http]\nhosts = [\"web.local\"]\n"
            // All three kinds of container probe: over TCP, HTTP, and inside it.
            + "[spec.health.startup]\ntcp = 8080\nperiod = \"1s\"\n"
            + "[spec.health.readiness]\nhttp = { path = \"/ready\" }\nperiod = \"1s\"\n"
            + "[spec.health.liveness]\ncommand = [\"/bin/probe\", \"exit\", \"0\"]\nperiod = \"2s\"\n"),
    );
    // One whose liveness check fails inside it: restarted as Unhealthy.
    let sick = manifest(
        t.path(),
        "sick.toml",
        &(container("sick", &image, "args = [\"sleep\", \"600\"]")
            .replace("restart = \"never\"", "restart = \"always\"")
            + "[spec.health.liveness]\ncommand = [\"/bin/probe\", \"exit\", \"1\"]\nperiod = \"1s\"\nfailure_threshold = 2\n"
            // A check that hangs: each one is killed at its timeout, none piles up.
            + "[spec.health.readiness]\ncommand = [\"/bin/probe\", \"sleep\", \"700\"]\nperiod = \"1s\"\ntimeout = \"500ms\"\n"),
    );
    hub.ctl(&["apply", "-f", f.to_str().unwrap(), "-f", sick.to_str().unwrap()]);
    hub.wait("web", "Running");
    let proxy = x86.proxy();
    let (code, body) = wait_for("the container to answer through the proxy", || {
        let r = get(&proxy, "web.local", "/");
        (r.0 == 200).then_some(r)
    });
    assert_eq!((code, body.as_str()), (200, "hello from container\n"));
    let web = wait_for("web to be ready", || hub.workload("web").filter(|w| w["status"]["ready"] == 1));
    assert_eq!(web["status"]["replicas"][0]["ready"], true, "{web}");
    assert_eq!(web["status"]["replicas"][0]["probe"], "readiness: HTTP GET /ready: passed", "{web}");
    wait_for("sick to be restarted", || {
        hub.workload("sick").filter(|w| w["status"]["replicas"][0]["restarts"].as_u64().is_some_and(|r| r >= 1))
    });
    let hung = || {
        let out = Command::new("pgrep").args(["-f", "probe sleep 700"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert!(hung() <= 2, "hung probe commands pile up: {}", hung());
    let logs = hub.ctl(&["logs", "sick"]);
    assert!(logs.contains("unhealthy: liveness: command [\"/bin/probe\", \"exit\", \"1\"]: exit 1"), "{logs}");
    assert_eq!(hub.workload("web").unwrap()["status"]["replicas"][0]["restarts"], 0, "web passed its liveness check");
    hub.ctl(&["delete", "workload", "sick"]);
    // The node's network only where the hub allows it.
    let f = manifest(t.path(), "hostnet.toml", &container("hostnet", &image, "network = \"host\""));
    let out = hub.edgectl(&["apply", "-f", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--allow-host-network"), "{err}");
    hub.ctl(&["delete", "workload", "web", "netprobe"]);
    wait_for("the web container to go", || (!runc_list(&x86).contains("edge-web")).then_some(()));
    wait_for("its route to go with it", || (get(&proxy, "web.local", "/").0 == 404).then_some(()));

    // Exit codes, an explicit user, and the memory limit (the kernel's OOM killer).
    let f =
        manifest(t.path(), "fail.toml", &container("fail", &image, "args = [\"exit\", \"3\"]\nuser = \"1000:1000\""));
    let f2 = manifest(t.path(), "hog.toml", &container("hog", &image, "args = [\"hog\", \"256\"]"));
    hub.ctl(&["apply", "-f", f.to_str().unwrap(), "-f", f2.to_str().unwrap()]);
    hub.wait("fail", "Failed");
    let r = &hub.workload("fail").unwrap()["status"]["replicas"][0];
    assert_eq!((r["exit_code"].as_i64(), r["reason"].as_str()), (Some(3), Some("Error")), "{r}");
    assert!(hub.ctl(&["logs", "fail"]).contains("uid=1000 gid=1000"));
    hub.wait("hog", "Failed");
    let r = &hub.workload("hog").unwrap()["status"]["replicas"][0];
    assert_eq!(r["reason"], "OOMKilled", "{r}");
    assert!(!hub.ctl(&["logs", "hog"]).contains("survived"));

    // The limits are the kernel's: read back from the container's cgroup,
    // and a CPU hog at 100m is throttled.
    let f = manifest(
        t.path(),
        "spin.toml",
        &container("spin", &image, "args = [\"spin\", \"30\"]").replace("cpu = \"200m\"", "cpu = \"100m\""),
    );
    hub.ctl(&["apply", "-f", f.to_str().unwrap()]);
    hub.wait("spin", "Running");
    let id = "edge-spin.0";
    let memory =
        wait_for("the spinner's cgroup", || cgroup_value("x86", id, "memory.max", ("memory", "memory.limit_in_bytes")));
    assert_eq!(memory, (32u64 << 20).to_string());
    let quota = cgroup_value("x86", id, "cpu.max", ("cpu", "cpu.cfs_quota_us")).unwrap();
    assert!(quota == "10000" || quota == "10000 100000", "100m is 10 ms per 100 ms: {quota}");
    assert_eq!(cgroup_value("x86", id, "pids.max", ("pids", "pids.max")).as_deref(), Some("1024"));
    wait_for("the spinner to be throttled", || {
        let stat = cgroup_value("x86", id, "cpu.stat", ("cpu", "cpu.stat"))?;
        let throttled: u64 = stat.lines().find_map(|l| l.strip_prefix("nr_throttled "))?.parse().ok()?;
        (throttled > 0).then_some(())
    });
    hub.ctl(&["delete", "workload", "spin"]);
    wait_for("the spinner's cgroup to go", || {
        cgroup_value("x86", id, "pids.max", ("pids", "pids.max")).is_none().then_some(())
    });

    // A long-running container: stopped and removed when deleted; after the
    // agent is killed -9 it is cleaned up and started again.
    let f = manifest(
        t.path(),
        "sleeper.toml",
        &container("sleeper", &image, "args = [\"sleep\", \"600\"]")
            .replace("restart = \"never\"", "restart = \"always\""),
    );
    hub.ctl(&["apply", "-f", f.to_str().unwrap()]);
    hub.wait("sleeper", "Running");
    wait_for("the sleeper's container", || runc_list(&x86).contains("edge-sleeper").then_some(()));
    x86.proc.kill9();
    x86.start_again();
    wait_for("the sleeper to run again", || {
        hub.workload("sleeper")
            .filter(|w| w["status"]["replicas"][0]["restarts"] == 1 && w["status"]["phase"] == "Running")
    });
    // One container: the old one was removed, the new one runs.
    wait_for("the new container", || (runc_list(&x86).lines().collect::<Vec<_>>() == ["edge-sleeper.0"]).then_some(()));
    hub.ctl(&["delete", "workload", "sleeper"]);
    wait_for("the container to go", || runc_list(&x86).trim().is_empty().then_some(()));

    // A layer that climbs out of the root is refused; nothing lands outside.
    let f = manifest(t.path(), "evil.toml", &container("evil", &format!("oci://{addr}/edge/evil:1"), ""));
    hub.ctl(&["apply", "-f", f.to_str().unwrap()]);
    hub.wait("evil", "Failed");
    let r = &hub.workload("evil").unwrap()["status"]["replicas"][0];
    assert_eq!(r["reason"], "ImagePullFailed", "{r}");
    assert!(r["message"].as_str().unwrap().contains("climbs out"), "{r}");
    assert!(!x86.dir.join("containers/escape").exists() && !x86.dir.join("containers/images/escape").exists());

    // Bad references are refused at apply, naming the field; nothing is stored.
    for (image, want) in [
        (format!("oci://{addr}/edge/missing:1"), "404"),
        ("docker.io/library/nginx".to_string(), "must start with oci://"),
    ] {
        let f = manifest(t.path(), "bad.toml", &container("bad", &image, ""));
        let out = hub.edgectl(&["apply", "-f", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("spec.container.image") && err.contains(want), "{err}");
    }
    assert!(hub.workload("bad").is_none());

    // Multi-arch placement: an arm64-only image waits for an arm64 node.
    let f = manifest(t.path(), "arm.toml", &container("armonly", &format!("oci://{addr}/edge/armonly:1"), ""));
    hub.ctl(&["apply", "-f", f.to_str().unwrap()]);
    let w = wait_for("the reason", || hub.workload("armonly").filter(|w| w["status"]["reason"] == "Unschedulable"));
    assert!(w["status"]["message"].as_str().unwrap().contains("platform the image does not offer"), "{w}");
    let pi4 = &edge_tests::arm::ARCHES[0];
    pi4.check_binfmt();
    let _arm = pi4.agent(t.path(), &hub.mqtt_url, &hub.join);
    hub.wait_node_state(pi4.node, "Ready");
    let w = wait_for("the arm64 node to get it", || {
        hub.workload("armonly").filter(|w| w["status"]["replicas"][0]["node"] == pi4.node)
    });
    assert_eq!(w["spec"]["container"]["platforms"][0]["platform"], "linux/arm64");
    hub.ctl(&["delete", "workload", "armonly", "probe", "fail", "hog", "evil"]);
}

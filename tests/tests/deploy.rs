//! The deploy/ kit: the installer, and putting an agent onto a Raspberry Pi
//! OS-style SD card image (tested on synthetic images built here).

use std::path::{Path, PathBuf};
use std::process::Command;

use edge_tests::*;

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn ok(cmd: &mut Command) -> String {
    let (ok, text) = run(cmd);
    assert!(ok, "{cmd:?} failed:\n{text}");
    text
}

/// Settings from an env file written by the kit.
fn env_file(p: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

#[test]
fn the_installer_lays_out_an_agent_that_joins_as_its_unit_would_start_it() {
    let t = TempDir::new("install");
    let hub = Hub::start(t.path(), HubOpts::default());
    let root = t.path().join("root");
    let install = repo().join("deploy/install.sh");
    // `install.sh agent` into `root`, with these settings.
    let agent = |settings: &[&str]| {
        let mut cmd = Command::new(&install);
        cmd.arg("agent").arg("--root").arg(&root).arg("--binary").arg(bin("edge-agent")).args(settings);
        cmd
    };
    let token = t.path().join("join.token");
    std::fs::write(&token, format!("{}\n", hub.join)).unwrap();
    ok(&mut agent(&["--broker", &hub.mqtt_url, "--join-token-file", token.to_str().unwrap(), "--label", "site=lab"]));
    // A second run keeps earlier settings and adds the new one.
    ok(&mut agent(&["--name", "inst-1"]));

    let meta = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta("usr/local/bin/edge-agent").permissions().mode() & 0o777, 0o755);
    assert_eq!(meta("etc/edge/agent.env").permissions().mode() & 0o777, 0o600);
    assert_eq!(meta("etc/edge").permissions().mode() & 0o777, 0o755);
    assert_eq!(meta("var/lib/edge-agent").permissions().mode() & 0o777, 0o700);
    assert_eq!(meta("var/lib/edge-agent/join.token").permissions().mode() & 0o777, 0o600);
    let env_text = std::fs::read_to_string(root.join("etc/edge/agent.env")).unwrap();
    assert!(!env_text.contains(&hub.join), "the token is not in the env file: {env_text}");
    assert_eq!(
        std::fs::read_link(root.join("etc/systemd/system/multi-user.target.wants/edge-agent.service")).unwrap(),
        PathBuf::from("/etc/systemd/system/edge-agent.service")
    );
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/edge-agent.service")).unwrap();
    for want in [
        "EnvironmentFile=/etc/edge/agent.env",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "Restart=always",
        "StateDirectory=edge-agent",
        "RuntimeDirectory=edge-agent",
    ] {
        assert!(unit.contains(want), "the unit lacks {want}");
    }

    // Start it as systemd would: ExecStart, with the env file, word-split args.
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    let env = env_file(&root.join("etc/edge/agent.env"));
    let args_env = env.iter().find(|(k, _)| k == "EDGE_AGENT_ARGS").map(|(_, v)| v.clone()).unwrap_or_default();
    let mut words: Vec<String> = exec.split_whitespace().map(str::to_string).collect();
    words.retain(|w| w != "$EDGE_AGENT_ARGS");
    words.extend(args_env.split_whitespace().map(str::to_string));
    // The unit's paths, under the install root.
    let data = root.join("var/lib/edge-agent");
    let under_root = |v: &str| match v.strip_prefix("/var/lib/edge-agent") {
        Some(rest) => format!("{}{rest}", data.display()),
        None => v.to_string(),
    };
    let words: Vec<String> = words
        .into_iter()
        .map(|w| under_root(&w))
        .map(|w| {
            if w == "/usr/local/bin/edge-agent" {
                root.join("usr/local/bin/edge-agent").display().to_string()
            } else {
                w
            }
        })
        .collect();
    let mut cmd = Command::new(&words[0]);
    cmd.args(&words[1..]).args(["--proxy-addr", "127.0.0.1:0"]).env_clear();
    for (k, v) in &env {
        cmd.env(k, under_root(v));
    }
    // systemd makes the unit's RuntimeDirectory and names it in the environment.
    let runtime_dir = root.join("run/edge-agent");
    std::fs::create_dir_all(&runtime_dir).unwrap();
    cmd.env("RUNTIME_DIRECTORY", &runtime_dir);
    let _agent = Proc::spawn("installed agent", &mut cmd, t.path().join("installed-agent.log"));
    let n = hub.wait_node_state("inst-1", "Ready");
    assert_eq!(n["facts"]["labels"]["site"], "lab");
    wait_for("the enrolled agent to delete its join token", || (!data.join("join.token").exists()).then_some(()));

    // Bad input: refused, nothing changed.
    let before = std::fs::read(root.join("etc/edge/agent.env")).unwrap();
    let nope = t.path().join("nope.token");
    std::fs::write(&nope, "nope").unwrap();
    let (ok_, text) = run(&mut agent(&["--join-token-file", nope.to_str().unwrap()]));
    assert!(!ok_ && text.contains("does not hold a join token"), "{text}");
    let (ok_, text) = run(&mut agent(&["--join-token", &hub.join]));
    assert!(!ok_ && text.contains("use --join-token-file"), "{text}");
    let not_pem = t.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let (ok_, text) = run(&mut agent(&["--broker-ca", not_pem.to_str().unwrap()]));
    assert!(!ok_ && text.contains("not-a-ca.pem is not a PEM certificate file"), "{text}");
    let (ok_, text) = run(&mut agent(&["--broker", "http://hub:1883"]));
    assert!(!ok_ && text.contains("--broker must be mqtt://"), "{text}");
    assert_eq!(std::fs::read(root.join("etc/edge/agent.env")).unwrap(), before);
    assert!(!root.join("etc/edge/broker-ca.pem").exists());

    // The hub, with an external TLS broker: its CA is put where the service
    // user can read it, the env file stays private.
    let ca = t.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
    let hub_root = t.path().join("hub-root");
    ok(Command::new(&install)
        .arg("hub")
        .arg("--root")
        .arg(&hub_root)
        .arg("--binary")
        .arg(bin("edge-hub"))
        .args(["--broker", "mqtts://edge-hub:pw@broker.example", "--broker-ca"])
        .arg(&ca));
    let env = env_file(&hub_root.join("etc/edge/hub.env"));
    assert!(env.contains(&("EDGE_HUB_BROKER".into(), "mqtts://edge-hub:pw@broker.example".into())), "{env:?}");
    assert!(env.contains(&("EDGE_HUB_BROKER_CA".into(), "/etc/edge/broker-ca.pem".into())), "{env:?}");
    assert_eq!(std::fs::read(hub_root.join("etc/edge/broker-ca.pem")).unwrap(), std::fs::read(&ca).unwrap());
    let mode = |p: &str| std::fs::metadata(hub_root.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("etc/edge/broker-ca.pem"), mode("etc/edge/hub.env")), (0o644, 0o600));
}

/// A synthetic Raspberry Pi OS-style image: a 16 MiB FAT boot partition,
/// then an ext4 root whose /usr/bin/env is an ELF of `cpu_of` (its first 4 KiB).
fn pi_image(dir: &Path, name: &str, cpu_of: &Path, mib: u64) -> PathBuf {
    let root = dir.join(format!("{name}-rootfs"));
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    let elf = std::fs::read(cpu_of).unwrap();
    std::fs::write(root.join("usr/bin/env"), &elf[..4096]).unwrap();
    std::fs::write(root.join("etc/marker"), "left alone\n").unwrap();
    let img = dir.join(format!("{name}.img"));
    ok(Command::new("truncate").arg("-s").arg(format!("{mib}M")).arg(&img));
    let mut sfdisk = Command::new("sfdisk");
    sfdisk.arg("-q").arg(&img).stdin(std::process::Stdio::piped());
    let mut child = sfdisk.spawn().expect("sfdisk (fdisk)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"label: dos\n,16M,c\n,,83\n").unwrap();
    assert!(child.wait().unwrap().success());
    ok(Command::new("mkfs.fat").args(["-F", "16", "--offset", "2048"]).arg(&img).arg("16384"));
    let root_start = 34816u64 * 512;
    ok(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&root)
        .args(["-E", &format!("offset={root_start}")])
        .arg(&img)
        .arg(format!("{}k", (mib * 1024 * 1024 - root_start) / 1024)));
    img
}

fn root_fs(img: &Path, out: &Path) -> PathBuf {
    let p = out.with_extension("ext4");
    ok(Command::new("dd").arg(format!("if={}", img.display())).arg(format!("of={}", p.display())).args([
        "bs=512",
        "skip=34816",
        "status=none",
    ]));
    p
}

fn debugfs(fs: &Path, request: &str) -> String {
    String::from_utf8_lossy(&Command::new("debugfs").args(["-R", request]).arg(fs).output().unwrap().stdout)
        .into_owned()
}

fn boot_bytes(img: &Path) -> Vec<u8> {
    let all = std::fs::read(img).unwrap();
    all[1 << 20..(17 << 20)].to_vec()
}

/// The cross-built agent, stripped of debug information (as a release is).
fn stripped_agent(dir: &Path, triple: &str, strip: &str) -> PathBuf {
    let out = dir.join(format!("{triple}/edge-agent"));
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    ok(Command::new(strip).arg("-o").arg(&out).arg(cross_bin(triple, "edge-agent")));
    out
}

/// A join token in a file next to `img`.
fn token_file(img: &Path) -> PathBuf {
    let f = img.with_extension("token");
    std::fs::write(&f, format!("{TOKEN}\n")).unwrap();
    f
}

const TOKEN: &str = "EJ1.0123456789abcdef0123456789abcdef.abcd1234.secretsecretsecret";

fn flash(img: &Path, agents: &Path, extra: &[&str]) -> (bool, String) {
    run(Command::new(repo().join("deploy/flash-image.sh"))
        .arg("--image")
        .arg(img)
        .args(["--broker", "mqtt://hub.example:1883", "--join-token-file"])
        .arg(token_file(img))
        .arg("--agent-dir")
        .arg(agents)
        .args(extra))
}

#[test]
fn an_agent_is_written_into_a_pi_image_for_its_cpu_and_nothing_else_changes() {
    let t = TempDir::new("flash");
    let agents = t.path().join("agents");
    let a64 = stripped_agent(&agents, "aarch64-unknown-linux-gnu", "aarch64-linux-gnu-strip");
    let a32 = stripped_agent(&agents, "armv7-unknown-linux-gnueabihf", "arm-linux-gnueabihf-strip");
    for (cpu, agent, arch, ld_prefix) in
        [(&a64, &a64, "arm64", "/usr/aarch64-linux-gnu"), (&a32, &a32, "arm/v7", "/usr/arm-linux-gnueabihf")]
    {
        let name = arch.replace('/', "");
        let img = pi_image(t.path(), &name, cpu, 160);
        let boot = boot_bytes(&img);
        let (success, text) = flash(&img, &agents, &["--name", "pi-7", "--label", "site=lab"]);
        assert!(success, "{text}");
        assert!(text.contains(&format!("({arch})")), "{text}");

        let fs = root_fs(&img, &t.path().join(format!("{name}-1")));
        ok(Command::new("e2fsck").arg("-fn").arg(&fs));
        let env = debugfs(&fs, "cat /etc/edge/agent.env");
        for want in [
            "EDGE_AGENT_BROKER=mqtt://hub.example:1883",
            "EDGE_JOIN_TOKEN_FILE=/var/lib/edge-agent/join.token",
            "EDGE_AGENT_NAME=pi-7",
            "EDGE_AGENT_ARGS=--label site=lab",
        ] {
            assert!(env.contains(want), "agent.env lacks {want}:\n{env}");
        }
        assert!(debugfs(&fs, "stat /etc/edge/agent.env").contains("Mode:  0600"));
        assert!(!env.contains("EJ1."), "the token is not in the env file:\n{env}");
        assert_eq!(debugfs(&fs, "cat /var/lib/edge-agent/join.token"), format!("{TOKEN}\n"));
        assert!(debugfs(&fs, "stat /var/lib/edge-agent/join.token").contains("Mode:  0600"));
        assert!(debugfs(&fs, "stat /var/lib/edge-agent").contains("Mode:  0700"));
        assert!(debugfs(&fs, "stat /usr/local/bin/edge-agent").contains("Mode:  0755"));
        assert!(
            debugfs(&fs, "stat /etc/systemd/system/multi-user.target.wants/edge-agent.service")
                .contains("/etc/systemd/system/edge-agent.service")
        );
        assert_eq!(debugfs(&fs, "cat /etc/marker"), "left alone\n", "the rest of the root filesystem is untouched");
        assert_eq!(boot_bytes(&img), boot, "the boot partition is untouched");

        // The agent in the image is the one for its CPU, and it runs there.
        let extracted = t.path().join(format!("{name}-extracted"));
        debugfs(&fs, &format!("dump /usr/local/bin/edge-agent {}", extracted.display()));
        assert_eq!(std::fs::read(&extracted).unwrap(), std::fs::read(agent).unwrap());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&extracted, std::fs::Permissions::from_mode(0o755)).unwrap();
        let version = ok(Command::new(&extracted).arg("--version").env("QEMU_LD_PREFIX", ld_prefix));
        assert!(version.starts_with("edge-agent "), "{version}");

        // Again: the same files, no space lost, a clean filesystem.
        let free =
            |fs: &Path| debugfs(fs, "stats").lines().find(|l| l.starts_with("Free blocks:")).unwrap().to_string();
        let free_before = free(&fs);
        let (success, text) = flash(&img, &agents, &["--name", "pi-7", "--label", "site=lab"]);
        assert!(success, "{text}");
        let fs2 = root_fs(&img, &t.path().join(format!("{name}-2")));
        assert_eq!(free(&fs2), free_before);
        assert_eq!(debugfs(&fs2, "cat /etc/edge/agent.env"), env);
        ok(Command::new("e2fsck").arg("-fn").arg(&fs2));

        // A TLS broker: its CA goes in too; dropped again when no longer given.
        let ca = t.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
        let tls = ["--broker", "mqtts://hub.example", "--broker-ca", ca.to_str().unwrap(), "--name", "pi-7"];
        let (success, text) = flash(&img, &agents, &tls);
        assert!(success, "{text}");
        let fs3 = root_fs(&img, &t.path().join(format!("{name}-3")));
        let env = debugfs(&fs3, "cat /etc/edge/agent.env");
        assert!(env.contains("EDGE_AGENT_BROKER=mqtts://hub.example\n"), "{env}");
        assert!(env.contains("EDGE_AGENT_BROKER_CA=/etc/edge/broker-ca.pem\n"), "{env}");
        assert_eq!(debugfs(&fs3, "cat /etc/edge/broker-ca.pem"), std::fs::read_to_string(&ca).unwrap());
        assert!(debugfs(&fs3, "stat /etc/edge/broker-ca.pem").contains("Mode:  0644"));
        ok(Command::new("e2fsck").arg("-fn").arg(&fs3));
        let (success, text) = flash(&img, &agents, &["--name", "pi-7"]);
        assert!(success, "{text}");
        let fs4 = root_fs(&img, &t.path().join(format!("{name}-4")));
        assert!(!debugfs(&fs4, "cat /etc/edge/agent.env").contains("BROKER_CA"));
        assert!(debugfs(&fs4, "stat /etc/edge/broker-ca.pem").is_empty(), "the old CA is gone");
        assert_eq!(free(&fs4), free_before);
        ok(Command::new("e2fsck").arg("-fn").arg(&fs4));
    }
}

#[test]
fn bad_input_to_the_image_writer_is_refused_and_changes_nothing() {
    let t = TempDir::new("flashbad");
    let agents = t.path().join("agents");
    let a64 = stripped_agent(&agents, "aarch64-unknown-linux-gnu", "aarch64-linux-gnu-strip");
    let img = pi_image(t.path(), "pi", &a64, 160);
    let before = std::fs::read(&img).unwrap();
    let bad_token = t.path().join("bad.token");
    std::fs::write(&bad_token, "EJ1.nope.nope").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--join-token-file", bad_token.to_str().unwrap()], "does not hold a join token"),
        (vec!["--join-token", TOKEN], "use --join-token-file"),
        (vec!["--name", "Not_A_Name"], "is not a node name"),
        (vec!["--label", "bad label"], "is not key=value"),
        (vec!["--broker", "http://h:1883"], "--broker must be mqtt://"),
        (vec!["--broker-ca", "/etc/hostname"], "/etc/hostname is not a PEM certificate file"),
    ];
    for (args, want) in cases {
        let mut cmd = Command::new(repo().join("deploy/flash-image.sh"));
        cmd.arg("--image").arg(&img).args(["--broker", "mqtt://h:1883", "--join-token-file"]).arg(token_file(&img));
        cmd.arg("--agent-dir").arg(&agents).args(&args);
        let (success, text) = run(&mut cmd);
        assert!(!success && text.contains(want), "{args:?}: {text}");
    }
    // An agent built for the wrong CPU.
    let a32 = stripped_agent(&agents, "armv7-unknown-linux-gnueabihf", "arm-linux-gnueabihf-strip");
    let (success, text) = flash(&img, &agents, &["--agent", a32.to_str().unwrap()]);
    assert!(!success && text.contains("is not built for arm64"), "{text}");
    // A root filesystem too small for the agent.
    let tiny = pi_image(t.path(), "tiny", &a64, 24);
    let (success, text) = flash(&tiny, &agents, &[]);
    assert!(!success && text.contains("MiB free; the agent needs"), "{text}");
    // Not an image at all.
    let junk = t.path().join("junk.img");
    std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    let (success, text) = flash(&junk, &agents, &[]);
    assert!(!success && text.contains("no second (root) partition"), "{text}");
    assert_eq!(std::fs::read(&img).unwrap(), before, "refused runs left the image as it was");
}

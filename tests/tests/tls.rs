//! TLS by default: the hub's API and its embedded broker speak TLS with the
//! hub's own CA, whose key is the hub key a join token pins; edgectl pins
//! the CA; plain text only when asked for.

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;

use edge_tests::*;

#[test]
fn the_api_and_the_broker_speak_tls_that_devices_check_against_the_pinned_hub_key() {
    let t = TempDir::new("tls");
    let hub = Hub::start(t.path(), HubOpts::default());
    assert!(hub.api_url.starts_with("https://") && hub.mqtt_url.starts_with("mqtts://"), "{hub:?}", hub = hub.api_url);
    let ca = hub.ca.clone().expect("the hub names its CA");
    // `edge-hub token ca` prints it (for kubectl exec and containers).
    let out =
        Command::new(bin("edge-hub")).args(["token", "ca", "--data-dir"]).arg(hub.dir.join("hub")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), std::fs::read_to_string(&ca).unwrap().trim());

    // edgectl with the CA works; without it (the system's roots) it says why not.
    hub.ctl(&["get", "nodes"]);
    let out = hub.edgectl_cmd(&hub.token).env_remove("EDGE_CA").args(["get", "nodes"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate") || err.contains("UnknownIssuer"), "{err}");
    // Plain HTTP to the TLS port gets nothing.
    let plain = hub.api_url.replacen("https://", "http://", 1);
    let out = Command::new("curl").args(["-s", "-m", "10", &format!("{plain}/healthz")]).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ok"), "plain HTTP was served");
    // A client that never starts its handshake is dropped.
    let mut idle = TcpStream::connect(hub.api_addr()).unwrap();
    idle.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(idle.read(&mut buf), Ok(0) | Err(_)));

    // A device needs nothing but its join token: the token pins the hub's
    // key, which is the key of the CA that signed the broker's and the API's
    // certificates.
    let agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");
    hub.hello_runs_on(t.path(), "pi-1");
    assert!(!agent.proc.log_text().contains("certificate"), "{}", agent.proc.log_text());

    // A token that pins another key: the agent refuses this hub's certificate.
    let parts: Vec<&str> = hub.join.split('.').collect();
    let other = edge_api::keys::SigningKey::generate().unwrap().public().fingerprint();
    let wrong = format!("EJ1.{other}.{}.{}", parts[2], parts[3]);
    let impostor_check = Agent::start(t.path(), "pi-2", &hub.mqtt_url, &wrong, &[]);
    wait_for("the agent to refuse the certificate", || {
        impostor_check.proc.log_text().contains("not from the hub whose key the join token pins").then_some(())
    });
    assert!(hub.node("pi-2").is_none());
}

#[test]
fn edgectl_is_pointed_at_a_hub_with_its_ca_and_a_token_file() {
    let t = TempDir::new("sethub");
    let hub = Hub::start(t.path(), HubOpts::default());
    let config = t.path().join("edgectl.toml");
    let token = hub.dir.join("hub/admin.token");
    let ctl = |args: &[&str]| {
        Command::new(bin("edgectl"))
            .args(args)
            .env("EDGE_CONFIG", &config)
            .env_remove("EDGE_HUB")
            .env_remove("EDGE_TOKEN")
            .env_remove("EDGE_CA")
            .output()
            .unwrap()
    };
    let ca = hub.ca.clone().unwrap();
    let out = ctl(&[
        "config",
        "set-hub",
        &hub.api_url,
        "--ca",
        ca.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ctl(&["version"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hub 0."), "{}", String::from_utf8_lossy(&out.stdout));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o600);
    let view = String::from_utf8_lossy(&ctl(&["config", "view"]).stdout).into_owned();
    assert!(view.contains("token: (set)") && !view.contains(&hub.token), "{view}");
    // A CA file that is not one is refused, and changes nothing.
    let bogus = t.path().join("bogus.pem");
    std::fs::write(&bogus, "not a certificate").unwrap();
    let out = ctl(&["config", "set-hub", "https://elsewhere:7443", "--ca", bogus.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("bogus.pem"));
    assert!(ctl(&["version"]).status.success(), "the old settings stand");
}

#[test]
fn plaintext_only_when_asked_and_an_operators_certificate_when_given() {
    let t = TempDir::new("plaintext");
    let hub = Hub::start(t.path(), HubOpts { extra: vec!["--insecure-plaintext".into()], ..Default::default() });
    assert!(hub.api_url.starts_with("http://") && hub.mqtt_url.starts_with("mqtt://") && hub.ca.is_none());
    let _agent = Agent::start(t.path(), "pi-1", &hub.mqtt_url, &hub.join, &[]);
    hub.wait_node_state("pi-1", "Ready");

    // The operator's own PKI: a CA and a certificate for 127.0.0.1 from openssl.
    let dir = t.path().join("pki");
    std::fs::create_dir_all(&dir).unwrap();
    let sh = format!(
        "set -e; cd {d}; \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=ops-ca 2>/dev/null; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout hub.key -out hub.csr -subj /CN=hub 2>/dev/null; \
         printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > ext; \
         openssl x509 -req -in hub.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out hub.crt -days 2 -extfile ext 2>/dev/null; \
         cat hub.crt ca.crt > chain.crt",
        d = dir.display()
    );
    assert!(Command::new("sh").args(["-c", &sh]).status().unwrap().success());
    let t2 = TempDir::new("opscert");
    let (cert, key) = (dir.join("chain.crt"), dir.join("hub.key"));
    let hub2 = Hub::start(
        t2.path(),
        HubOpts {
            extra: vec!["--tls-cert".into(), cert.display().to_string(), "--tls-key".into(), key.display().to_string()],
            ..Default::default()
        },
    );
    let out = hub2.edgectl_cmd(&hub2.token).env("EDGE_CA", dir.join("ca.crt")).args(["get", "nodes"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Half a pair is refused at start, naming what is missing.
    let t3 = TempDir::new("halfpair");
    let out = Command::new(bin("edge-hub"))
        .args(["serve", "--api-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0", "--data-dir"])
        .arg(t3.path().join("hub"))
        .arg("--tls-cert")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert and --tls-key go together"));
}

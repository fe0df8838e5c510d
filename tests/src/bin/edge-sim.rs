//! edge-sim: a fleet of simulated nodes against a real hub, to size it.
//! Each node enrols with the join token, keeps its own MQTT connection and
//! speaks the real protocol (the agent's own session machine); it reports
//! what it is given as Running and ready after `--apply-delay`, and runs
//! nothing.
//!
//! ```text
//! edge-sim --broker mqtts://hub:8883 --join-token-file join.token --nodes 1000
//!          [--prefix sim] [--label site=a]... [--apply-delay 200ms]
//!          [--keepalive 30s] [--rate 200] [--for 10m]
//!          [--flap PERCENT [--flap-every 60s] [--flap-down 5s]] [--churn PER_MINUTE]
//! ```
//!
//! `--flap 10`: one node in ten loses its link now and then (dropped, not
//! closed: the broker tells the hub), about every `--flap-every`, for
//! `--flap-down`. `--churn 6`: six nodes a minute vanish for good and as
//! many new ones (`<prefix>-r00000`…) join in their place.
//!
//! It prints the fleet's progress every 10 s and its totals at the end.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edge_api::broker_url::BrokerUrl;
use edge_api::token::JoinToken;
use edge_tests::sim::{Flap, Fleet, SimConfig, Unrest};

fn usage(problem: &str) -> ! {
    eprintln!("edge-sim: {problem}");
    eprintln!(
        "usage: edge-sim --broker URL (--join-token T | --join-token-file F) --nodes N [--prefix P] [--label k=v]... [--apply-delay D] [--keepalive D] [--rate PER_SECOND] [--for D] [--flap PERCENT [--flap-every D] [--flap-down D]] [--churn PER_MINUTE]"
    );
    std::process::exit(2)
}

struct Args {
    broker: BrokerUrl,
    token: JoinToken,
    nodes: usize,
    prefix: String,
    labels: Vec<(String, String)>,
    apply_delay: Duration,
    keepalive: Duration,
    rate: usize,
    run_for: Option<Duration>,
    unrest: Unrest,
}

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let (mut broker, mut token, mut nodes, mut prefix) = (None, None, None, "sim".to_string());
    let (mut labels, mut apply_delay, mut keepalive, mut rate, mut run_for) =
        (Vec::new(), Duration::from_millis(200), Duration::from_secs(30), 200, None);
    let mut unrest = Unrest::default();
    let mut flap = Flap { every: Duration::from_secs(60), down: Duration::from_secs(5) };
    let duration = |name: &str, v: String| {
        edge_api::time::parse_duration(&v).unwrap_or_else(|e| usage(&format!("{name} {v:?}: {e}")))
    };
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--broker" => {
                broker = Some(value().parse::<BrokerUrl>().unwrap_or_else(|e| usage(&format!("--broker: {e}"))))
            }
            "--join-token" => token = Some(value()),
            "--join-token-file" => {
                let f = value();
                token = Some(
                    std::fs::read_to_string(&f)
                        .unwrap_or_else(|e| usage(&format!("--join-token-file {f}: {e}")))
                        .trim()
                        .to_string(),
                )
            }
            "--nodes" => nodes = Some(value().parse().unwrap_or_else(|_| usage("--nodes: expected a number"))),
            "--prefix" => prefix = value(),
            "--label" => {
                let v = value();
                let (k, val) =
                    v.split_once('=').unwrap_or_else(|| usage(&format!("--label {v:?}: expected key=value")));
                labels.push((k.to_string(), val.to_string()));
            }
            "--apply-delay" => apply_delay = duration("--apply-delay", value()),
            "--keepalive" => keepalive = duration("--keepalive", value()),
            "--rate" => rate = value().parse().unwrap_or_else(|_| usage("--rate: expected nodes per second")),
            "--for" => run_for = Some(duration("--for", value())),
            "--flap" => {
                unrest.flap_percent = value()
                    .parse()
                    .ok()
                    .filter(|p| *p <= 100)
                    .unwrap_or_else(|| usage("--flap: expected a percentage of nodes, 0 to 100"))
            }
            "--flap-every" => flap.every = duration("--flap-every", value()),
            "--flap-down" => flap.down = duration("--flap-down", value()),
            "--churn" => {
                unrest.churn_per_minute =
                    value().parse().unwrap_or_else(|_| usage("--churn: expected nodes per minute"))
            }
            "-h" | "--help" => usage("a simulated fleet"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let token = token.unwrap_or_else(|| usage("give --join-token or --join-token-file"));
    if flap.every.is_zero() {
        usage("--flap-every: must be more than 0s");
    }
    unrest.flap = (unrest.flap_percent > 0).then_some(flap);
    Args {
        broker: broker.unwrap_or_else(|| usage("give --broker")),
        token: token.parse().unwrap_or_else(|e| usage(&format!("the join token: {e}"))),
        nodes: nodes.unwrap_or_else(|| usage("give --nodes")),
        prefix,
        labels,
        apply_delay,
        keepalive,
        rate,
        run_for,
        unrest,
    }
}

fn main() {
    let a = parse();
    let tls = edge_agent::broker_tls(&a.broker, None, Some(&a.token.fingerprint))
        .unwrap_or_else(|e| usage(&format!("TLS for {}: {e:#}", a.broker)));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let cfg = SimConfig {
            broker: a.broker.clone(),
            tls,
            keepalive: a.keepalive,
            apply_delay: a.apply_delay,
            unrest: a.unrest,
        };
        let started = Instant::now();
        let fleet = Fleet::start(cfg, &a.token, &a.prefix, a.nodes, &a.labels, a.rate).await;
        let s = fleet.stats.clone();
        let report = |label: &str| {
            println!(
                "{label} {:>6.0}s: {} connections, {} applied a desired state, {} desired states, {} heartbeats, {} leases, {} link errors, {} messages refused, {} links dropped, {} nodes replaced",
                started.elapsed().as_secs_f64(),
                s.connections.load(Ordering::Relaxed),
                s.applied(),
                s.desired.load(Ordering::Relaxed),
                s.heartbeats.load(Ordering::Relaxed),
                s.leases.load(Ordering::Relaxed),
                s.link_errors.load(Ordering::Relaxed),
                s.rejected.load(Ordering::Relaxed),
                s.flaps.load(Ordering::Relaxed),
                s.churned.lock().unwrap().len(),
            )
        };
        let until = a.run_for.map(|d| started + d);
        let mut every = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = every.tick() => report("edge-sim"),
                _ = tokio::signal::ctrl_c() => break,
                _ = async { tokio::time::sleep_until(until.unwrap().into()).await }, if until.is_some() => break,
            }
        }
        fleet.stop().await;
        report("edge-sim done");
    });
}

//! Prometheus counters for the hub, rendered in the text exposition format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub received: AtomicU64,
    pub rejected: AtomicU64,
    pub published: AtomicU64,
    pub api_requests: AtomicU64,
    pub api_errors: AtomicU64,
    pub artifact_bytes_in: AtomicU64,
    pub artifact_bytes_out: AtomicU64,
    /// MQTT publishes and subscriptions the embedded broker refused (each
    /// ends its connection).
    pub mqtt_denied: AtomicU64,
    /// API connections refused or cut by a limit (count, time).
    pub api_limited: AtomicU64,
    /// Whether the hub's MQTT session is up (what `/readyz` reports).
    pub broker_connected: std::sync::atomic::AtomicBool,
}

impl Metrics {
    pub fn render(&self, nodes: &[(String, usize)], workloads: &[(String, usize)]) -> String {
        let mut s = String::new();
        let counters = [
            ("edge_hub_mqtt_messages_received_total", "MQTT messages received from agents", &self.received),
            (
                "edge_hub_mqtt_messages_rejected_total",
                "MQTT messages refused as malformed, unsigned, stale or foreign",
                &self.rejected,
            ),
            ("edge_hub_mqtt_messages_published_total", "MQTT messages published to agents", &self.published),
            ("edge_hub_api_requests_total", "HTTP API requests", &self.api_requests),
            ("edge_hub_api_errors_total", "HTTP API requests answered with an error", &self.api_errors),
            ("edge_hub_artifact_bytes_received_total", "artifact bytes uploaded", &self.artifact_bytes_in),
            ("edge_hub_artifact_bytes_served_total", "artifact bytes served to agents", &self.artifact_bytes_out),
            (
                "edge_hub_mqtt_denied_total",
                "MQTT publishes and subscriptions refused by the embedded broker's ACLs",
                &self.mqtt_denied,
            ),
            ("edge_hub_api_limited_total", "API connections refused or cut by a limit", &self.api_limited),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            s,
            "# HELP edge_hub_broker_connected 1 while the hub is connected to the MQTT broker\n# TYPE edge_hub_broker_connected gauge\nedge_hub_broker_connected {}",
            u8::from(self.broker_connected.load(Ordering::Relaxed))
        );
        let _ = writeln!(s, "# HELP edge_hub_nodes Nodes by state\n# TYPE edge_hub_nodes gauge");
        for (state, n) in nodes {
            let _ = writeln!(s, "edge_hub_nodes{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(s, "# HELP edge_hub_workloads Workloads by phase\n# TYPE edge_hub_workloads gauge");
        for (phase, n) in workloads {
            let _ = writeln!(s, "edge_hub_workloads{{phase=\"{phase}\"}} {n}");
        }
        s
    }
}

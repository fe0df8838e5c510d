//! The hub's MQTT session: subscribe to what agents send, publish what the
//! hub decides. Works the same against the embedded broker and any external
//! MQTT 3.1.1 broker.

use std::sync::Arc;
use std::time::Duration;

use edge_api::broker_url::BrokerUrl;
use edge_api::wire;
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};

use crate::hub::{Hub, Outgoing};

/// 5 s: the broker notices a vanished hub within 7.5 s (1.5 × keep-alive, MQTT 3.1.2-24).
const KEEP_ALIVE: Duration = Duration::from_secs(5);

pub async fn run(
    hub: Arc<Hub>,
    url: BrokerUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
    client_id: String,
    mut outbox: mpsc::UnboundedReceiver<Outgoing>,
    fence: Option<Arc<crate::etcd::Fence>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut opts = MqttOptions::new(client_id, url.host.clone(), url.port);
    opts.set_keep_alive(KEEP_ALIVE);
    opts.set_clean_session(true);
    let max = wire::MAX_PAYLOAD + (64 << 10);
    opts.set_max_packet_size(max, max);
    opts.set_inflight(100);
    if let Some(user) = &url.username {
        opts.set_credentials(user.clone(), url.password.clone().unwrap_or_default());
    }
    if let Some(tls) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls)));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    // Without TCP_NODELAY a request/response over loopback took ~45 ms (Nagle
    // plus delayed ACKs); with it, ~5 ms.
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    eventloop.set_network_options(net);

    // Publishing runs apart from polling: a full request channel must never
    // stop the event loop that drains it.
    let publisher = client.clone();
    let pub_task = tokio::spawn(async move {
        while let Some(o) = outbox.recv().await {
            // One of several hubs says nothing unless it surely leads (a
            // hub paused past its lease wakes up to this, not to publishing).
            if fence.as_ref().is_some_and(|f| !f.holds()) {
                tracing::error!(
                    "this hub no longer surely leads: stopping before it publishes; started again, it follows"
                );
                std::process::exit(crate::ha::LOST_LEAD);
            }
            let qos = if o.lossy { QoS::AtMostOnce } else { QoS::AtLeastOnce };
            if let Err(e) = publisher.publish(o.topic, qos, o.retain, o.payload).await {
                tracing::warn!("mqtt publish failed: {e}");
            }
        }
    });

    let mut failures = 0u32;
    loop {
        tokio::select! {
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(broker = %url, "connected to the MQTT broker");
                    failures = 0;
                    // rumqttc does not re-subscribe after a reconnect: do it on every ConnAck.
                    let c = client.clone();
                    let extra = hub.broker_admin_filters();
                    hub.metrics.broker_connected.store(true, std::sync::atomic::Ordering::Relaxed);
                    let h = hub.clone();
                    tokio::spawn(async move {
                        let filters = wire::hub_filters().into_iter().chain(extra).map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                        if let Err(e) = c.subscribe_many(filters).await {
                            tracing::warn!("mqtt subscribe failed: {e}");
                        }
                        // After the subscriptions are queued: answers to what
                        // this publishes (the broker's accounts) are not missed.
                        h.on_connected();
                    });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => hub.on_message(&p.topic, &p.payload),
                Ok(_) => {}
                Err(e) => {
                    hub.metrics.broker_connected.store(false, std::sync::atomic::Ordering::Relaxed);
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        tracing::warn!(broker = %url, "mqtt connection failed ({failures}x): {e}");
                    }
                    let backoff = Duration::from_millis(200 * u64::from(failures.min(10)));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    let _ = client.try_disconnect();
    pub_task.abort();
}

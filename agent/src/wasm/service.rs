//! `HttpService`: one `wasi:http` replica as the proxy sees it. A fresh
//! instance per request within `max_instances`, bounded in time, ended when
//! its client leaves or the service stops; failures classified and counted;
//! probes served alike but not counted; `instantiates` for the check of a
//! service without probes.

use super::*;

pub fn text_response(status: u16, body: impl Into<String>) -> hyper::Response<BoxBody> {
    let body = http_body_util::Full::new(Bytes::from(body.into())).map_err(|never| match never {}).boxed_unsync();
    let mut r = hyper::Response::new(body);
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// The header on an answer the agent gave because the component did not
/// (it trapped, timed out, was at capacity): the reason, in one word.
pub const ERROR_HEADER: &str = "x-edge-error";

fn failed_response(status: u16, reason: &Reason, body: String) -> hyper::Response<BoxBody> {
    let mut r = text_response(status, body);
    if let Ok(v) = hyper::header::HeaderValue::from_str(reason.as_str()) {
        r.headers_mut().insert(ERROR_HEADER, v);
    }
    r
}

/// Request counters of a service, reported in its status.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    pub last_failure: Mutex<Option<String>>,
}

/// A `wasi:http/proxy` replica, ready to serve: an instance per request.
///
/// Every request is bounded: it waits at most [`QUEUE_WAIT`] for one of the
/// service's `max_instances` slots, takes at most `request_timeout` in all
/// (body included), and ends the moment its client goes away. A service
/// that is stopped ends its requests in flight.
pub struct HttpService {
    pub key: String,
    pub workload: String,
    pub generation: u64,
    pub(super) pre: ProxyPre<Host>,
    /// The same component as a command, if it also exports `wasi:cli/run`
    /// (for command probes).
    command: Option<CommandPre<Host>>,
    pub(super) caps: Capabilities,
    pub(super) limits: Limits,
    slots: Arc<tokio::sync::Semaphore>,
    max_instances: u32,
    pub stats: Stats,
    /// The requests in flight, to end them when the service stops.
    inflight: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    next_request: AtomicU64,
}

/// Ends a request's guest when dropped: held by the request's future, then
/// by its response body, so a client that leaves frees the instance at once.
/// One instance's store and its service slot, dropped in this order.
struct Held<T: 'static> {
    store: Store<T>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

struct EndOnDrop {
    svc: Arc<HttpService>,
    id: u64,
}

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.svc.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id) {
            h.abort();
        }
    }
}

/// A response body that keeps its request's guard alive while it streams.
struct GuardedBody {
    inner: BoxBody,
    _guard: EndOnDrop,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl HttpService {
    pub fn new(
        key: String,
        workload: String,
        generation: u64,
        pre: ProxyPre<Host>,
        caps: Capabilities,
        limits: Limits,
        max_instances: u32,
    ) -> Self {
        let command = CommandPre::new(pre.instance_pre().clone()).ok();
        HttpService {
            key,
            workload,
            generation,
            command,
            pre,
            caps,
            limits,
            slots: Arc::new(tokio::sync::Semaphore::new(max_instances as usize)),
            max_instances,
            stats: Stats::default(),
            inflight: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(0),
        }
    }

    /// The wall-clock limit of one request.
    pub fn request_timeout(&self) -> Duration {
        self.limits.request_timeout
    }

    /// Requests running now.
    pub fn in_flight(&self) -> usize {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Instances alive now, including ones still ending after their
    /// response was sent. A slot counts free here only after its instance
    /// (and the node pool slot it held) is gone.
    pub fn instances(&self) -> usize {
        self.max_instances as usize - self.slots.available_permits()
    }

    /// Ends every request in flight (the service was removed).
    pub fn stop(&self) {
        for (_, h) in self.inflight.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            h.abort();
        }
    }

    fn fail(&self, reason: Reason, message: &str, details: &str) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.caps.sink.note(&format!("request failed: {reason}: {message}"));
        if !details.is_empty() && details != message {
            self.caps.sink.note(details);
        }
        *self.stats.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{reason}: {message}"));
    }

    /// Handles one request with a fresh instance.
    pub async fn handle<B>(self: &Arc<Self>, req: hyper::Request<B>) -> hyper::Response<BoxBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        self.serve(req, true).await
    }

    /// Handles a health probe's request like any other, but leaves it out
    /// of the service's request and failure counts (which travel in its
    /// status: a probe every few seconds must not resend it each time).
    pub async fn probe<B>(self: &Arc<Self>, req: hyper::Request<B>) -> hyper::Response<BoxBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        self.serve(req, false).await
    }

    /// Creates one instance, with the service's limits, and drops it
    /// without calling it: the component links and its start-up does not
    /// trap. No request is made (a request may have effects: a counter
    /// would count it).
    pub async fn instantiates(self: &Arc<Self>, timeout: Duration) -> Result<String, String> {
        let permit = tokio::time::timeout(timeout, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| "no free instance slot".to_string())?
            .map_err(|_| "the service was stopped".to_string())?;
        let store = new_store(self.pre.engine(), &self.caps, &self.limits, std::slice::from_ref(&self.workload), None)
            .map_err(|e| format!("{e:#}"))?;
        let mut held = Held { store, _permit: permit };
        let pre = self.pre.clone();
        let made = tokio::time::timeout(timeout, pre.instantiate_async(&mut held.store)).await;
        let result = match made {
            Ok(Ok(_)) => Ok("instantiates".into()),
            Ok(Err(e)) => {
                let (reason, message) = classify(&e, held.store.data(), Reason::Trap);
                Err(format!("instantiating failed: {reason}: {message}"))
            }
            Err(_) => Err(format!("instantiating took longer than {timeout:?}")),
        };
        drop(held);
        result
    }

    /// A command probe: the component run as a command (its
    /// `wasi:cli/run` export) with `args`, in one of the service's
    /// instance slots and with its limits; exit 0 passes.
    pub async fn run_check(self: &Arc<Self>, args: &[String], timeout: Duration) -> Result<String, String> {
        let Some(pre) = &self.command else {
            return Err("the component exports no wasi:cli/run to run a command probe with; probe it with http".into());
        };
        let _permit = tokio::time::timeout(timeout, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| "no free instance slot".to_string())?
            .map_err(|_| "the service was stopped".to_string())?;
        super::check::run(pre, &self.caps, &self.limits, &self.workload, args).await
    }

    async fn serve<B>(self: &Arc<Self>, req: hyper::Request<B>, counted: bool) -> hyper::Response<BoxBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        if counted {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
        }
        let fail = move |svc: &Self, reason: Reason, message: &str, details: &str| {
            if counted {
                svc.fail(reason, message, details);
            }
        };
        let permit = match tokio::time::timeout(QUEUE_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                fail(
                    self,
                    Reason::AtCapacity,
                    &format!("all {} instances were busy for {}s", self.max_instances, QUEUE_WAIT.as_secs()),
                    "",
                );
                return failed_response(
                    503,
                    &Reason::AtCapacity,
                    format!(
                        "AtCapacity: workload {} is at its limit of {} concurrent requests\n",
                        self.workload, self.max_instances
                    ),
                );
            }
        };
        let mut store =
            match new_store(self.pre.engine(), &self.caps, &self.limits, std::slice::from_ref(&self.workload), None) {
                Ok(s) => s,
                Err(e) => {
                    fail(self, Reason::SecretUnavailable, &format!("{e:#}"), "");
                    return failed_response(
                        500,
                        &Reason::SecretUnavailable,
                        format!("the request could not be served: {e:#}\n"),
                    );
                }
            };
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let prepared = (|| -> wasmtime::Result<_> {
            let req = store.data_mut().http().new_incoming_request(Scheme::Http, req)?;
            let out = store.data_mut().http().new_response_outparam(sender)?;
            Ok((req, out))
        })();
        let (req, out) = match prepared {
            Ok(x) => x,
            Err(e) => {
                fail(self, Reason::BadRequest, &e.to_string(), "");
                return failed_response(
                    400,
                    &Reason::BadRequest,
                    format!("the request could not be passed to the component: {e}\n"),
                );
            }
        };
        let pre = self.pre.clone();
        let timeout = self.limits.request_timeout;
        // The task classifies a failure itself and drops the store: the
        // response sender lives in the store, and only its drop tells the
        // waiting side below that no response is coming.
        // The store (and the pool slot under it) goes before the permit, also
        // when the task is aborted: a free permit means a free instance.
        let mut held = Held { store, _permit: permit };
        let task = tokio::spawn(async move {
            let store = &mut held.store;
            let run = async {
                let proxy = pre.instantiate_async(&mut *store).await?;
                proxy.wasi_http_incoming_handler().call_handle(&mut *store, req, out).await
            };
            let failure = match tokio::time::timeout(timeout, run).await {
                Ok(result) => result.err().map(|e| {
                    let (reason, message) = classify(&e, store.data(), Reason::Trap);
                    (reason, message, details(&e))
                }),
                Err(_) => Some((
                    Reason::RequestTimeout,
                    format!("the request took longer than spec.wasm.request_timeout ({timeout:?}); stopped"),
                    String::new(),
                )),
            };
            drop(held);
            failure
        });
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        self.inflight.lock().unwrap_or_else(|p| p.into_inner()).insert(id, task.abort_handle());
        let guard = EndOnDrop { svc: self.clone(), id };
        match receiver.await {
            Ok(Ok(resp)) => {
                // Writes the guest made before answering are durable before the answer leaves.
                if let Some(kv) = &self.caps.kv
                    && kv.dirty.swap(false, Ordering::Relaxed)
                    && let Err(e) = kv.tree.flush_async().await
                {
                    tracing::error!(workload = %self.workload, "cannot flush key-value writes: {e}");
                }
                let svc = self.clone();
                tokio::spawn(async move {
                    // The guest may go on streaming the body; report a failure afterwards.
                    match task.await {
                        Ok(Some((reason, message, details))) => fail(&svc, reason, &message, &details),
                        Err(e) if e.is_cancelled() => {} // the client left, or the service stopped
                        _ => {}
                    }
                });
                resp.map(|b| {
                    let inner = b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>).boxed_unsync();
                    GuardedBody { inner, _guard: guard }.boxed_unsync()
                })
            }
            Ok(Err(code)) => {
                fail(self, Reason::ErrorCode, &format!("{code:?}"), "");
                failed_response(
                    502,
                    &Reason::ErrorCode,
                    format!("workload {} answered with an error: {code:?}\n", self.workload),
                )
            }
            Err(_) => {
                let (reason, message) = match task.await {
                    Ok(None) => (Reason::NoResponse, "the component returned without setting a response".to_string()),
                    Ok(Some((reason, message, details))) => {
                        fail(self, reason.clone(), &message, &details);
                        (reason, message)
                    }
                    Err(e) if e.is_cancelled() => (Reason::Stopped, "the service was stopped".to_string()),
                    Err(e) => {
                        fail(self, Reason::Panic, &e.to_string(), "");
                        (Reason::Panic, e.to_string())
                    }
                };
                drop(guard);
                if reason == Reason::NoResponse {
                    fail(self, Reason::NoResponse, &message, "");
                }
                let status = match reason {
                    Reason::AtCapacity | Reason::Stopped => 503,
                    Reason::RequestTimeout => 504,
                    _ => 500,
                };
                failed_response(status, &reason, format!("workload {} failed: {reason}: {message}\n", self.workload))
            }
        }
    }
}

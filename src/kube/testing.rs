//! A mock API server for the tests: [`KubeApi`] over a `tower_test` service whose requests
//! the test answers, one at a time ([`Server::expect`]) or through a handler running in the
//! background ([`Server::serve`]), with every request recorded.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::{StreamExt, channel::mpsc};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower_test::mock::{self, SendResponse};

use super::KubeApi;

pub type MockBody = UnsyncBoxBody<Bytes, Infallible>;
type Handle = mock::Handle<Request<Body>, Response<MockBody>>;

pub const DRIVER: &str = "berth.csi.dev";
pub const INSTANCE: &str = "berth-controller-0";

/// A [`KubeApi`] whose requests `Server` answers.
pub fn pair() -> (KubeApi, Server) {
    let (service, handle) = mock::pair::<Request<Body>, Response<MockBody>>();
    let client = kube::Client::new(service, "default");
    (KubeApi::new(client, DRIVER, INSTANCE), Server { handle })
}

/// One request as the API server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub content_type: Option<String>,
    /// The JSON body (or YAML-as-JSON of an apply), Null when empty.
    pub body: Value,
}

impl Seen {
    /// "METHOD /path?query".
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.uri)
    }
}

pub struct Server {
    handle: Handle,
}

impl Server {
    /// The next request, within 60 s of (possibly paused) time.
    pub async fn next(&mut self) -> (Seen, Reply) {
        let (req, send) = tokio::time::timeout(Duration::from_secs(60), self.handle.next_request())
            .await
            .expect("no request within 60 s")
            .expect("the client went away");
        (seen(req).await, Reply(send))
    }

    /// The next request if any comes before the client goes away (or 5 s pass).
    pub async fn next_if_any(&mut self) -> Option<Seen> {
        match tokio::time::timeout(Duration::from_secs(5), self.handle.next_request()).await {
            Ok(Some((req, _))) => Some(seen(req).await),
            Ok(None) | Err(_) => None,
        }
    }

    /// The next request, which must be `method uri`; returns its body.
    pub async fn expect(&mut self, method: &str, uri: &str) -> (Value, Reply) {
        let (s, reply) = self.next().await;
        assert_eq!(s.line(), format!("{method} {uri}"), "body: {}", s.body);
        (s.body, reply)
    }

    /// Answers every request with `handler` in a background task, recording them all.
    pub fn serve(
        mut self,
        mut handler: impl FnMut(&Seen, Reply) + Send + 'static,
    ) -> (Arc<Mutex<Vec<Seen>>>, JoinHandle<()>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen_log = log.clone();
        let task = tokio::spawn(async move {
            while let Some((req, send)) = self.handle.next_request().await {
                let s = seen(req).await;
                seen_log.lock().unwrap().push(s.clone());
                handler(&s, Reply(send));
            }
        });
        (log, task)
    }
}

async fn seen(req: Request<Body>) -> Seen {
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("request body is JSON")
    };
    Seen {
        method,
        uri,
        content_type,
        body,
    }
}

/// How the test answers one request.
pub struct Reply(SendResponse<Response<MockBody>>);

impl Reply {
    pub fn json(self, code: u16, body: Value) {
        self.bytes(code, body.to_string().into_bytes());
    }

    /// A metav1.Status failure, as the API server sends for errors.
    pub fn status(self, code: u16, reason: &str, message: &str) {
        self.json(
            code,
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code,
            }),
        );
    }

    /// A body that is not a Status, as proxies and load balancers send.
    pub fn text(self, code: u16, text: &str) {
        self.bytes(code, text.as_bytes().to_vec());
    }

    fn bytes(self, code: u16, body: Vec<u8>) {
        let body = Full::new(Bytes::from(body)).boxed_unsync();
        self.0
            .send_response(Response::builder().status(code).body(body).unwrap());
    }

    /// A 200 whose body stays open: each event sent is one line of a watch; dropping the
    /// sender ends the watch, as the API server does when it times out.
    pub fn watch(self) -> mpsc::UnboundedSender<Value> {
        let (tx, rx) = mpsc::unbounded::<Value>();
        let frames = rx.map(|v| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{v}\n")))));
        let body = StreamBody::new(frames).boxed_unsync();
        self.0
            .send_response(Response::builder().status(200).body(body).unwrap());
        tx
    }
}

/// Replaces every timestamp field set from the clock (RFC 3339, within a minute of now) with
/// "<now>"; other times stay as they are, so an expected body says which is which.
pub fn scrub_times(v: &mut Value) {
    const FIELDS: [&str; 5] = [
        "eventTime",
        "acquireTime",
        "renewTime",
        "heartbeatTime",
        "lastTransitionTime",
    ];
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if !FIELDS.contains(&k.as_str()) {
                    scrub_times(v);
                    continue;
                }
                let t: Timestamp = v
                    .as_str()
                    .unwrap_or_else(|| panic!("{k} is not a string: {v}"))
                    .parse()
                    .unwrap_or_else(|e| panic!("{k} = {v} is not RFC 3339: {e}"));
                if Timestamp::now().duration_since(t).as_secs().abs() < 60 {
                    *v = json!("<now>");
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(scrub_times),
        _ => {}
    }
}

/// `v` with its clock-filled timestamps scrubbed.
pub fn scrubbed(mut v: Value) -> Value {
    scrub_times(&mut v);
    v
}

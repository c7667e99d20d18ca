//! One user action is one trace: a client publish is followed from the
//! gateway through broadcast to the fan-out, exported over OTLP/HTTP to an
//! in-process receiver. Its own test binary, because the tracing subscriber
//! is global to a process.

#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is a failed test"
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use rt_tests::{TestCluster, WsEncoding, eventually};
use serde_json::json;

type Received = Arc<Mutex<Vec<Span>>>;

async fn collect(body: web::Bytes, received: web::Data<Received>) -> HttpResponse {
    match ExportTraceServiceRequest::decode(body.as_ref()) {
        Ok(request) => {
            let spans = request
                .resource_spans
                .into_iter()
                .flat_map(|r| r.scope_spans)
                .flat_map(|s| s.spans);
            received.lock().expect("lock").extend(spans);
            HttpResponse::Ok()
                .content_type("application/x-protobuf")
                .finish()
        }
        Err(_) => HttpResponse::BadRequest().finish(),
    }
}

#[actix_rt::test]
async fn one_client_publish_is_one_trace_across_gateway_and_broadcast() {
    let received: Received = Arc::default();
    let data = web::Data::new(received.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/v1/traces", web::post().to(collect))
    })
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")
    .expect("bind the OTLP receiver");
    let receiver = server.addrs()[0];
    actix_rt::spawn(server.run());

    let cluster = TestCluster::start_with(1, |c| {
        c.telemetry.otlp_enabled = true;
        c.telemetry.otlp_endpoint = Some(format!("http://{receiver}/v1/traces"));
        c.telemetry.sampling_ratio = Some(1.0);
    })
    .await;
    let mut sub = cluster.client(0, WsEncoding::Json).await;
    sub.command("subscribe", json!({"channel": "chat:traced"}))
        .await;
    let mut publisher = cluster.client(0, WsEncoding::MsgPack).await;
    let ack = publisher
        .command("publish", json!({"channel": "chat:traced", "data": 1}))
        .await;
    assert_eq!(ack["ok"]["offset"], json!(1));
    assert_eq!(sub.next_push("pub").await["offset"], json!(1));
    cluster.flush_telemetry().await;

    let named = |spans: &[Span], name: &str| {
        spans
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let (publish, sequence, fanout) =
        eventually("the spans of one publish", Duration::from_secs(10), || {
            let received = received.clone();
            let cluster = &cluster;
            async move {
                cluster.flush_telemetry().await;
                let spans = received.lock().expect("lock").clone();
                let sequence = named(&spans, "broadcast.sequence").into_iter().next()?;
                let publish = named(&spans, "gateway.command")
                    .into_iter()
                    .find(|s| s.span_id == sequence.parent_span_id)?;
                let fanout = named(&spans, "gateway.fanout")
                    .into_iter()
                    .find(|s| s.links.iter().any(|l| l.trace_id == sequence.trace_id))?;
                Some((publish, sequence, fanout))
            }
        })
        .await;
    assert_eq!(
        publish.trace_id, sequence.trace_id,
        "gateway and broadcast spans are one trace"
    );
    assert_eq!(
        sequence.parent_span_id, publish.span_id,
        "broadcast's span is the gateway span's child"
    );
    let link = fanout
        .links
        .iter()
        .find(|l| l.trace_id == publish.trace_id)
        .expect("the fan-out links the publication");
    assert_eq!(
        link.span_id, sequence.span_id,
        "linked to the span that delivered it"
    );
    assert_ne!(
        fanout.trace_id, publish.trace_id,
        "fan-out is linked, not parented"
    );
}

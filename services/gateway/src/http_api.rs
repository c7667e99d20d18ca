//! The HTTP API for backend services: `/api/publish`, `/api/broadcast`,
//! `/api/history/{channel}`, `/api/presence/{channel}`, `/api/disconnect`
//! (PROTOCOL.md §5).
//!
//! The API key is checked before the route, so a wrong key on an unknown
//! `/api/` path is 401, not 404. Bodies are JSON, or MessagePack with
//! `Content-Type: application/msgpack`; the answer follows `Accept`, else the
//! request's encoding.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use rmpv::Value;
use rt_proto::internal::{HistoryRequest, PubInfo, StreamPosition};
use rt_proto::outbound::{self, Out};
use rt_proto::{ChannelName, Encoding, ErrorCode, value};
use rt_shared::telemetry::{current_context, set_remote_parent};
use rt_shared::trace_context::TraceContext;
use tracing::Instrument as _;

use crate::errors::bus_error;
use crate::state::AppState;

const MSGPACK: &str = "application/msgpack";
/// Channels one `/api/broadcast` may name.
const MAX_BROADCAST_CHANNELS: usize = 1_000;

type State = web::Data<Arc<AppState>>;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api")
            .route("/publish", web::post().to(publish))
            .route("/broadcast", web::post().to(broadcast))
            .route("/history/{channel}", web::get().to(history))
            .route("/presence/{channel}", web::get().to(presence))
            .route("/disconnect", web::post().to(disconnect))
            .default_service(web::to(unknown_route)),
    );
}

/// An API failure, answered as `{"error": {code, message}}`.
struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BAD_REQUEST, message)
    }

    fn from_body(body: rt_proto::outbound::ErrorBody) -> Self {
        let mut error = Self::new(body.code, body.message);
        if body.code == ErrorCode::BUSY && body.retry_after_ms.is_some() {
            error.status = StatusCode::SERVICE_UNAVAILABLE;
        }
        error
    }

    fn to_out(&self) -> Out {
        Out::map([(
            "error",
            Out::map([
                ("code", Out::UInt(u64::from(self.code.0))),
                ("message", Out::str(self.message.clone())),
            ]),
        )])
    }
}

fn respond(req: &HttpRequest, status: StatusCode, body: &Out) -> HttpResponse {
    let encoding = response_encoding(req);
    let content_type = match encoding {
        Encoding::MsgPack => MSGPACK,
        Encoding::Json => "application/json",
    };
    let mut response = HttpResponse::build(status);
    response.content_type(content_type);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.insert_header(("Retry-After", "1"));
    }
    response.body(outbound::encode(body, encoding))
}

fn fail(req: &HttpRequest, state: &AppState, error: &ApiError) -> HttpResponse {
    state.metrics.error(error.code.0);
    respond(req, error.status, &error.to_out())
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn request_encoding(req: &HttpRequest) -> Encoding {
    match header(req, "content-type") {
        Some(ct) if ct.starts_with(MSGPACK) => Encoding::MsgPack,
        _ => Encoding::Json,
    }
}

fn response_encoding(req: &HttpRequest) -> Encoding {
    match header(req, "accept") {
        Some(accept) if accept.starts_with(MSGPACK) => Encoding::MsgPack,
        Some(accept) if accept.starts_with("application/json") => Encoding::Json,
        _ => request_encoding(req),
    }
}

/// `Authorization: apikey <key>`, compared in constant time.
fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let expected = state.config.gateway.api_key.expose().as_bytes();
    let given = header(req, "authorization")
        .and_then(|v| v.strip_prefix("apikey "))
        .map(str::trim)
        .map(str::as_bytes);
    match given {
        Some(given) if !expected.is_empty() && constant_time_eq(given, expected) => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::UNAUTHORIZED,
            "missing or invalid API key",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A span for one API request, joining the caller's trace when it sent a
/// `traceparent`.
fn request_span(req: &HttpRequest, route: &'static str) -> tracing::Span {
    let span = tracing::info_span!("gateway.http", route);
    if let Some(parent) =
        header(req, "traceparent").and_then(|p| TraceContext::parse(p, header(req, "tracestate")))
    {
        set_remote_parent(&span, &parent);
    }
    span
}

async fn read_body(mut payload: web::Payload, limit: usize) -> Result<Bytes, ApiError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad(format!("cannot read body: {e}")))?;
        if body.len() + chunk.len() > limit {
            let mut error = ApiError::new(
                ErrorCode::LIMIT_EXCEEDED,
                format!("body over {limit} bytes"),
            );
            error.status = StatusCode::PAYLOAD_TOO_LARGE;
            return Err(error);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Decodes a JSON or MessagePack body into a map.
fn decode_body(req: &HttpRequest, body: &[u8]) -> Result<Vec<(Value, Value)>, ApiError> {
    let value = match request_encoding(req) {
        Encoding::MsgPack => value::decode_one(body)
            .map_err(|e| ApiError::bad(format!("invalid MessagePack body: {e}")))?,
        Encoding::Json => {
            let json: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?;
            value::from_json(&json)
        }
    };
    match value {
        Value::Map(fields) => Ok(fields),
        _ => Err(ApiError::bad("body must be an object")),
    }
}

fn field<'a>(fields: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    fields
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
        .filter(|v| !v.is_nil())
}

fn str_field(fields: &[(Value, Value)], key: &str) -> Result<Option<String>, ApiError> {
    match field(fields, key) {
        None => Ok(None),
        Some(Value::String(s)) => s
            .as_str()
            .map(|s| Some(s.to_owned()))
            .ok_or_else(|| ApiError::bad(format!("{key} is not valid UTF-8"))),
        Some(_) => Err(ApiError::bad(format!("{key} must be a string"))),
    }
}

/// `data`, or `data_b64` in JSON bodies, as raw MessagePack.
fn data_field(req: &HttpRequest, fields: &[(Value, Value)]) -> Result<Bytes, ApiError> {
    rt_proto::command::data_field(fields, request_encoding(req), true)
        .map_err(|e| ApiError::bad(e.message))
}

fn info_field(fields: &[(Value, Value)]) -> Result<Option<PubInfo>, ApiError> {
    match field(fields, "info") {
        None => Ok(None),
        Some(info @ Value::Map(_)) => Ok(Some(PubInfo {
            user: String::new(),
            client: String::new(),
            info: Some(Bytes::from(value::encode(info))),
        })),
        Some(_) => Err(ApiError::bad("info must be a map")),
    }
}

fn channel(state: &AppState, name: &str) -> Result<ChannelName, ApiError> {
    let channel =
        ChannelName::parse(name).map_err(|e| ApiError::bad(format!("channel {name:?}: {e}")))?;
    if state.config.namespace(&channel).is_none() {
        return Err(ApiError::new(
            ErrorCode::UNKNOWN_CHANNEL,
            format!("unknown namespace of {name:?}"),
        ));
    }
    Ok(channel)
}

async fn publish(req: HttpRequest, payload: web::Payload, state: State) -> HttpResponse {
    match publish_inner(&req, payload, &state)
        .instrument(request_span(&req, "publish"))
        .await
    {
        Ok(out) => respond(&req, StatusCode::OK, &out),
        Err(error) => fail(&req, &state, &error),
    }
}

async fn publish_inner(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> Result<Out, ApiError> {
    authorize(req, state)?;
    let body = read_body(payload, state.config.gateway.max_message_size).await?;
    let fields = decode_body(req, &body)?;
    let name =
        str_field(&fields, "channel")?.ok_or_else(|| ApiError::bad("channel is required"))?;
    let channel = channel(state, &name)?;
    let data = data_field(req, &fields)?;
    let info = info_field(&fields)?;
    let key = str_field(&fields, "idempotency_key")?;
    let trace = current_context();
    let ack = state
        .broadcast
        .publish_data(&channel, data, info, key, trace.as_ref())
        .map_err(|e| ApiError::from_body(bus_error(&e)))?
        .wait()
        .await
        .map_err(|e| ApiError::from_body(bus_error(&e)))?;
    Ok(Out::map([
        ("offset", Out::UInt(ack.offset)),
        ("epoch", Out::str(ack.epoch)),
    ]))
}

async fn broadcast(req: HttpRequest, payload: web::Payload, state: State) -> HttpResponse {
    match broadcast_inner(&req, payload, &state)
        .instrument(request_span(&req, "broadcast"))
        .await
    {
        Ok(out) => respond(&req, StatusCode::OK, &out),
        Err(error) => fail(&req, &state, &error),
    }
}

async fn broadcast_inner(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> Result<Out, ApiError> {
    authorize(req, state)?;
    let body = read_body(payload, state.config.gateway.max_message_size).await?;
    let fields = decode_body(req, &body)?;
    let Some(Value::Array(channels)) = field(&fields, "channels") else {
        return Err(ApiError::bad("channels must be an array of channel names"));
    };
    if channels.len() > MAX_BROADCAST_CHANNELS {
        return Err(ApiError::new(
            ErrorCode::LIMIT_EXCEEDED,
            format!("at most {MAX_BROADCAST_CHANNELS} channels per broadcast"),
        ));
    }
    let data = data_field(req, &fields)?;
    let info = info_field(&fields)?;
    let trace = current_context();
    // Every request is sent first (in order), then all replies are awaited together.
    let mut pending = Vec::with_capacity(channels.len());
    for name in channels {
        let sent = match name.as_str() {
            Some(name) => channel(state, name).and_then(|ch| {
                state
                    .broadcast
                    .publish_data(&ch, data.clone(), info.clone(), None, trace.as_ref())
                    .map_err(|e| ApiError::from_body(bus_error(&e)))
            }),
            None => Err(ApiError::bad("channel names must be strings")),
        };
        pending.push(sent);
    }
    let results = futures_util::future::join_all(pending.into_iter().map(|sent| async move {
        match sent {
            Ok(pending) => match pending.wait().await {
                Ok(ack) => Out::map([
                    ("offset", Out::UInt(ack.offset)),
                    ("epoch", Out::str(ack.epoch)),
                ]),
                Err(e) => ApiError::from_body(bus_error(&e)).to_out(),
            },
            Err(error) => error.to_out(),
        }
    }))
    .await;
    Ok(Out::map([("results", Out::Array(results))]))
}

#[derive(serde::Deserialize)]
struct HistoryQuery {
    limit: Option<String>,
    since: Option<String>,
    epoch: Option<String>,
    reverse: Option<String>,
}

async fn history(req: HttpRequest, path: web::Path<String>, state: State) -> HttpResponse {
    match history_inner(&req, &path, &state)
        .instrument(request_span(&req, "history"))
        .await
    {
        Ok(out) => respond(&req, StatusCode::OK, &out),
        Err(error) => fail(&req, &state, &error),
    }
}

async fn history_inner(req: &HttpRequest, name: &str, state: &AppState) -> Result<Out, ApiError> {
    authorize(req, state)?;
    let channel = channel(state, name)?;
    let query = web::Query::<HistoryQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::bad(format!("bad query: {e}")))?;
    let number = |key: &str, text: &Option<String>| -> Result<Option<u64>, ApiError> {
        text.as_deref()
            .map(|t| {
                t.parse::<u64>()
                    .map_err(|_| ApiError::bad(format!("{key} must be a non-negative integer")))
            })
            .transpose()
    };
    let limit = number("limit", &query.limit)?.unwrap_or(100);
    let since = match (number("since", &query.since)?, &query.epoch) {
        (Some(offset), Some(epoch)) => Some(StreamPosition {
            offset,
            epoch: epoch.clone(),
        }),
        (None, None) => None,
        _ => return Err(ApiError::bad("since and epoch go together")),
    };
    let reverse = match query.reverse.as_deref() {
        None | Some("false" | "0") => false,
        Some("true" | "1") => true,
        Some(_) => return Err(ApiError::bad("reverse must be true, false, 1 or 0")),
    };
    if reverse && since.is_some() {
        return Err(ApiError::bad("reverse cannot be combined with since"));
    }
    let request = HistoryRequest {
        limit: u32::try_from(limit.min(u64::from(state.config.broadcast.history_max_limit)))
            .unwrap_or(u32::MAX),
        since,
        reverse,
    };
    let trace = current_context();
    let reply = state
        .broadcast
        .history(&channel, &request, trace.as_ref())
        .map_err(|e| ApiError::from_body(bus_error(&e)))?
        .wait()
        .await
        .map_err(|e| ApiError::from_body(bus_error(&e)))?;
    Ok(Out::map([
        (
            "pubs",
            Out::Array(reply.pubs.iter().map(outbound::publication).collect()),
        ),
        ("offset", Out::UInt(reply.offset)),
        ("epoch", Out::str(reply.epoch)),
    ]))
}

async fn presence(req: HttpRequest, path: web::Path<String>, state: State) -> HttpResponse {
    match presence_inner(&req, &path, &state)
        .instrument(request_span(&req, "presence"))
        .await
    {
        Ok(out) => respond(&req, StatusCode::OK, &out),
        Err(error) => fail(&req, &state, &error),
    }
}

async fn presence_inner(req: &HttpRequest, name: &str, state: &AppState) -> Result<Out, ApiError> {
    authorize(req, state)?;
    let channel = channel(state, name)?;
    if !state
        .config
        .namespace(&channel)
        .is_some_and(|ns| ns.presence)
    {
        return Err(ApiError::new(
            ErrorCode::NOT_AVAILABLE,
            "presence is not enabled in this namespace",
        ));
    }
    let trace = current_context();
    let reply = state
        .session
        .presence(channel.as_str(), trace.as_ref())
        .map_err(|e| ApiError::from_body(bus_error(&e)))?
        .wait()
        .await
        .map_err(|e| ApiError::from_body(bus_error(&e)))?;
    Ok(outbound::presence(&reply))
}

async fn disconnect(req: HttpRequest, payload: web::Payload, state: State) -> HttpResponse {
    match disconnect_inner(&req, payload, &state)
        .instrument(request_span(&req, "disconnect"))
        .await
    {
        Ok(out) => respond(&req, StatusCode::OK, &out),
        Err(error) => fail(&req, &state, &error),
    }
}

/// Closes every connection of `user` on every gateway with 4008. With
/// `revoke: true` (an extension) the user's tokens issued until now are
/// refused from then on, so the kicked clients cannot simply come back.
async fn disconnect_inner(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
) -> Result<Out, ApiError> {
    authorize(req, state)?;
    let body = read_body(payload, state.config.gateway.max_message_size).await?;
    let fields = decode_body(req, &body)?;
    let user = str_field(&fields, "user")?.ok_or_else(|| ApiError::bad("user is required"))?;
    if user.is_empty() {
        return Err(ApiError::bad("user must not be empty"));
    }
    let revoke = match field(&fields, "revoke") {
        None | Some(Value::Nil) => false,
        Some(Value::Boolean(b)) => *b,
        Some(_) => return Err(ApiError::bad("revoke must be a boolean")),
    };
    if revoke {
        let trace = current_context();
        let now_secs = rt_shared::telemetry::now_ms() / 1000;
        state
            .session
            .revoke(&user, now_secs, trace.as_ref())
            .map_err(|e| ApiError::from_body(bus_error(&e)))?
            .wait()
            .await
            .map_err(|e| ApiError::from_body(bus_error(&e)))?;
    }
    crate::node::kick(&state.bus, &user).map_err(|e| ApiError::from_body(bus_error(&e)))?;
    Ok(Out::Map(Vec::new()))
}

async fn unknown_route(req: HttpRequest, state: State) -> HttpResponse {
    let error = match authorize(&req, &state) {
        Err(error) => error,
        Ok(()) => {
            let mut error = ApiError::new(ErrorCode::UNKNOWN_OP, "no such route");
            error.status = StatusCode::NOT_FOUND;
            error
        }
    };
    fail(&req, &state, &error)
}

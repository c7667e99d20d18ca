//! The `rpc` command: forwards a call to `rt.rpc.<method>` with the client's
//! deadline, relays partial results as `rpc_part` pushes, and cancels the
//! work when the client leaves or the deadline passes.
//!
//! Parts and the final reply reach the actor through its mailbox, one FIFO,
//! so a client always sees every part before the reply.

use std::time::Duration;

use actix::prelude::*;
use actix_web_actors::ws;
use bytes::Bytes;
use rt_proto::outbound::{self, ErrorBody, Out};
use rt_proto::rpc::{self, RpcReply};
use rt_proto::{ChannelName, ErrorCode, subject};
use rt_shared::BusError;
use rt_shared::bus::{headers_with, is_part};
use rt_shared::telemetry::current_context;
use rt_shared::telemetry::now_ms;

use crate::connection::Connection;
use crate::errors::bus_error;

/// A partial result for call `id`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RpcPart {
    pub id: u32,
    pub data: Bytes,
}

/// The end of call `id`: its data, or an error.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RpcDone {
    pub id: u32,
    pub request_id: String,
    pub started: std::time::Instant,
    pub result: Result<Bytes, ErrorBody>,
}

impl Connection {
    pub(crate) fn rpc(
        &mut self,
        id: u32,
        method: &str,
        data: Bytes,
        timeout_ms: Option<u64>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let Ok(method) = ChannelName::parse(method) else {
            return self.reply_error(
                id,
                &ErrorBody::new(ErrorCode::BAD_REQUEST, "invalid method name"),
            );
        };
        #[cfg(feature = "bench-inline-rpc")]
        if method.as_str() == "auth.hash_password" {
            return self.hash_inline_for_benchmark(id, &data);
        }
        if !self.begin_inflight(id) {
            return;
        }
        let config = &self.app.config.gateway;
        let timeout_ms =
            timeout_ms.map_or(config.rpc_timeout_ms, |t| t.clamp(1, config.rpc_timeout_ms));
        self.rpc_seq += 1;
        let request_id = rpc::request_id(&self.client_id, self.rpc_seq);
        let mut headers = headers_with(current_context().as_ref());
        headers.insert(rpc::HEADER_REQUEST_ID, request_id.as_str());
        headers.insert(
            rpc::HEADER_DEADLINE,
            (now_ms() + timeout_ms).to_string().as_str(),
        );
        let payload = Bytes::from(rpc::encode_request(data, self.user(), &self.client_id));
        let stream = self.app.bus.request_stream(
            subject::rpc(&method),
            headers,
            payload,
            config.rpc_max_pending_parts,
            Duration::from_millis(timeout_ms),
        );
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                self.inflight -= 1;
                return self.reply_error(id, &rpc_error(&error));
            }
        };
        self.rpcs_running.insert(request_id.clone());
        let addr = ctx.address();
        let started = std::time::Instant::now();
        let fut = async move {
            let result = loop {
                let message = match stream.next().await {
                    Ok(message) => message,
                    Err(error) => break Err(rpc_error(&error)),
                };
                let part = is_part(&message);
                match rpc::decode_reply(&message.payload) {
                    Ok(RpcReply::Data(data)) if part => addr.do_send(RpcPart { id, data }),
                    Ok(RpcReply::Data(data)) => break Ok(data),
                    Ok(RpcReply::Error(error)) => {
                        let body = ErrorBody::new(error.code, error.message);
                        break Err(match error.retry_after_ms {
                            Some(ms) => body.with_retry_after(ms),
                            None => body,
                        });
                    }
                    Err(_) => {
                        break Err(ErrorBody::new(
                            ErrorCode::INTERNAL,
                            "malformed reply from the method",
                        ));
                    }
                }
            };
            addr.do_send(RpcDone {
                id,
                request_id,
                started,
                result,
            });
        };
        ctx.spawn(tracing::Instrument::instrument(fut, tracing::Span::current()).into_actor(self));
    }

    /// Tells whoever runs the calls still open that nobody waits for them.
    pub(crate) fn cancel_open_rpcs(&mut self) {
        for request_id in self.rpcs_running.drain() {
            let _ = self.app.bus.publish(
                subject::cancel(&request_id),
                Default::default(),
                Bytes::new(),
            );
        }
    }
}

#[cfg(feature = "bench-inline-rpc")]
impl Connection {
    /// What the gateway would do without a compute service: hash on this
    /// worker's event loop, stalling every other connection on it.
    fn hash_inline_for_benchmark(&mut self, id: u32, data: &Bytes) {
        use argon2::password_hash::rand_core::OsRng;
        use argon2::password_hash::{PasswordHasher as _, SaltString};
        let password = match rt_proto::value::decode_one(data) {
            Ok(rmpv::Value::Map(fields)) => fields
                .iter()
                .find(|(k, _)| k.as_str() == Some("password"))
                .and_then(|(_, v)| v.as_str().map(str::to_owned)),
            _ => None,
        };
        let Some(password) = password else {
            return self.reply_error(
                id,
                &ErrorBody::new(ErrorCode::BAD_REQUEST, "password must be a string"),
            );
        };
        let compute = &self.app.config.compute;
        let params = argon2::Params::new(
            compute.argon2_memory_kib,
            compute.argon2_iterations,
            compute.argon2_parallelism,
            None,
        )
        .unwrap_or_default();
        let hasher =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::generate(&mut OsRng);
        match hasher.hash_password(password.as_bytes(), &salt) {
            Ok(hash) => {
                let data = Bytes::from(rt_proto::value::encode(&rmpv::Value::Map(vec![(
                    rmpv::Value::from("hash"),
                    rmpv::Value::from(hash.to_string()),
                )])));
                self.reply_ok(id, Out::map([("data", Out::Data(data))]));
            }
            Err(_) => self.reply_error(id, &ErrorBody::new(ErrorCode::INTERNAL, "hashing failed")),
        }
    }
}

/// Bus failures of an RPC: no responder means nobody serves the method (104).
fn rpc_error(error: &BusError) -> ErrorBody {
    match error {
        BusError::NoResponders => ErrorBody::new(ErrorCode::UNKNOWN_OP, "unknown method"),
        other => bus_error(other),
    }
}

impl Handler<RpcPart> for Connection {
    type Result = ();

    fn handle(&mut self, part: RpcPart, _: &mut Self::Context) {
        if part.id != 0 {
            self.send(&outbound::push_rpc_part(part.id, part.data));
        }
    }
}

impl Handler<RpcDone> for Connection {
    type Result = ();

    fn handle(&mut self, done: RpcDone, _: &mut Self::Context) {
        self.inflight -= 1;
        self.rpcs_running.remove(&done.request_id);
        self.app
            .metrics
            .rpc_latency
            .observe(done.started.elapsed().as_secs_f64());
        match done.result {
            Ok(data) => self.reply_ok(done.id, Out::map([("data", Out::Data(data))])),
            Err(error) => {
                if error.code == ErrorCode::TIMEOUT {
                    // The method may still be queued or running: stop it.
                    let _ = self.app.bus.publish(
                        subject::cancel(&done.request_id),
                        Default::default(),
                        Bytes::new(),
                    );
                }
                self.reply_error(done.id, &error);
            }
        }
    }
}

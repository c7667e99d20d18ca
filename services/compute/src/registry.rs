//! The handler registry: an RPC method is one function registered by name.
//!
//! ```ignore
//! registry.register("geo.nearby", methods::geo::nearby)?;
//! ```
//!
//! A method runs on a worker thread with a [`Call`]: its request data, the
//! caller's user and client, a way to stream partial results
//! ([`Call::send_part`]) and to notice that the caller went away
//! ([`Call::is_cancelled`]). It returns the final `data` or an error with a
//! code from PROTOCOL.md.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::HeaderMap;
use bytes::Bytes;
use rmpv::Value;
use rt_proto::internal::WireError;
use rt_proto::{ChannelName, ErrorCode, rpc};
use rt_shared::Bus;

/// What a method returns: the final reply's `data`, or an error.
pub type MethodResult = Result<Value, WireError>;

/// An RPC method. Any `Fn(&mut Call) -> MethodResult` is one.
pub trait Method: Send + Sync + 'static {
    fn call(&self, call: &mut Call) -> MethodResult;
}

impl<F> Method for F
where
    F: Fn(&mut Call) -> MethodResult + Send + Sync + 'static,
{
    fn call(&self, call: &mut Call) -> MethodResult {
        self(call)
    }
}

/// One invocation, as a method sees it.
pub struct Call {
    pub data: Value,
    pub user: String,
    pub client: String,
    reply: Option<String>,
    bus: Bus,
    cancelled: Arc<AtomicBool>,
}

impl Call {
    pub(crate) fn new(
        request: rpc::RpcCall,
        reply: Option<String>,
        bus: Bus,
        cancelled: Arc<AtomicBool>,
    ) -> Self {
        Self {
            data: request.data,
            user: request.user,
            client: request.client,
            reply,
            bus,
            cancelled,
        }
    }

    /// Sends a partial result ahead of the final reply.
    pub fn send_part(&mut self, data: &Value) -> Result<(), WireError> {
        if self.is_cancelled() {
            return Err(WireError::new(ErrorCode::TIMEOUT, "the caller went away"));
        }
        let Some(reply) = &self.reply else {
            return Ok(());
        };
        let mut headers = HeaderMap::new();
        headers.insert(rpc::HEADER_PART, "1");
        self.bus
            .publish(
                reply.clone(),
                headers,
                Bytes::from(rpc::encode_reply_data(data)),
            )
            .map_err(|_| {
                WireError::new(ErrorCode::BUSY, "cannot send partial results now")
                    .with_retry_after(100)
            })
    }

    /// Whether the caller disconnected or gave up; long methods should check
    /// between steps and stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// The request data as a map, or 107.
    pub fn data_map(&self) -> Result<&[(Value, Value)], WireError> {
        match &self.data {
            Value::Map(fields) => Ok(fields),
            _ => Err(bad_request("data must be a map")),
        }
    }

    /// A field of the request map.
    pub fn field(&self, key: &str) -> Result<Option<&Value>, WireError> {
        Ok(self
            .data_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
            .filter(|v| !v.is_nil()))
    }

    /// A required string field.
    pub fn str_field(&self, key: &str) -> Result<&str, WireError> {
        self.field(key)?
            .and_then(Value::as_str)
            .ok_or_else(|| bad_request(format!("{key} must be a string")))
    }
}

/// A 107 error for a method's bad input.
pub fn bad_request(message: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::BAD_REQUEST, message)
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("method name {0:?} is not valid (channel-name rules)")]
    BadName(String),
    #[error("method {0:?} is registered twice")]
    Duplicate(String),
}

/// Methods by name.
#[derive(Default, Clone)]
pub struct Registry {
    methods: HashMap<String, Arc<dyn Method>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, name: &str, method: impl Method) -> Result<(), RegistryError> {
        ChannelName::parse(name).map_err(|_| RegistryError::BadName(name.to_owned()))?;
        if self.methods.contains_key(name) {
            return Err(RegistryError::Duplicate(name.to_owned()));
        }
        self.methods.insert(name.to_owned(), Arc::new(method));
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Method>> {
        self.methods.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.methods.keys().map(String::as_str)
    }
}

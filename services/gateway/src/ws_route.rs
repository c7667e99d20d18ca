//! `GET /ws`: subprotocol negotiation and the start of a connection actor.

use std::sync::Arc;

use actix_web::http::header::SEC_WEBSOCKET_PROTOCOL;
use actix_web::{HttpRequest, HttpResponse, web};
use actix_web_actors::ws;
use rt_proto::Encoding;

use crate::connection::Connection;
use crate::state::AppState;

pub async fn ws_route(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<Arc<AppState>>,
) -> Result<HttpResponse, actix_web::Error> {
    if state.health.is_draining() {
        return Ok(HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .body("draining"));
    }
    let offers: Vec<&str> = req
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let negotiated = match Encoding::negotiate(offers) {
        Ok(negotiated) => negotiated,
        Err(error) => return Ok(HttpResponse::BadRequest().body(error.to_string())),
    };
    let encoding = negotiated.unwrap_or(Encoding::Json);
    // Refused sockets are still upgraded: a browser cannot read an HTTP
    // error's body, but it can read a close code and a `disconnect` push.
    let connection = match state.admission.admit(std::time::Instant::now()) {
        Ok(()) => Connection::new(state.get_ref().clone(), encoding),
        Err(retry_after_ms) => {
            Connection::refused(state.get_ref().clone(), encoding, retry_after_ms)
        }
    };
    let chosen = negotiated.map(Encoding::subprotocol);
    let protocols: Vec<&str> = chosen.into_iter().collect();
    let builder = ws::WsResponseBuilder::new(connection, &req, stream)
        // The codec refuses single frames over the limit; fragmented messages
        // are reassembled and checked by the connection.
        .frame_size(state.config.gateway.max_message_size);
    let builder = if protocols.is_empty() {
        builder
    } else {
        builder.protocols(&protocols)
    };
    builder.start()
}

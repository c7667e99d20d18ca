//! `GET /ws` requests that are not WebSocket upgrades: upgrades are taken
//! over before routing ([`crate::ws_upgrade`]), so what reaches this route
//! gets the handshake's error (400).

use actix_http::Response;
use actix_web::{HttpRequest, HttpResponse};

pub async fn ws_route(req: HttpRequest) -> HttpResponse {
    match actix_http::ws::verify_handshake(req.head()) {
        Err(error) => HttpResponse::from(Response::from(error)),
        Ok(()) => HttpResponse::BadRequest().body("expected a WebSocket upgrade"),
    }
}

//! Liveness and readiness, and the small HTTP server that exposes them with
//! `/metrics` for services that have no HTTP of their own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::{App, HttpResponse, HttpServer, web};

use crate::metrics::MetricsRegistry;

/// What `/readyz` reports: ready once NATS is connected and the service has
/// warmed up, and not while it drains.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<HealthFlags>,
}

#[derive(Default)]
struct HealthFlags {
    nats_connected: AtomicBool,
    warmed: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    pub fn set_nats_connected(&self, connected: bool) {
        self.inner
            .nats_connected
            .store(connected, Ordering::Relaxed);
    }

    pub fn set_warmed(&self) {
        self.inner.warmed.store(true, Ordering::Relaxed);
    }

    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// `Ok` when ready, else the reason.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.inner.draining.load(Ordering::Relaxed) {
            Err("draining")
        } else if !self.inner.nats_connected.load(Ordering::Relaxed) {
            Err("nats not connected")
        } else if !self.inner.warmed.load(Ordering::Relaxed) {
            Err("starting")
        } else {
            Ok(())
        }
    }
}

/// State behind the ops routes.
#[derive(Clone)]
pub struct OpsState {
    pub health: Health,
    pub metrics: MetricsRegistry,
}

/// Adds `/healthz`, `/readyz` and `/metrics` to an actix-web app.
pub fn configure(cfg: &mut web::ServiceConfig, state: OpsState) {
    cfg.app_data(web::Data::new(state))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn readyz(state: web::Data<OpsState>) -> HttpResponse {
    match state.health.readiness() {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n"),
        Err(reason) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(format!("not ready: {reason}\n")),
    }
}

async fn metrics(state: web::Data<OpsState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.encode())
}

/// Serves only the ops routes on `addr` with one worker; returns the server
/// (to await or stop) and the bound address.
pub fn serve(addr: &str, state: OpsState) -> std::io::Result<(actix_web::dev::Server, SocketAddr)> {
    let server = HttpServer::new(move || App::new().configure(|cfg| configure(cfg, state.clone())))
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(addr)?;
    let bound = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| std::io::Error::other("ops server bound no address"))?;
    Ok((server.run(), bound))
}

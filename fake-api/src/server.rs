//! Listening and per-connection serving.
//!
//! Connections are served by hand with hyper instead of `axum::serve` for two
//! reasons: a handler must be able to drop its connection without answering
//! (see [`AbortConnection`]), and `go_down` must be able to kill connections
//! that are in the middle of a request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt;

use super::state::Shared;

/// Response extension set by a handler that wants its client to see the
/// connection die instead of an answer.
#[derive(Clone, Copy)]
pub(super) struct AbortConnection;

pub(super) fn abort_response() -> Response {
    let mut r = Response::new(Body::empty());
    r.extensions_mut().insert(AbortConnection);
    r
}

/// Returned to hyper in place of the marked response; hyper then closes the
/// socket without writing anything.
#[derive(Debug)]
struct ConnectionAborted;

impl std::fmt::Display for ConnectionAborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by injected fault")
    }
}

impl std::error::Error for ConnectionAborted {}

/// A listening server; dropping it (or its `stop` sender) stops it too.
pub(super) struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Closes the listener and every open connection, and waits until they
    /// are all gone so the caller can rely on "connection refused" afterwards.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

pub(super) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bound(addr)?.listen(1024)
}

/// A socket bound to the fake's port but not listening, held while the fake is down: a client
/// still gets "connection refused", and no other socket (another test's server, an outgoing
/// connection's ephemeral port) can take the port before `come_up` binds it again. Without it
/// a parallel test occasionally got the port, and `come_up` failed with "address in use".
pub(super) fn hold(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    bound(addr)
}

fn bound(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // `come_up` rebinds the port whose server-side connections were just
    // closed and sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    // The listener and the placeholder of `hold` overlap for a moment on each transition.
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// With `tls`, every connection is served over TLS with that identity (tests of callferry's
/// certificate trust); a failed handshake just ends the connection.
pub(super) fn spawn(
    listener: TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) -> Running {
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, router, tls, shared, stopped));
    Running { stop, task }
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            // Also fires when the sender is dropped with the last FakeApi.
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let router = router.clone();
                    match tls.clone() {
                        None => {
                            conns.spawn(serve_connection(stream, router, shared.clone(), None));
                        }
                        Some(acceptor) => {
                            let shared = shared.clone();
                            conns.spawn(async move {
                                match acceptor.accept(stream).await {
                                    Ok(s) => {
                                        let kind = s.get_ref().1.handshake_kind();
                                        serve_connection(s, router, shared, Some(kind)).await
                                    }
                                    Err(e) => tracing::debug!(error = %e, "fake ElevateAI: TLS handshake failed"),
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "fake ElevateAI: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// `tls` is the connection's handshake, when it is TLS. The connection is counted (and its
/// handshake by kind) at its first `/v1` request: a benchmark's own control requests on other
/// connections must not look like the client's.
async fn serve_connection<S>(
    stream: S,
    router: Router,
    shared: Arc<Shared>,
    tls: Option<Option<rustls::HandshakeKind>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let counted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let router = router.clone();
        if req.uri().path().starts_with("/v1/") && !counted.swap(true, Ordering::Relaxed) {
            shared.connections.fetch_add(1, Ordering::Relaxed);
            match tls {
                None => {}
                Some(Some(rustls::HandshakeKind::Resumed)) => {
                    shared
                        .tls_resumed_handshakes
                        .fetch_add(1, Ordering::Relaxed);
                }
                Some(_) => {
                    shared.tls_full_handshakes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        async move {
            let resp = match router.oneshot(req.map(Body::new)).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            if resp.extensions().get::<AbortConnection>().is_some() {
                Err(ConnectionAborted)
            } else {
                Ok(resp)
            }
        }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // Idle keep-alive connections stay open until the client or
        // `go_down` closes them: a server-side idle cut-off would race with
        // pooled client requests and make tests flaky for no reason.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "fake ElevateAI: connection ended");
    }
}

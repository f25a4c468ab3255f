//! The accept loop and the connections it hands to tonic: TLS (when configured), a cap
//! on connections held at once, an idle timeout per connection, and a loop that backs
//! off instead of spinning when the process runs out of file descriptors.
//!
//! - The cap is a semaphore: at the cap the loop stops accepting, and new clients wait
//!   in the kernel's queue rather than taking descriptors the token and the store need.
//! - Idle: a connection from which nothing has been read for `idle_timeout` is closed.
//!   The server sends HTTP/2 pings at a third of that interval, so a live client, even
//!   one waiting on a slow call, answers and stays; a socket that sent nothing, only the
//!   preface, or half a frame does not.
//! - EMFILE/ENFILE: logged once per episode, accepts paused with a growing delay (up to
//!   one second), and a line when accepting works again.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::tls::ReloadableTls;

/// Accepted connections, ready for `serve_with_incoming_shutdown`.
pub type Incoming = ReceiverStream<Result<Connection, io::Error>>;

#[derive(Clone, Debug)]
pub struct ListenerOptions {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
}

/// Connections the kernel queues for us while the loop is at the cap or busy (the
/// kernel caps it at net.core.somaxconn).
const LISTEN_BACKLOG: u32 = 1024;

/// Binds the listening socket with a backlog deep enough to queue a burst.
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Starts the accept loop; it runs until the returned task is aborted.
pub fn accept(
    listener: TcpListener,
    tls: Option<Arc<ReloadableTls>>,
    options: ListenerOptions,
) -> (Incoming, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(accept_loop(listener, tls, options, tx));
    (ReceiverStream::new(rx), task)
}

fn out_of_descriptors(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE)
    )
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<ReloadableTls>>,
    options: ListenerOptions,
    tx: mpsc::Sender<Result<Connection, io::Error>>,
) {
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut backoff = Duration::ZERO;
    let mut at_cap_logged = false;
    loop {
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => {
                at_cap_logged = false;
                permit
            }
            Err(_) => {
                if !at_cap_logged {
                    tracing::warn!(
                        max_connections = options.max_connections,
                        "connection limit reached; new connections wait until one closes"
                    );
                    at_cap_logged = true;
                }
                match Arc::clone(&slots).acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => return,
                }
            }
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                if !backoff.is_zero() {
                    tracing::info!("accepting connections again");
                    backoff = Duration::ZERO;
                }
                accepted
            }
            Err(error) if out_of_descriptors(&error) => {
                if backoff.is_zero() {
                    tracing::error!(
                        error = %error,
                        "out of file descriptors: pausing accepts until some are free"
                    );
                    backoff = Duration::from_millis(10);
                } else {
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                tokio::time::sleep(backoff).await;
                continue;
            }
            Err(error) => {
                // ECONNABORTED and the like: that one client's problem.
                tracing::debug!(error = %error, "accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: Some(peer),
        };
        let idle_timeout = options.idle_timeout;
        match &tls {
            None => {
                let conn = Connection::new(Io::Plain(stream), info, idle_timeout, permit);
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
            }
            Some(tls) => {
                // Handshakes run beside the loop, so a slow one holds up no one else.
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                let tx = tx.clone();
                let handshake_timeout = options.handshake_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let io = Io::Tls(Box::new(stream));
                            let _ = tx
                                .send(Ok(Connection::new(io, info, idle_timeout, permit)))
                                .await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, error = %error, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// The byte stream under a connection.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection: holds its slot under the cap until dropped, and fails its
/// reads once nothing has arrived for the idle timeout.
pub struct Connection {
    io: Io,
    info: TcpConnectInfo,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    fn new(
        io: Io,
        info: TcpConnectInfo,
        idle_timeout: Duration,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        Self {
            io,
            info,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            _slot: slot,
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let deadline = Instant::now() + this.idle_timeout;
                this.idle.as_mut().reset(deadline);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Raises the soft limit on open files to the hard limit and returns the soft limit
/// now in force.
pub fn raise_fd_limit() -> io::Result<libc::rlim_t> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Ok(limit.rlim_cur)
}

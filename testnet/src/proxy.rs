//! A TCP proxy that can take a service down and bring it back, to test how podfs behaves when
//! PostgreSQL or S3 becomes unavailable mid-operation.
//!
//! Point the gateway's database URL (see [`crate::services::database_url_with_addr`]) or S3
//! endpoint (see [`crate::services::store_url_with_endpoint`]) at [`FaultProxy::addr`], then
//! call [`FaultProxy::set_down`].
//!
//! While down, the proxy keeps its port (so bringing it back never races another process for
//! it) but resets every connection: open ones are cut at once, new ones are accepted and reset
//! before a byte is exchanged. Clients see `ECONNRESET` / EOF, as with a crashed server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A TCP proxy on `127.0.0.1:<free port>` in front of one target address.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

struct Shared {
    /// `true` while down; connection tasks watch it and cut themselves.
    down: watch::Sender<bool>,
    delay: Mutex<Duration>,
    accepted: AtomicU64,
    forwarded: AtomicU64,
}

impl FaultProxy {
    /// Starts forwarding `127.0.0.1:<free port>` to `target`. Must run inside a tokio runtime.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (down, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            down,
            delay: Mutex::new(Duration::ZERO),
            accepted: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, target, shared.clone()));
        Ok(Self { addr, target, shared, accept_task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, for an S3 endpoint.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address connections are forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// `true`: cut every open connection now and reset new ones; `false`: forward new
    /// connections again (connections cut while down stay cut).
    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
    }

    /// Whether the proxy is down.
    pub fn is_down(&self) -> bool {
        *self.shared.down.borrow()
    }

    /// Waits this long before connecting each new connection to the target (and so before its
    /// first bytes go through). Zero (the default) forwards at once; a very long delay makes a
    /// service that accepts connections and never answers.
    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    /// Connections accepted so far (forwarded or reset).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections that reached the target so far.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Cuts the open connections and stops accepting.
        self.shared.down.send_replace(true);
        self.accept_task.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: do not spin.
                tracing::warn!("fault proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let down = shared.down.subscribe();
        let delay = *shared.delay.lock().unwrap_or_else(|e| e.into_inner());
        let shared = shared.clone();
        tokio::spawn(async move {
            serve(inbound, target, down, delay, &shared).await;
        });
    }
}

/// Closes with RST rather than FIN, so the peer sees a reset at once.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(
    mut inbound: TcpStream,
    target: SocketAddr,
    mut down: watch::Receiver<bool>,
    delay: Duration,
    shared: &Shared,
) {
    if *down.borrow_and_update() {
        reset(inbound);
        return;
    }
    let _ = inbound.set_nodelay(true);
    // Resolves when the proxy goes down (or is dropped).
    let cut = async {
        let _ = down.wait_for(|d| *d).await;
    };
    let forward = async {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut outbound = TcpStream::connect(target).await?;
        shared.forwarded.fetch_add(1, Ordering::Relaxed);
        let _ = outbound.set_nodelay(true);
        let result = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        let _ = outbound.shutdown().await;
        result.map(|_| ())
    };
    let outcome = tokio::select! {
        () = cut => Err(std::io::Error::other("proxy down")),
        r = forward => r,
    };
    // Both halves were closed normally when the forward ended cleanly; otherwise (down, target
    // refused, reset) the client gets a reset, like the real service failing.
    if outcome.is_err() {
        reset(inbound);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// An echo server; returns its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        let mut filled = 0;
        while filled < msg.len() {
            let n = s.read(&mut got[filled..]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            filled += n;
        }
        Ok(got)
    }

    /// Whether a connection through the proxy works end to end (within 5 s).
    async fn works(addr: SocketAddr) -> bool {
        tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = TcpStream::connect(addr).await?;
            roundtrip(&mut s, b"ping").await
        })
        .await
        .map(|r| r.map(|v| v == b"ping").unwrap_or(false))
        .unwrap_or(false)
    }

    #[tokio::test]
    async fn forwards_goes_down_and_comes_back() {
        let target = echo_server().await;
        let proxy = FaultProxy::start(target).await.unwrap();
        assert_eq!(proxy.target(), target);
        assert!(proxy.addr().ip().is_loopback());
        assert!(proxy.http_url().starts_with("http://127.0.0.1:"));

        // Forwarding, with a payload bigger than one buffer.
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(roundtrip(&mut open, &big).await.unwrap(), big);

        // Down: the open connection is cut at once...
        proxy.set_down(true);
        assert!(proxy.is_down());
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), open.read(&mut buf))
            .await
            .expect("an open connection is cut at once, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // ... and new connections fail.
        assert!(!works(proxy.addr()).await);
        let forwarded_before = proxy.forwarded();

        // Up again: new connections work.
        proxy.set_down(false);
        assert!(works(proxy.addr()).await);
        assert_eq!(proxy.forwarded(), forwarded_before + 1);
        assert!(proxy.accepted() >= 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn down_on_a_current_thread_runtime() {
        let target = echo_server().await;
        let proxy = FaultProxy::start(target).await.unwrap();
        assert!(works(proxy.addr()).await);
        proxy.set_down(true);
        assert!(!works(proxy.addr()).await);
        proxy.set_down(false);
        assert!(works(proxy.addr()).await);
    }

    #[tokio::test]
    async fn target_down_resets_the_client() {
        // A port bound but not listening: connections are refused, and the port stays taken
        // for the whole test (a dropped listener's port may come back as the proxy's own).
        let reserved = tokio::net::TcpSocket::new_v4().unwrap();
        reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dead = reserved.local_addr().unwrap();
        let proxy = FaultProxy::start(dead).await.unwrap();
        assert!(!works(proxy.addr()).await);
        assert_eq!(proxy.forwarded(), 0);
    }

    #[tokio::test]
    async fn delay_holds_the_first_bytes() {
        let target = echo_server().await;
        let proxy = FaultProxy::start(target).await.unwrap();
        proxy.set_delay(Duration::from_millis(300));
        let t = std::time::Instant::now();
        assert!(works(proxy.addr()).await);
        assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
        proxy.set_delay(Duration::ZERO);
        let t = std::time::Instant::now();
        assert!(works(proxy.addr()).await);
        assert!(t.elapsed() < Duration::from_millis(300), "{:?}", t.elapsed());

        // Going down during the delay cuts the waiting connection too.
        proxy.set_delay(Duration::from_secs(60));
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.set_down(true);
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.expect("cut while waiting");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn dropping_the_proxy_cuts_connections() {
        let target = echo_server().await;
        let proxy = FaultProxy::start(target).await.unwrap();
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut open, b"hi").await.unwrap(), b"hi");
        drop(proxy);
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(2), open.read(&mut buf)).await.expect("cut on drop");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}

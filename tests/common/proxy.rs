//! A TCP proxy that can be cut and restored: Kafka unreachable without losing the broker's
//! state, as in a network partition. It also keeps the bytes it forwarded, so a test can see
//! what crossed the wire (plaintext or TLS records).

use std::net::TcpListener;
use std::time::Duration;

/// A loopback TCP forwarder on its own threads. While cut, it closes every open connection
/// and every new one at once (the client sees the broker go away); restored, it forwards
/// again. Stopped on drop.
pub struct CutProxy {
    port: u16,
    state: std::sync::Arc<CutState>,
}

#[derive(Default)]
struct CutState {
    cut: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    open: std::sync::Mutex<Vec<std::net::TcpStream>>,
    /// Everything forwarded, both directions interleaved, up to [`WIRE_CAP`] bytes.
    wire: std::sync::Mutex<Vec<u8>>,
}

/// How much of the traffic a proxy keeps for [`CutProxy::wire`].
const WIRE_CAP: usize = 64 << 20;

impl CutProxy {
    /// Listens on a free loopback port and forwards to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> CutProxy {
        use std::sync::atomic::Ordering::Relaxed;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("proxy addr").port();
        let state = std::sync::Arc::new(CutState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(Relaxed) {
                let (client, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if st.cut.load(Relaxed) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut open = st.open.lock().unwrap_or_else(|e| e.into_inner());
                    open.extend(client.try_clone().ok());
                    open.extend(server.try_clone().ok());
                }
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    let st = st.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read as _, Write as _};
                        let mut buf = [0u8; 16 << 10];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            {
                                let mut wire = st.wire.lock().unwrap_or_else(|e| e.into_inner());
                                let room = WIRE_CAP.saturating_sub(wire.len()).min(n);
                                wire.extend_from_slice(&buf[..room]);
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        CutProxy { port, state }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The bytes forwarded so far, both directions.
    pub fn wire(&self) -> Vec<u8> {
        self.state
            .wire
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closes every connection and refuses new ones until [`CutProxy::restore`].
    pub fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut open = self.state.open.lock().unwrap_or_else(|e| e.into_inner());
        for s in open.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
    }
}
